"""Webhooks: who receives which events, and the outbox events are written to.

An event is stored as one WebhookDelivery row per subscribed webhook by `enqueue()`,
inside the caller's transaction: the change and the news of it commit together or not
at all, so no event is lost to a crash and none is sent for a change that rolled back.
app/webhooks/delivery.py sends the rows. Receivers verify them the Standard Webhooks way
(https://www.standardwebhooks.com/) with the secret `add_webhook()` returns once.
"""
import base64
import contextlib
import datetime
import json
import logging
import secrets
import threading
import time

import peewee

from app.store import audit
from app.store.db import db
from app.store.ids import whole_number
from app.store.models import Webhook, WebhookDelivery
from app.webhooks import target as webhook_target

log = logging.getLogger(__name__)

EVENTS = ("request.completed", "ratelimit.exceeded", "quota.exceeded", "quota.warning",
          "key.created", "key.revoked", "key.rotated")
# Sent only by `ollama-gw webhooks test`, to the one webhook tested, whatever it subscribes to.
TEST_EVENT = "webhook.test"
ALL = "*"
# go-ollama-api's payload fields, for webhooks that ask for prompts (include_prompt).
PROMPT_FIELDS = ("prompt", "stream", "images", "raw")
# Longer prompts are cut (and say so): a payload is a database row and an HTTP body.
MAX_PROMPT_CHARS = 100_000
# Seconds a process trusts its cached list of webhooks; one added elsewhere (the CLI, another
# instance) receives events from at most this long after it was added.
CACHE_SECONDS = 2.0
# Called after deliveries are queued: app/webhooks/delivery.py adds the one that wakes this
# process's dispatcher. It imports this module, so this module cannot import it.
ENQUEUE_LISTENERS = []


class WebhookOpError(ValueError):
    """A webhook operation cannot be done; the message says why."""


@contextlib.contextmanager
def connection():
    """Use this greenlet's open connection, or open one for the block and give it back.

    Not db.connection_context(), which closes the connection even when the caller (a
    request, a CLI command) had it open and still needs it.
    """
    if not db.is_closed():
        yield
        return
    with db.connection_context():
        yield


def new_secret():
    """A Standard Webhooks signing secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def new_message_id():
    """The webhook-id header: unique per event and webhook, the same on every retry."""
    return "msg_" + secrets.token_urlsafe(18)


def parse_events(events):
    """`e1,e2` or a list -> a tuple of known event names (or `*`); None means all six."""
    if events is None:
        return EVENTS
    items = events.split(",") if isinstance(events, str) else list(events)
    names = tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
    if not names:
        raise WebhookOpError(f"give at least one event: {', '.join(EVENTS)}, or * for all")
    unknown = [name for name in names if name not in EVENTS and name != ALL]
    if unknown:
        raise WebhookOpError(f"unknown event(s) {', '.join(unknown)}: known events are "
                             f"{', '.join(EVENTS)}, or * for all of them")
    return (ALL,) if ALL in names else names


def check_url(url, deny_networks=webhook_target.DEFAULT_DENY_NETWORKS):
    """The URL, stripped, if deliveries may be sent to it; else a WebhookOpError saying why."""
    try:
        return webhook_target.check_url(url, deny_networks)
    except webhook_target.TargetError as exc:
        raise WebhookOpError(str(exc)) from None


def _without_query(url):
    """A URL as the audit log keeps it: without its query, which may hold a token."""
    return url.split("?", 1)[0]


def add_webhook(url, events=None, include_prompt=False,
                deny_networks=webhook_target.DEFAULT_DENY_NETWORKS):
    """Register a receiver; return (row, secret). The secret is shown to people only now.

    Give `deny_networks` from the settings (webhook_deny_networks).
    """
    url = check_url(url, deny_networks)
    names = parse_events(events)
    secret = new_secret()
    with db.atomic():
        row = Webhook.create(url=url, events=",".join(names), secret=secret,
                             include_prompt=bool(include_prompt))
        audit.record("webhook.added", f"webhook {row.id}", after={
            "url": _without_query(url), "events": names,
            "include_prompt": bool(include_prompt)})
    subscriptions.invalidate()
    return row, secret


def parse_id(ident, what="webhook"):
    """An id as people type it (app/store/ids.py), or a WebhookOpError that says what went wrong."""
    text = str(ident).strip()
    value = whole_number(text)
    if value is None and not (text.isascii() and text.isdigit()):
        listing = "list" if what == "webhook" else "deliveries"
        raise WebhookOpError(f"a {what} is named by its id (a number), not {text!r}: "
                             f"see `ollama-gw webhooks {listing}`")
    if not value:
        raise WebhookOpError(f"no {what} with id {text}")
    return value


def find_webhook(ident):
    """The webhook with this id, or a WebhookOpError."""
    text = str(ident).strip()
    row = Webhook.get_or_none(Webhook.id == parse_id(text))
    if row is None:
        raise WebhookOpError(f"no webhook with id {text}")
    return row


def remove_webhook(ident):
    """Delete a webhook and its deliveries, sent or not; return the row as it was."""
    row = find_webhook(ident)
    with db.atomic():
        row.delete_instance()  # deliveries and attempts go with it (ON DELETE CASCADE)
        audit.record("webhook.removed", f"webhook {row.id}",
                     before={"url": _without_query(row.url)})
    subscriptions.invalidate()
    return row


def list_webhooks():
    return list(Webhook.select().order_by(Webhook.id))


def delivery_counts():
    """{webhook id: {state: number of deliveries}} of events, not counting tests."""
    counts = {}
    query = (WebhookDelivery.select(WebhookDelivery.webhook, WebhookDelivery.state,
                                    peewee.fn.COUNT(WebhookDelivery.id).alias("n"))
             .where(WebhookDelivery.event != TEST_EVENT)  # a test is not an event's delivery
             .group_by(WebhookDelivery.webhook, WebhookDelivery.state).tuples())
    for webhook_id, state, n in query:
        counts.setdefault(webhook_id, {})[state] = n
    return counts


def event_names(row):
    return tuple(name for name in row.events.split(",") if name)


def webhook_summary(row, counts=None):
    """A webhook as scripts and tables see it: never its secret."""
    counts = counts or {}
    return {
        "id": row.id,
        "url": row.url,
        "events": list(event_names(row)),
        "include_prompt": bool(row.include_prompt),
        "created_at": row.created_at.replace(tzinfo=datetime.timezone.utc).isoformat(),
        "deliveries": {state: counts.get(state, 0) for state in ("pending", "delivered",
                                                                "failed")},
    }


class Subscriptions:
    """Each process's view of which webhook wants which event, re-read every CACHE_SECONDS.

    enqueue() runs for every request that ends; it must not read the webhook table each
    time. Changes made in this process (add, remove) are seen at once.
    """

    def __init__(self, max_age=CACHE_SECONDS):
        self.max_age = max_age
        self._lock = threading.Lock()
        self._state = (None, float("-inf"), ())  # (database, loaded at, hooks)

    def invalidate(self):
        with self._lock:
            self._state = (None, float("-inf"), ())

    def current(self):
        """[(id, frozenset of events, include_prompt)], fresh within max_age."""
        database, loaded_at, hooks = self._state
        if database is db.obj and time.monotonic() - loaded_at < self.max_age:
            return hooks
        loaded_at = time.monotonic()
        with connection():  # only a reload needs the database; a fresh view needs nothing
            rows = list(Webhook.select(Webhook.id, Webhook.events,
                                       Webhook.include_prompt).tuples())
        hooks = tuple((id_, frozenset(events.split(",")), bool(include_prompt))
                      for id_, events, include_prompt in rows)
        with self._lock:
            self._state = (db.obj, loaded_at, hooks)
        return hooks

    def subscribers(self, event):
        return [(id_, with_prompt) for id_, events, with_prompt in self.current()
                if event in events or ALL in events]


subscriptions = Subscriptions()


def wants_prompts():
    """Whether any webhook asks for prompt text (usage accounting keeps it only then).

    Cached like enqueue()'s view; if the database cannot be read, the last answer stands.
    """
    try:
        return any(with_prompt for _, _, with_prompt in subscriptions.current())
    except peewee.PeeweeException as exc:
        log.warning("could not read the webhook list: %s", exc)
        return any(with_prompt for _, _, with_prompt in subscriptions._state[2])


def prompt_fields(prompt):
    """go-ollama-api's fields from `prompt`: prompt text (capped), stream, image count, raw."""
    fields = {name: prompt.get(name) for name in PROMPT_FIELDS if name in prompt}
    if isinstance(fields.get("images"), (list, tuple)):
        fields["images"] = len(fields["images"])
    text = fields.get("prompt")
    if isinstance(text, str) and len(text) > MAX_PROMPT_CHARS:
        fields["prompt"] = text[:MAX_PROMPT_CHARS]
        fields["prompt_truncated"] = True
    return fields


def payload(event, data, now=None):
    """The JSON body receivers get: {"type", "timestamp" (ISO 8601 UTC), "data"}."""
    when = datetime.datetime.fromtimestamp(time.time() if now is None else now,
                                           datetime.timezone.utc)
    return json.dumps({"type": event, "timestamp": when.isoformat().replace("+00:00", "Z"),
                       "data": data}, separators=(",", ":"), ensure_ascii=False, default=str)


def enqueue(event, data, *, prompt=None, now=None):
    """Store `event` for every webhook subscribed to it; return how many deliveries.

    Call it inside the transaction that makes the change the event reports: it opens none
    of its own, so both commit or roll back together. `data` must never hold a key's
    secret (give key_id and key_prefix). `prompt` is a dict of go-ollama-api's fields
    (prompt, stream, images, raw); only webhooks with include_prompt receive it.
    """
    if event not in EVENTS:
        raise ValueError(f"unknown webhook event {event!r}")
    targets = subscriptions.subscribers(event)
    if not targets:
        return 0
    now = time.time() if now is None else now
    plain = payload(event, data, now)
    with_prompt = None
    if prompt and any(wants for _, wants in targets):
        with_prompt = payload(event, {**data, **prompt_fields(prompt)}, now)
    WebhookDelivery.insert_many([
        {"webhook": webhook_id, "message_id": new_message_id(), "event": event,
         "payload": with_prompt if wants and with_prompt else plain,
         "next_attempt_at": now, "created_at": now}
        for webhook_id, wants in targets
    ]).execute()
    for listener in ENQUEUE_LISTENERS:
        listener()
    return len(targets)


# Usage records become these events (app/accounting/usage.py stores them with the batch).
USAGE_EVENTS = {None: "request.completed", "rate": "ratelimit.exceeded",
                "concurrency": "ratelimit.exceeded", "quota": "quota.exceeded",
                "gpu_quota": "quota.exceeded"}
# What quota.exceeded's `kind` says ran out: a token quota or a GPU-time one.
QUOTA_KINDS = {"quota": "tokens", "gpu_quota": "gpu_time"}


def enqueue_usage(records):
    """The events a batch of usage records stands for; call inside the batch's transaction."""
    for r in records:
        event = USAGE_EVENTS.get(r.refusal, False)
        if event and subscriptions.subscribers(event):
            enqueue(event, usage_event_data(r), prompt=r.prompt, now=r.at)
        if r.quota_warning is not None and subscriptions.subscribers("quota.warning"):
            enqueue("quota.warning", quota_warning_data(r), now=r.at)


def usage_event_data(r):
    """What request.completed and the *.exceeded events say: the key's id and prefix, never
    the key; what was asked, what it cost, how long it took."""
    data = {"key_id": r.key_id, "key_prefix": r.key_prefix, "key_name": r.key_name,
            "endpoint": r.endpoint, "model": r.model, "status": r.status,
            "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "latency_ms": r.latency_ms, "ttfb_ms": r.ttfb_ms, "bytes": r.bytes,
            "aborted": r.aborted, "upstream": r.upstream,
            "gpu_seconds": r.gpu_seconds}
    if r.refusal:
        data["reason"] = r.refusal
    if r.refusal in QUOTA_KINDS:
        data["kind"] = QUOTA_KINDS[r.refusal]
    return data


def quota_warning_data(r):
    """What quota.warning says: the key, its quota and period, the tokens used now."""
    return {"key_id": r.key_id, "key_prefix": r.key_prefix, "key_name": r.key_name,
            "token_quota": r.token_quota, "period": r.quota_period,
            "tokens_used": r.quota_warning, "warning_at": r.quota_warning_at}


def key_event_data(row, **extra):
    """What key.* events say about a key: who it is, never its secret or hash."""
    return {"key_id": row.id, "key_prefix": row.prefix, "key_name": row.name,
            "role": row.role, **extra}
