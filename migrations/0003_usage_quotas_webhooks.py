"""Usage records and their hourly roll-up, token quotas, webhooks and their outbox."""
from peewee import (
    BigAutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    CompositeKey,
    DateTimeField,
    DoubleField,
    ForeignKeyField,
    IntegerField,
    Model,
    SmallIntegerField,
    TextField,
)

BUCKETS = ("25", "50", "100", "250", "500", "1000", "2500", "5000", "10000", "30000", "60000",
           "120000", "300000", "inf")


def _tables(db):
    class Base(Model):
        class Meta:
            database = db

    class UsageLabel(Base):
        name = CharField(max_length=255, unique=True)

        class Meta:
            table_name = "usage_label"

    class UsageRecord(Base):
        id = BigAutoField()
        at = DoubleField(index=True)
        key_id = IntegerField(null=True)
        endpoint_id = IntegerField()
        model_id = IntegerField(null=True)
        upstream_id = IntegerField(null=True)
        status = SmallIntegerField()
        refusal = SmallIntegerField(default=0)
        prompt_tokens = IntegerField(null=True)
        completion_tokens = IntegerField(null=True)
        latency_ms = IntegerField()
        ttfb_ms = IntegerField(null=True)
        eval_ms = IntegerField(null=True)
        bytes = BigIntegerField(default=0)
        aborted = BooleanField(default=False)

        class Meta:
            table_name = "usage_record"
            indexes = ((("key_id", "at"), False),)

    class UsageHourly(Base):
        hour = BigIntegerField()
        key_id = IntegerField()
        model_id = IntegerField()
        endpoint_id = IntegerField()
        requests = IntegerField(default=0)
        errors = IntegerField(default=0)
        refusals = IntegerField(default=0)
        aborted = IntegerField(default=0)
        prompt_tokens = BigIntegerField(default=0)
        completion_tokens = BigIntegerField(default=0)
        bytes = BigIntegerField(default=0)
        latency_ms_sum = BigIntegerField(default=0)
        ttfb_ms_sum = BigIntegerField(default=0)
        ttfb_count = IntegerField(default=0)
        eval_ms_sum = BigIntegerField(default=0)
        eval_tokens = BigIntegerField(default=0)

        class Meta:
            table_name = "usage_hourly"
            primary_key = CompositeKey("hour", "key_id", "model_id", "endpoint_id")

    for prefix in ("latency", "ttfb"):
        for bound in BUCKETS:
            UsageHourly._meta.add_field(f"{prefix}_le_{bound}", IntegerField(default=0))

    class TokenUsage(Base):
        key_id = IntegerField()
        period_start = BigIntegerField()
        tokens = BigIntegerField(default=0)

        class Meta:
            table_name = "token_usage"
            primary_key = CompositeKey("key_id", "period_start")

    class Webhook(Base):
        url = TextField()
        events = TextField()
        secret = CharField(max_length=128)
        include_prompt = BooleanField(default=False)
        created_at = DateTimeField()

        class Meta:
            table_name = "webhook"

    class WebhookDelivery(Base):
        webhook = ForeignKeyField(Webhook, on_delete="CASCADE")
        message_id = CharField(max_length=64, unique=True)
        event = CharField(max_length=64)
        payload = TextField()
        state = CharField(max_length=16, default="pending")
        attempts = IntegerField(default=0)
        next_attempt_at = DoubleField()
        claimed_until = DoubleField(null=True)
        last_status = IntegerField(null=True)
        last_error = TextField(null=True)
        created_at = DoubleField()
        delivered_at = DoubleField(null=True)

        class Meta:
            table_name = "webhook_delivery"
            indexes = ((("state", "next_attempt_at"), False),)

    class WebhookAttempt(Base):
        delivery = ForeignKeyField(WebhookDelivery, on_delete="CASCADE")
        at = DoubleField()
        status = IntegerField(null=True)
        error = TextField(null=True)
        duration_ms = IntegerField()

        class Meta:
            table_name = "webhook_attempt"

    return [UsageLabel, UsageRecord, UsageHourly, TokenUsage, Webhook, WebhookDelivery,
            WebhookAttempt]


def up(migrator, db):
    migrator.migrate(
        migrator.add_column("api_key", "token_quota", BigIntegerField(null=True)),
        migrator.add_column("api_key", "token_period", CharField(max_length=8, null=True)),
    )
    db.create_tables(_tables(db))


def down(migrator, db):
    db.drop_tables(list(reversed(_tables(db))))
    migrator.migrate(
        migrator.drop_column("api_key", "token_period"),
        migrator.drop_column("api_key", "token_quota"),
    )
