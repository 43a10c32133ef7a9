"""The fair queue: requests waiting for, or holding, an upstream's slots (app/fair_queue.py),
and each key's priority there."""
from peewee import BigIntegerField, CharField, DoubleField, IntegerField, Model, PostgresqlDatabase


def _tables(db):
    class QueueEntry(Model):
        id = BigIntegerField(primary_key=True)
        upstream = CharField(max_length=255, index=True)
        key_id = IntegerField()
        holder = CharField(max_length=128)
        start_tag = DoubleField()
        finish_tag = DoubleField()
        enqueued_at = DoubleField()
        granted_at = DoubleField(null=True)
        expires_at = DoubleField()

        class Meta:
            database = db
            table_name = "queue_entry"

    return [QueueEntry]


def up(migrator, db):
    db.create_tables(_tables(db))
    if isinstance(db, PostgresqlDatabase):
        # Entries live for one request and lapse with their lease: a crash may lose them,
        # and a commit need not wait for the disk (half the queue's time per request).
        db.execute_sql("ALTER TABLE queue_entry SET UNLOGGED")
    migrator.migrate(migrator.add_column("api_key", "priority", IntegerField(default=1)))


def down(migrator, db):
    migrator.migrate(migrator.drop_column("api_key", "priority"))
    db.drop_tables(_tables(db))
