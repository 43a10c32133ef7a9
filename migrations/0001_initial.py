"""Keys, rate-limit windows and concurrency slots."""
import datetime

from peewee import (
    BigIntegerField,
    CharField,
    CompositeKey,
    DateTimeField,
    DoubleField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)


def _tables(db):
    class ApiKey(Model):
        prefix = CharField(max_length=32, unique=True)
        key_hash = CharField(max_length=64, unique=True)
        name = CharField(max_length=200)
        role = CharField(max_length=16, default="user")
        rate_limit = IntegerField(null=True)
        rate_period = IntegerField(default=3600)
        max_concurrent = IntegerField(null=True)
        models = TextField(null=True)
        expires_at = DateTimeField(null=True)
        created_at = DateTimeField(default=datetime.datetime.utcnow)
        last_used_at = DateTimeField(null=True)
        revoked_at = DateTimeField(null=True)

        class Meta:
            database = db
            table_name = "api_key"

    class RateCounter(Model):
        key = ForeignKeyField(ApiKey, on_delete="CASCADE")
        window_start = BigIntegerField()
        count = IntegerField(default=0)

        class Meta:
            database = db
            table_name = "rate_counter"
            primary_key = CompositeKey("key", "window_start")

    class ConcurrencySlot(Model):
        key = ForeignKeyField(ApiKey, on_delete="CASCADE")
        holder = CharField(max_length=128)
        expires_at = DoubleField(index=True)

        class Meta:
            database = db
            table_name = "concurrency_slot"

    return [ApiKey, RateCounter, ConcurrencySlot]


def up(migrator, db):
    db.create_tables(_tables(db))


def down(migrator, db):
    db.drop_tables(list(reversed(_tables(db))))
