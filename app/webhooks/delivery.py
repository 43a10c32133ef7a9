"""Sending stored webhook deliveries: claimed atomically, signed, retried, every attempt kept.

Every gunicorn worker of every instance runs a Dispatcher. A sender first *claims* due
deliveries in one statement that also counts the attempt and sets `claimed_until`
(PostgreSQL: `FOR UPDATE SKIP LOCKED`, so claimers never wait on or take each other's
rows; SQLite: the write lock of BEGIN IMMEDIATE serialises them). One claim is one
attempt is one HTTP request. A sender that dies mid-attempt leaves a claim that lapses
after webhook_timeout + CLAIM_MARGIN seconds, and the delivery is tried again.
Deliveries are therefore sent at least once; a receiver that must act only once
dedupes on the webhook-id header, as the Standard Webhooks spec advises.

Sends run in their own greenlets from a pool of webhook_concurrency, each bounded as a
whole by webhook_timeout (app/webhooks/transport.py): a receiver that is slow, failing or
hanging holds only those greenlets, never a client request.
"""
import dataclasses
import logging
import threading
import time

import peewee

from app import metrics
from app.cooperative import gevent_active
from app.store.db import db, forget_idle_connections, is_postgres
from app.store.models import Webhook, WebhookAttempt, WebhookDelivery
from app.webhooks import transport as webhook_http
from app.webhooks.outbox import (
    ENQUEUE_LISTENERS,
    TEST_EVENT,
    WebhookOpError,
    connection,
    new_message_id,
    payload,
)

log = logging.getLogger(__name__)

# Seconds between looks for due deliveries written by other processes and instances.
POLL_SECONDS = 1.0
# After a wake (an enqueue in this process, a sender done), wait this long before claiming,
# so one claim serves every sender freed meanwhile: while deliveries flow, claims are a
# few write transactions a second, not one per delivery.
COALESCE_SECONDS = 0.05
# Then look again this much later: the enqueue's transaction may not have committed at
# the first look.
COMMIT_GRACE_SECONDS = 0.2
# A claim outlives the attempt's own timeout by this much before another sender may retry.
CLAIM_MARGIN = 60.0
# Seconds attempts in flight get to finish when a worker stops; then they are cut, recorded
# as interrupted and retried later (by any worker).
STOP_SECONDS = 5.0
_running = None  # the Dispatcher of this process, if one runs (a gunicorn worker)


def wake_local_dispatcher():
    """Have this process's dispatcher look for new deliveries now rather than at its next poll."""
    if _running is not None:
        _running.wake()


ENQUEUE_LISTENERS.append(wake_local_dispatcher)


@dataclasses.dataclass(frozen=True)
class Claim:
    """A delivery this sender owns for one attempt."""

    id: int
    message_id: str
    event: str
    payload: str
    attempts: int  # including this one; also the claim's token (see record())
    url: str
    secret: str


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one attempt came to."""

    delivery_id: int
    message_id: str
    status: int | None
    error: str | None
    duration_ms: int
    state: str  # the delivery's state after it: delivered, pending (to retry) or failed

    @property
    def ok(self):
        return self.status is not None and 200 <= self.status < 300

    def describe(self):
        """`delivered: HTTP 200 in 12 ms`, or what went wrong."""
        answer = f"HTTP {self.status}" if self.status is not None else "no answer"
        text = f"{'delivered' if self.ok else 'failed'}: {answer} in {self.duration_ms} ms"
        detail = (self.error or "").removeprefix(answer).lstrip(": ").strip()
        if detail.startswith("(") and detail.endswith(")"):
            detail = detail[1:-1]
        return text + (f" ({detail})" if detail and not self.ok else "")


class Dispatcher:
    def __init__(self, settings):
        self.timeout = settings.webhook_timeout
        self.concurrency = settings.webhook_concurrency
        self.schedule = tuple(settings.webhook_retry_seconds)
        self.deny_networks = tuple(settings.webhook_deny_networks)
        self.lease = self.timeout + CLAIM_MARGIN
        self._wake = threading.Event()
        self._stopping = False
        self._loop = None
        self._pool = None

    # -- running in a gunicorn worker (gevent) --------------------------------------------

    def start(self):
        """Send deliveries in the background of this gevent worker until stop()."""
        global _running
        import gevent
        import gevent.pool

        self._pool = gevent.pool.Pool(self.concurrency)
        self._loop = gevent.spawn(self._run)
        _running = self

    def wake(self):
        self._wake.set()

    def stop(self, timeout=STOP_SECONDS):
        """Stop claiming; give attempts in flight `timeout` seconds, then cut and record them."""
        global _running
        if _running is self:
            _running = None
        self._stopping = True
        self._wake.set()
        if self._loop is not None:
            self._loop.join(timeout)
            self._loop.kill()
        if self._pool is not None and not self._pool.join(timeout):
            log.warning("stopping with %d webhook attempt(s) unanswered after %g s: recorded as "
                        "interrupted, to be retried", len(self._pool), timeout)
            self._pool.kill(timeout=timeout)  # each greenlet records its cut attempt

    def _run(self):
        while not self._stopping:
            try:
                self._fill()
                woken = self._wake.wait(POLL_SECONDS)
                if woken and not self._stopping:
                    time.sleep(COALESCE_SECONDS)  # gevent's, in a worker
                    self._wake.clear()
                    self._fill()
                    # The enqueue that woke us may commit a moment later: look once more
                    # soon, rather than at the next poll.
                    self._wake.wait(COMMIT_GRACE_SECONDS)
                    self._wake.clear()
            except Exception as exc:  # the database is down, say: keep going, quietly
                log.warning("webhook deliveries: cannot claim due deliveries: %s", exc)
                forget_idle_connections()
                self._wake.wait(POLL_SECONDS * 5)

    def _fill(self):
        """Claim as many due deliveries as there are free senders, and start them."""
        while not self._stopping:
            free = self._pool.free_count()
            if not free or not self.has_due():
                return
            claims = self.claim(free)
            for claim in claims:
                self._pool.spawn(self._attempt_in_background, claim)
            if len(claims) < free:
                return

    def _attempt_in_background(self, claim):
        try:
            self.deliver(claim)
        finally:
            self._wake.set()  # a sender is free: claim more if any are due

    # -- claiming -------------------------------------------------------------------------

    @staticmethod
    def _due(now):
        return ((WebhookDelivery.state == "pending") & (WebhookDelivery.next_attempt_at <= now)
                & (WebhookDelivery.claimed_until.is_null()
                   | (WebhookDelivery.claimed_until < now)))

    def has_due(self, now=None):
        """Whether any delivery is due: a cheap read, so idle polls take no write lock."""
        with connection():
            return WebhookDelivery.select(WebhookDelivery.id).where(
                self._due(time.time() if now is None else now)).limit(1).exists()

    def claim(self, limit, now=None):
        """Take up to `limit` due deliveries for one attempt each; return their Claims."""
        now = time.time() if now is None else now
        due = (WebhookDelivery.select(WebhookDelivery.id).where(self._due(now))
               .order_by(WebhookDelivery.next_attempt_at).limit(limit))
        if is_postgres():
            due = due.for_update(skip_locked=True)
        query = (WebhookDelivery
                 .update(attempts=WebhookDelivery.attempts + 1, claimed_until=now + self.lease)
                 .where(WebhookDelivery.id.in_(due))
                 .returning(WebhookDelivery.id, WebhookDelivery.webhook, WebhookDelivery.message_id,
                            WebhookDelivery.event, WebhookDelivery.payload,
                            WebhookDelivery.attempts))
        with connection(), db.atomic():
            rows = list(query.tuples().execute())
            hooks = {hook.id: hook for hook in Webhook.select().where(
                Webhook.id.in_(sorted({row[1] for row in rows})))} if rows else {}
        return [Claim(id_, message_id, event, body, attempts, hooks[hook_id].url,
                      hooks[hook_id].secret)
                for id_, hook_id, message_id, event, body, attempts in rows]

    # -- one attempt ----------------------------------------------------------------------

    def run_once(self, limit=None, now=None):
        """Claim due deliveries and send them one after another; return their Outcomes.

        For tests and the CLI; gunicorn workers send in the background instead.
        """
        return [self.deliver(claim) for claim in self.claim(limit or self.concurrency, now)]

    def deliver(self, claim):
        """Make the claimed attempt, record it, and return its Outcome."""
        started = time.time()
        clock = time.monotonic()
        status, error = None, None
        try:
            status, error = self.send(claim)
        except BaseException as exc:  # GreenletExit at shutdown, most likely
            if not isinstance(exc, Exception):
                error = "interrupted: the gateway stopped during the attempt"
                self.record(claim, started, None, error, _ms_since(clock))
                raise
            log.exception("webhook delivery %s: unexpected error", claim.message_id)
            error = f"gateway error: {type(exc).__name__}"
        return self.record(claim, started, status, error, _ms_since(clock))

    def send(self, claim):
        """POST the claim's payload, signed now; return (HTTP status or None, error or None)."""
        return webhook_http.post(claim.url, claim.message_id, claim.secret, claim.payload,
                                 self.timeout, self.deny_networks)

    def record(self, claim, at, status, error, duration_ms):
        """Keep the attempt and set what happens next: delivered, a retry, or failed."""
        ok = status is not None and 200 <= status < 300
        now = time.time()
        changes = {"last_status": status, "last_error": error, "claimed_until": None}
        if ok:
            changes.update(state="delivered", delivered_at=now)
        elif claim.event == TEST_EVENT or claim.attempts > len(self.schedule):
            changes["state"] = "failed"  # a test is not retried: its caller saw the answer
        else:
            changes["next_attempt_at"] = now + self.schedule[claim.attempts - 1]
        state = changes.get("state", "pending")
        metrics.WEBHOOK_ATTEMPTS.labels("delivered" if ok else "retry" if state == "pending"
                                        else "failed").inc()
        outcome = Outcome(claim.id, claim.message_id, status, error, duration_ms, state)
        try:
            with connection(), db.atomic():
                WebhookAttempt.insert(delivery=claim.id, at=at, status=status, error=error,
                                      duration_ms=duration_ms).execute()
                # `attempts` fences the update: if this claim lapsed and another sender took
                # the delivery, that sender's outcome is the one that counts.
                WebhookDelivery.update(changes).where(
                    (WebhookDelivery.id == claim.id) & (WebhookDelivery.attempts == claim.attempts)
                    & (WebhookDelivery.state == "pending")).execute()
        except peewee.IntegrityError:
            log.info("webhook delivery %s: its webhook was removed during the attempt",
                     claim.message_id)
        except peewee.PeeweeException as exc:
            # The receiver got (or did not get) it; the claim lapses and it is tried again.
            log.warning("webhook delivery %s: could not record the attempt (%s); it will be "
                        "retried when its claim lapses", claim.message_id, exc)
            forget_idle_connections()
        return outcome


def send_test(settings, webhook):
    """Store a `webhook.test` delivery for `webhook`, send it now, and return the Outcome.

    The delivery is stored already claimed, so no gateway's dispatcher sends it too. It
    is not retried: the person testing sees the answer, and a failure is left as failed.
    """
    dispatcher = Dispatcher(settings)
    now = time.time()
    data = {"webhook_id": webhook.id, "message": "a test event from `ollama-gw webhooks test`"}
    message_id = new_message_id()
    body = payload(TEST_EVENT, data, now)
    with connection(), db.atomic():
        delivery_id = WebhookDelivery.insert(
            webhook=webhook.id, message_id=message_id, event=TEST_EVENT, payload=body,
            attempts=1, next_attempt_at=now, claimed_until=now + dispatcher.lease,
            created_at=now).execute()
    claim = Claim(delivery_id, message_id, TEST_EVENT, body, 1, webhook.url, webhook.secret)
    return dispatcher.deliver(claim)


def retry_delivery(delivery_id):
    """Send a failed delivery again: pending now, with its attempts counted afresh.

    For the dashboard's Retry button and `ollama-gw webhooks retry`.
    """
    with connection():
        changed = (WebhookDelivery.update(state="pending", attempts=0,
                                          next_attempt_at=time.time(), claimed_until=None)
                   .where((WebhookDelivery.id == delivery_id)
                          & (WebhookDelivery.state == "failed")).execute())
        state = None if changed else WebhookDelivery.select(WebhookDelivery.state).where(
            WebhookDelivery.id == delivery_id).scalar()
    if not changed:
        raise WebhookOpError(f"no delivery with id {delivery_id}" if state is None else
                             f"delivery {delivery_id} is {state}: only a failed one is retried")
    wake_local_dispatcher()


def init_app(app):
    """Give the app its dispatcher; under gunicorn's gevent worker, start it.

    app/serving/gunicorn_conf.py's worker_exit stops it, so attempts in flight are recorded.
    """
    dispatcher = app.extensions["webhook_dispatcher"] = Dispatcher(app.config["SETTINGS"])
    if gevent_active():
        dispatcher.start()


def _ms_since(clock):
    return int((time.monotonic() - clock) * 1000)
