"""The tables. Times that limits compare are epoch seconds; times people read are UTC."""
import datetime

import peewee

from app.db import db


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class BaseModel(peewee.Model):
    class Meta:
        database = db
        legacy_table_names = False


class ApiKey(BaseModel):
    """A gateway key. Only the SHA-256 of the secret is kept; `prefix` names it safely."""

    prefix = peewee.CharField(max_length=32, unique=True)
    key_hash = peewee.CharField(max_length=64, unique=True)
    name = peewee.CharField(max_length=200)
    role = peewee.CharField(max_length=16, default="user")
    # Requests allowed per `rate_period` seconds; NULL means unlimited.
    rate_limit = peewee.IntegerField(null=True)
    rate_period = peewee.IntegerField(default=3600)
    max_concurrent = peewee.IntegerField(null=True)
    # Comma-separated model names or fnmatch patterns; NULL allows every model.
    models = peewee.TextField(null=True)
    expires_at = peewee.DateTimeField(null=True)
    created_at = peewee.DateTimeField(default=utcnow)
    last_used_at = peewee.DateTimeField(null=True)
    revoked_at = peewee.DateTimeField(null=True)


class RateCounter(BaseModel):
    """Requests admitted for a key in one fixed window; updated by one atomic upsert."""

    key = peewee.ForeignKeyField(ApiKey, on_delete="CASCADE")
    window_start = peewee.BigIntegerField()
    count = peewee.IntegerField(default=0)

    class Meta:
        primary_key = peewee.CompositeKey("key", "window_start")


class ConcurrencySlot(BaseModel):
    """A request in flight for a key with max_concurrent; it lapses unless renewed."""

    key = peewee.ForeignKeyField(ApiKey, on_delete="CASCADE")
    holder = peewee.CharField(max_length=128)
    expires_at = peewee.DoubleField(index=True)


class Heartbeat(BaseModel):
    """When each gateway process last wrote to the database: /health's proof that it can."""

    holder = peewee.CharField(max_length=128, primary_key=True)
    seen_at = peewee.DoubleField()


MODELS = [ApiKey, RateCounter, ConcurrencySlot, Heartbeat]
