"""A row per gateway process, rewritten by /health to prove the database takes writes."""
from peewee import CharField, DoubleField, Model


def _tables(db):
    class Heartbeat(Model):
        holder = CharField(max_length=128, primary_key=True)
        seen_at = DoubleField()

        class Meta:
            database = db
            table_name = "heartbeat"

    return [Heartbeat]


def up(migrator, db):
    db.create_tables(_tables(db))


def down(migrator, db):
    db.drop_tables(_tables(db))
