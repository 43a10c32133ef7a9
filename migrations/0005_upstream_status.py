"""Each worker's view of each upstream, so `ollama-gw upstreams` can show in-flight requests."""
from peewee import BooleanField, CharField, CompositeKey, DoubleField, IntegerField, Model


def _tables(db):
    class UpstreamStatus(Model):
        holder = CharField(max_length=128)
        upstream = CharField(max_length=255)
        up = BooleanField()
        in_flight = IntegerField()
        updated_at = DoubleField()

        class Meta:
            database = db
            table_name = "upstream_status"
            primary_key = CompositeKey("holder", "upstream")

    return [UpstreamStatus]


def up(migrator, db):
    db.create_tables(_tables(db))


def down(migrator, db):
    db.drop_tables(_tables(db))
