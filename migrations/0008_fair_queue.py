"""The fair queue: requests waiting for, or holding, an upstream's slots (app/fair_queue.py)."""
from peewee import CharField, DoubleField, IntegerField, Model


def _tables(db):
    class QueueEntry(Model):
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


def down(migrator, db):
    db.drop_tables(_tables(db))
