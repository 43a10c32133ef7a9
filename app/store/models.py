"""The tables. Times that limits compare are epoch seconds; times people read are UTC."""
import datetime
import secrets

import peewee

from app.store.db import db


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
    # Prompt + completion tokens allowed per `token_period` ('day' or 'month', UTC); NULL: none.
    token_quota = peewee.BigIntegerField(null=True)
    token_period = peewee.CharField(max_length=8, null=True)
    # GPU seconds allowed per `gpu_period` ('day' or 'month', UTC); NULL: none
    # (app/admission/gpu_quota.py).
    gpu_quota = peewee.IntegerField(null=True)
    gpu_period = peewee.CharField(max_length=8, null=True)
    # Model policy (app/admission/model_policy.py): caps on num_ctx and on the answer's length
    # (num_predict, max_tokens), NULL for none; whether the key may set keep_alive.
    max_ctx = peewee.IntegerField(null=True)
    max_predict = peewee.IntegerField(null=True)
    allow_keep_alive = peewee.BooleanField(default=True)
    # Share of an upstream's slots when keys wait for them (app/admission/fair_queue.py): 2 gets
    # twice the requests of 1.
    priority = peewee.IntegerField(default=1)
    # Cloud models and web search (app/proxy/cloud.py): 'allow', 'deny', or NULL for the
    # setting cloud_default, so that changing the setting reaches the key.
    cloud = peewee.CharField(max_length=8, null=True)
    # Comma-separated model names or fnmatch patterns; NULL allows every model.
    models = peewee.TextField(null=True)
    expires_at = peewee.DateTimeField(null=True)
    created_at = peewee.DateTimeField(default=utcnow)
    last_used_at = peewee.DateTimeField(null=True)
    revoked_at = peewee.DateTimeField(null=True)


# A name finds one key: names are unique among keys that are not revoked (app/keys/registry.py,
# migration 0013); revoked keys keep theirs for the record.
ApiKey.add_index(ApiKey.index(ApiKey.name, unique=True, where=ApiKey.revoked_at.is_null(),
                              name="api_key_name_live"))


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


# Upper bounds (ms) of the latency and time-to-first-byte histograms kept per hour; the
# last bucket takes everything slower. Percentiles in statistics are read from these.
LATENCY_BUCKETS_MS = (25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000,
                      300000)


def bucket_columns(prefix):
    return [f"{prefix}_le_{bound}" for bound in LATENCY_BUCKETS_MS] + [f"{prefix}_le_inf"]


class UsageLabel(BaseModel):
    """A name usage rows refer to by id (an endpoint, a model, an upstream): rows stay slim."""

    name = peewee.CharField(max_length=255, unique=True)


class UsageRecord(BaseModel):
    """One request as it ended, refusals included: ids and numbers only."""

    id = peewee.BigAutoField()
    at = peewee.DoubleField(index=True)  # epoch seconds when the request arrived
    key_id = peewee.IntegerField(null=True)  # NULL: refused before a key was known
    endpoint_id = peewee.IntegerField()
    model_id = peewee.IntegerField(null=True)
    upstream_id = peewee.IntegerField(null=True)
    status = peewee.SmallIntegerField()
    refusal = peewee.SmallIntegerField(default=0)  # app.accounting.usage.REFUSALS; 0: not refused
    prompt_tokens = peewee.IntegerField(null=True)  # NULL: not known (an aborted stream)
    completion_tokens = peewee.IntegerField(null=True)
    latency_ms = peewee.IntegerField()
    ttfb_ms = peewee.IntegerField(null=True)
    eval_ms = peewee.IntegerField(null=True)  # Ollama's eval_duration: tokens per second
    bytes = peewee.BigIntegerField(default=0)
    aborted = peewee.BooleanField(default=False)
    # True: prompt_tokens is the gateway's estimate (app/admission/estimate.py), as the answer ended
    # without Ollama's counts. NULL on rows older instances write: exact or unknown.
    prompt_estimated = peewee.BooleanField(null=True)
    # GPU time (app/accounting/gpu.py): seconds of the whole GPU, the model load's part of
    # them; NULL: no local GPU used (refused, never sent, cloud) or an older instance's row.
    gpu_seconds = peewee.DoubleField(null=True)
    load_seconds = peewee.DoubleField(null=True)
    # True: it ran on ollama.com (a cloud model, web search: app/proxy/cloud.py). NULL on rows
    # older instances write: local.
    cloud = peewee.BooleanField(null=True)

    class Meta:
        indexes = ((("key_id", "at"), False), (("cloud", "at"), False))


class UsageHourly(BaseModel):
    """Usage summed per hour, key, model and endpoint: statistics read this, not raw rows."""

    hour = peewee.BigIntegerField()  # epoch seconds at the start of the hour (UTC)
    key_id = peewee.IntegerField()  # 0: no key
    model_id = peewee.IntegerField()  # 0: no model
    endpoint_id = peewee.IntegerField()
    requests = peewee.IntegerField(default=0)
    errors = peewee.IntegerField(default=0)  # answered with a status >= 400, not refused
    refusals = peewee.IntegerField(default=0)
    aborted = peewee.IntegerField(default=0)
    prompt_tokens = peewee.BigIntegerField(default=0)
    completion_tokens = peewee.BigIntegerField(default=0)
    bytes = peewee.BigIntegerField(default=0)
    latency_ms_sum = peewee.BigIntegerField(default=0)
    ttfb_ms_sum = peewee.BigIntegerField(default=0)
    ttfb_count = peewee.IntegerField(default=0)
    eval_ms_sum = peewee.BigIntegerField(default=0)
    eval_tokens = peewee.BigIntegerField(default=0)  # completion tokens of rows with eval_ms
    gpu_seconds = peewee.DoubleField(default=0)  # GPU time, model loads included
    load_seconds = peewee.DoubleField(default=0)

    class Meta:
        primary_key = peewee.CompositeKey("hour", "key_id", "model_id", "endpoint_id")
        indexes = ((("key_id", "hour"), False),)  # one key's hours (its dashboard page)


for _column in bucket_columns("latency") + bucket_columns("ttfb"):
    UsageHourly._meta.add_field(_column, peewee.IntegerField(default=0))


class UsageHourlyModel(BaseModel):
    """UsageHourly summed over keys and endpoints: weeks of charts by model read few rows."""

    hour = peewee.BigIntegerField()
    model_id = peewee.IntegerField()

    class Meta:
        primary_key = peewee.CompositeKey("hour", "model_id")


class UsageDailyKey(BaseModel):
    """UsageHourly summed per UTC day and key: who used what over weeks, in few rows."""

    day = peewee.BigIntegerField()  # epoch seconds at 00:00 UTC
    key_id = peewee.IntegerField()

    class Meta:
        primary_key = peewee.CompositeKey("day", "key_id")


for _field in UsageHourly._meta.sorted_fields:
    if _field.name in ("hour", "key_id", "model_id", "endpoint_id"):
        continue  # the grouping columns; the rest are the sums each roll-up keeps
    for _model in (UsageHourlyModel, UsageDailyKey):
        _model._meta.add_field(_field.name, type(_field)(default=0))


class UsageHistogram(BaseModel):
    """Latency and first-byte histograms of the roll-ups, sparse: one row per bucket used.

    `grain` says which roll-up a row belongs to (HISTOGRAM_GRAINS); the columns a grain
    does not group by are 0. `bucket` is app/accounting/histogram.py's; APPROXIMATE (-1) counts
    requests whose bucket was rebuilt from the coarse columns (their rows were pruned).
    """

    grain = peewee.SmallIntegerField()
    time = peewee.BigIntegerField()  # the hour, or the day for the daily grain
    key_id = peewee.IntegerField()
    model_id = peewee.IntegerField()
    endpoint_id = peewee.IntegerField()
    metric = peewee.SmallIntegerField()  # HISTOGRAM_METRICS
    bucket = peewee.IntegerField()
    count = peewee.BigIntegerField(default=0)

    class Meta:
        primary_key = peewee.CompositeKey("grain", "time", "key_id", "model_id", "endpoint_id",
                                          "metric", "bucket")
        indexes = ((("grain", "key_id", "time"), False),)  # one key's hours (its page)


# Which roll-up a histogram row sums: UsageHourly's groups, UsageHourlyModel's, UsageDailyKey's,
# and per day and model (the overview's figures over weeks: a day's buckets, not 24 hours').
HISTOGRAM_GRAINS = {"hourly": 1, "hourly_model": 2, "daily_key": 3, "daily_model": 4}
HISTOGRAM_METRICS = {"latency": 1, "ttfb": 2}


class TokenUsage(BaseModel):
    """Tokens a key used in one quota period; charged as its usage is written."""

    key_id = peewee.IntegerField()
    period_start = peewee.BigIntegerField()
    tokens = peewee.BigIntegerField(default=0)

    class Meta:
        primary_key = peewee.CompositeKey("key_id", "period_start")


class QuotaReservation(BaseModel):
    """Tokens a request running now may use, held against its key's quota (app/admission/quota.py).

    Deleted in the transaction that charges the request's real tokens; a crashed
    worker's rows lapse at expires_at, which the holder renews while the request runs.
    """

    key_id = peewee.IntegerField()
    period_start = peewee.BigIntegerField()
    tokens = peewee.BigIntegerField()
    holder = peewee.CharField(max_length=128)  # host:pid of the worker with the request
    expires_at = peewee.DoubleField()

    class Meta:
        indexes = ((("key_id", "period_start"), False),)


class GpuUsage(BaseModel):
    """GPU seconds a key used in one GPU-quota period; charged as its usage is written."""

    key_id = peewee.IntegerField()
    period_start = peewee.BigIntegerField()
    seconds = peewee.DoubleField(default=0)

    class Meta:
        primary_key = peewee.CompositeKey("key_id", "period_start")


class GpuReservation(BaseModel):
    """GPU seconds a request running now may use, held against its key's GPU quota
    (app/admission/gpu_quota.py); deleted when its real GPU time is charged, or lapsed."""

    key_id = peewee.IntegerField()
    period_start = peewee.BigIntegerField()
    seconds = peewee.DoubleField()
    holder = peewee.CharField(max_length=128)
    expires_at = peewee.DoubleField()

    class Meta:
        indexes = ((("key_id", "period_start"), False),)


class Webhook(BaseModel):
    """A receiver of events. Its signing secret is shown once, when it is added.

    Its id is never given to another webhook after it is removed (SQLite: AUTOINCREMENT,
    migrations/0011_webhook_ids.py).
    """

    url = peewee.TextField()
    events = peewee.TextField()  # comma-separated event types
    secret = peewee.CharField(max_length=128)  # whsec_… (Standard Webhooks)
    include_prompt = peewee.BooleanField(default=False)
    created_at = peewee.DateTimeField(default=utcnow)


class WebhookDelivery(BaseModel):
    """One event for one webhook: stored with the change that caused it (an outbox)."""

    webhook = peewee.ForeignKeyField(Webhook, on_delete="CASCADE")
    message_id = peewee.CharField(max_length=64, unique=True)  # the webhook-id header
    event = peewee.CharField(max_length=64)
    payload = peewee.TextField()  # the JSON body, fixed when the event happened
    state = peewee.CharField(max_length=16, default="pending")  # pending, delivered, failed
    attempts = peewee.IntegerField(default=0)
    next_attempt_at = peewee.DoubleField()
    claimed_until = peewee.DoubleField(null=True)  # a sender owns it until then
    last_status = peewee.IntegerField(null=True)
    last_error = peewee.TextField(null=True)
    created_at = peewee.DoubleField()
    delivered_at = peewee.DoubleField(null=True)

    class Meta:
        indexes = ((("state", "next_attempt_at"), False),)


class WebhookAttempt(BaseModel):
    """Every attempt to deliver, with what came of it."""

    delivery = peewee.ForeignKeyField(WebhookDelivery, on_delete="CASCADE")
    at = peewee.DoubleField()
    status = peewee.IntegerField(null=True)  # NULL: no HTTP answer (refused, timed out)
    error = peewee.TextField(null=True)
    duration_ms = peewee.IntegerField()


class UpstreamStatus(BaseModel):
    """One worker's view of one upstream, rewritten as it refreshes (`ollama-gw upstreams`)."""

    holder = peewee.CharField(max_length=128)  # host:pid of the worker
    upstream = peewee.CharField(max_length=255)  # the upstream's name
    up = peewee.BooleanField()
    in_flight = peewee.IntegerField()
    updated_at = peewee.DoubleField()

    class Meta:
        primary_key = peewee.CompositeKey("holder", "upstream")


class QueueEntry(BaseModel):
    """A request waiting for, or holding, one of an upstream's slots.

    app/admission/fair_queue.py owns the rows.
    """

    # Random, so that a worker knows its entry's id before the insert (app/admission/fair_queue.py).
    id = peewee.BigIntegerField(primary_key=True, default=lambda: secrets.randbits(62))
    upstream = peewee.CharField(max_length=255, index=True)  # the upstream's name
    key_id = peewee.IntegerField()
    holder = peewee.CharField(max_length=128)  # host:pid of the worker with the request
    start_tag = peewee.DoubleField()  # fair order: the smallest waiting tag goes next
    finish_tag = peewee.DoubleField()
    enqueued_at = peewee.DoubleField()
    granted_at = peewee.DoubleField(null=True)  # NULL: still waiting
    expires_at = peewee.DoubleField()  # the holder renews it; past it, the entry is ignored


class AuditEntry(BaseModel):
    """One admin action (app/store/audit.py): who, through what, from where, what changed."""

    at = peewee.DateTimeField(index=True)
    actor = peewee.CharField(max_length=200)  # a key prefix and name, or an OS user
    via = peewee.CharField(max_length=16)  # http, cli, shell
    source = peewee.CharField(max_length=255)  # client address or host name
    action = peewee.CharField(max_length=64)
    target = peewee.CharField(max_length=255, null=True)  # e.g. "key 7 (ogw_9cRSO_FS)"
    details = peewee.TextField(null=True)  # JSON: before/after of settings, never a secret


class UiSession(BaseModel):
    """A dashboard sign-in (app/ui/session.py): its cookie names it; sign-out deletes it."""

    id = peewee.CharField(max_length=64, primary_key=True)  # SHA-256 of the cookie's session id
    key = peewee.ForeignKeyField(ApiKey, on_delete="CASCADE")
    created_at = peewee.DoubleField()
    expires_at = peewee.DoubleField(index=True)


class SigninFailure(BaseModel):
    """A failed dashboard sign-in from a client address (app/ui/throttle.py)."""

    address = peewee.CharField(max_length=64)
    at = peewee.DoubleField(index=True)

    class Meta:
        indexes = ((("address", "at"), False),)


MODELS = [ApiKey, RateCounter, ConcurrencySlot, Heartbeat, UsageLabel, UsageRecord,
          UsageHourlyModel, UsageDailyKey,
          UsageHourly, UsageHistogram, TokenUsage, Webhook, WebhookDelivery, WebhookAttempt,
          UpstreamStatus, AuditEntry, QueueEntry, UiSession, SigninFailure, QuotaReservation,
          GpuUsage, GpuReservation]
