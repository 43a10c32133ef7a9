"""Per-key limits that hold exactly across workers and instances sharing one database.

Requests are counted in fixed windows aligned to the epoch (a `60/minute` key gets 60
per clock minute), by a single ``INSERT … ON CONFLICT DO UPDATE … WHERE count < limit
RETURNING count``: the database serialises concurrent increments, so N workers can never
admit more than the limit between them. Concurrency slots are rows with a lease that
the holding process renews; a crashed worker's slots lapse within one lease.
Both checks run in one transaction, so a request refused by one consumes neither.
"""
import dataclasses
import logging
import math
import threading
import time

import peewee
from flask import g

from app.admission import gpu_quota, quota
from app.admission.holders import this_process
from app.errors import RateLimited
from app.limits import format_rate_limit
from app.store.batching import Gather
from app.store.db import db, forget_idle_connections, is_postgres
from app.store.models import (
    ApiKey,
    ConcurrencySlot,
    GpuReservation,
    QuotaReservation,
    RateCounter,
)

log = logging.getLogger(__name__)

# peewee's translation of driver errors into its own, as execute_sql() applies it.
_peewee_errors = peewee.__exception_wrapper__
# Seconds between retries of a slot release the database refused.
RETRY_SECONDS = 1.0
# PostgreSQL: a count (and a slot taken in its transaction) commits without waiting for
# the disk. Every worker and instance sees it at once all the same; only a crash of the
# database server can forget its last moments' counts (docs/http-api.md, Keys and limits). A commit
# that waits keeps the key's counter row locked through the flush (bench/: 1.04-1.07x).
ASYNC_COMMIT = "SET LOCAL synchronous_commit = off; "
# Stand-ins for one request's values in the cached counting statement (see _count_sql).
_KEY, _WINDOW, _LIMIT, _N = -7001, -7002, -7003, -7004


@dataclasses.dataclass
class Admission:
    """What admitting a request decided; becomes the X-RateLimit-* headers."""

    limit: int | None = None
    remaining: int | None = None
    reset_at: int | None = None
    slot_id: int | None = None

    def headers(self):
        if self.limit is None:
            return {}
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(self.remaining, 0)),
            "X-RateLimit-Reset": str(self.reset_at),
        }


class Limiter:
    def __init__(self, lease_seconds=60):
        self.lease_seconds = lease_seconds
        self.holder = this_process()
        self._held = set()
        # Quota reservations the keeper renews, as (table, id): token quotas'
        # (app/admission/quota.py) and GPU quotas' (app/admission/gpu_quota.py).
        self._reservations = set()
        self._unreleased = set()  # slots whose delete failed; the keeper retries them
        self._keeper = None
        self._lock = threading.Lock()
        self._count_sql_for = None  # the database _count_sql_cached was rendered for
        self._count_sql_cached = None
        self._counting = Gather(self._count_batch)  # groups: (key id, window)

    def admit(self, key, now=None, quota_reserved=False, gpu_reserved=False):
        """Count one request for `key` and take a concurrency slot, or raise 429.

        A quota key's request is refused once charged and reserved tokens reach the
        quota, unless it already reserved its tokens (app/admission/quota.py reserve());
        a GPU-quota key's, likewise, once its GPU seconds do (app/admission/gpu_quota.py).
        """
        now = time.time() if now is None else now
        admission = Admission()
        if key.token_quota and not quota_reserved:
            quota.check(key, now)
        if key.gpu_quota and not gpu_reserved:
            gpu_quota.check(key, now)
        if not key.rate_limit and not key.max_concurrent:
            return admission  # nothing to count: no write transaction, no lock
        if not key.max_concurrent:
            # Only a rate to count: its one statement is atomic by itself. Outside a
            # transaction it needs no BEGIN and COMMIT round trips, and holds the counter
            # row's lock for the statement alone, not until a COMMIT comes back (bench/:
            # 1.6x the throughput on PostgreSQL at 16 and 64 connections).
            self._count_together(key, now, admission)
            return admission
        with db.atomic():
            if key.max_concurrent and is_postgres():
                # Serialise this key's slot checks; SQLite's write lock already does.
                ApiKey.select(ApiKey.id).where(ApiKey.id == key.id).for_update().execute()
            if key.rate_limit:
                self._count(key, now, admission)
            if key.max_concurrent:
                admission.slot_id = self._take_slot(key, now, admission)
        if admission.slot_id is not None:
            self._hold(admission.slot_id)
        return admission

    def peek(self, key, now=None):
        """The key's current window, as the headers show it, without counting a request."""
        now = time.time() if now is None else now
        admission = Admission()
        if key.rate_limit:
            window = self._window(key, now, admission)
            used = (RateCounter.select(RateCounter.count)
                    .where((RateCounter.key == key.id) & (RateCounter.window_start == window))
                    .scalar()) or 0
            admission.remaining = max(0, key.rate_limit - used)  # a group may overshoot
        return admission

    @staticmethod
    def _window(key, now, admission):
        window = int(now // key.rate_period * key.rate_period)
        admission.limit = key.rate_limit
        admission.reset_at = window + key.rate_period
        return window

    def _count_sql(self):
        """The counting upsert's (sql, params), rendered by peewee once per database
        (on PostgreSQL after ASYNC_COMMIT).

        Building the statement costs several times what running it does (bench/: about
        0.2 ms a request on SQLite), and only its parameters change: they are the
        sentinels below, replaced with each request's values in _count().
        """
        if self._count_sql_for is not db.obj:
            query = (
                RateCounter.insert(key=_KEY, window_start=_WINDOW, count=_N)
                .on_conflict(
                    conflict_target=[RateCounter.key, RateCounter.window_start],
                    update={RateCounter.count: RateCounter.count + _N},
                    where=(RateCounter.count < _LIMIT),
                )
                .returning(RateCounter.count)
            )
            sql, params = query.sql()
            self._count_sql_cached = (ASYNC_COMMIT + sql if is_postgres() else sql), params
            self._count_sql_for = db.obj
        return self._count_sql_cached

    def _count(self, key, now, admission):
        """Count this request alone (inside the transaction that also takes a slot)."""
        window = self._window(key, now, admission)
        self._admit_from(key, now, admission, self._add(key, window, 1), 1, 0)

    def _count_together(self, key, now, admission):
        """Count this request, in one statement with those of the same key waiting now.

        While one statement for a key runs (a PostgreSQL round trip, a SQLite lock wait),
        that key's next requests gather behind it and are then counted by a single
        `count + n`, instead of queueing one by one on the counter row (app/store/batching.py).
        The database still adds every request it admits, so the limit holds across
        workers and instances; the statement's result says which of the n fit (the first).
        """
        window = self._window(key, now, admission)
        count, n, position = self._counting((key.id, window), key)
        self._admit_from(key, now, admission, count, n, position)

    def _count_batch(self, group, keys):
        """Add a batch of one key's requests to its window: (count after, n, position) each."""
        _, window = group
        count = self._add(keys[0], window, len(keys))
        return [(count, len(keys), position) for position in range(len(keys))]

    def _add(self, key, window, n):
        """Add n requests to the key's window; its count after, or None if it was full."""
        sql, params = self._count_sql()
        values = {_KEY: key.id, _WINDOW: window, _LIMIT: key.rate_limit, _N: n}
        cursor = db.execute_sql(sql, [values.get(p, p) for p in params])
        with _peewee_errors:  # sqlite3 reports a full disk only when the row is read
            row = next(iter(cursor), None)
        count = None if row is None else row[0]
        if count == n:
            # First requests of a new window: earlier windows of this key are history.
            RateCounter.delete().where(
                (RateCounter.key == key.id) & (RateCounter.window_start < window)
            ).execute()
        return count

    @staticmethod
    def _admit_from(key, now, admission, count, n, position):
        """Admit the request at `position` of the n counted together, or raise 429.

        The window held count - n before them; those past the limit are refused (the
        count keeps them, which only ever refuses more once a window is full).
        """
        used = None if count is None else count - n + position + 1
        if used is None or used > key.rate_limit:
            admission.remaining = 0
            retry = max(1, math.ceil(admission.reset_at - now))
            raise RateLimited(
                f"rate limit exceeded: key allows "
                f"{format_rate_limit(key.rate_limit, key.rate_period)}; retry in {retry} s",
                headers={"Retry-After": str(retry), **admission.headers()},
            )
        admission.remaining = key.rate_limit - used

    def _take_slot(self, key, now, admission):
        ConcurrencySlot.delete().where(
            (ConcurrencySlot.key == key.id) & (ConcurrencySlot.expires_at <= now)
        ).execute()
        busy = ConcurrencySlot.select().where(ConcurrencySlot.key == key.id).count()
        if busy >= key.max_concurrent:
            # No X-RateLimit-* here: this transaction's count is rolled back with the
            # refusal. The after-request hook reads the true figures.
            raise RateLimited(
                f"too many concurrent requests: key allows {key.max_concurrent} at a time; "
                "retry when one finishes",
                headers={"Retry-After": "1"}, refusal="concurrency",
            )
        return ConcurrencySlot.insert(
            key=key.id, holder=self.holder, expires_at=now + self.lease_seconds
        ).execute()

    def release(self, admission):
        """Give back the admission's concurrency slot; safe to call more than once.

        If the database cannot take the delete now, the slot is retried every second
        in the background, so the key is not held at its limit until the lease lapses.
        """
        slot_id, admission.slot_id = admission.slot_id, None
        if slot_id is None:
            return
        with self._lock:
            self._held.discard(slot_id)
        if not self._delete_slots([slot_id]):
            with self._lock:
                self._unreleased.add(slot_id)
            self._start_keeper()

    def _delete_slots(self, slot_ids):
        try:
            with db.connection_context():
                ConcurrencySlot.delete().where(ConcurrencySlot.id.in_(slot_ids)).execute()
            return True
        except Exception as exc:  # never fail a response for this; the keeper retries
            log.warning("could not release %d concurrency slot(s), retrying every %g s: %s",
                        len(slot_ids), self._keeper_interval, exc)
            forget_idle_connections()
            return False

    def _hold(self, slot_id):
        with self._lock:
            self._held.add(slot_id)
        self._start_keeper()

    def hold_reservation(self, reservation_id, table=QuotaReservation):
        """Renew a quota reservation's lease until let_go(): the request is running."""
        with self._lock:
            self._reservations.add((table, reservation_id))
        self._start_keeper()

    def let_go(self, reservation_id, table=QuotaReservation):
        """Stop renewing a reservation: its usage record, which settles it, is written next."""
        with self._lock:
            self._reservations.discard((table, reservation_id))

    def _start_keeper(self):
        with self._lock:
            if self._keeper is None or not self._keeper.is_alive():
                self._keeper = threading.Thread(
                    target=self._keep_forever, name="slot-keeper", daemon=True
                )
                self._keeper.start()

    @property
    def _keeper_interval(self):
        return min(RETRY_SECONDS, self.lease_seconds / 3)

    def _keep_forever(self):
        """Renew the leases of slots and reservations this process holds; retry releases
        that failed."""
        renewed_at = time.monotonic()
        while True:
            time.sleep(self._keeper_interval)
            with self._lock:
                held, unreleased = list(self._held), list(self._unreleased)
                reservations = list(self._reservations)
                if not held and not unreleased and not reservations:
                    self._keeper = None  # nothing to keep: the next slot starts a new one
                    return
            try:
                if unreleased and self._delete_slots(unreleased):
                    with self._lock:
                        self._unreleased.difference_update(unreleased)
                    log.info("released %d concurrency slot(s) once the database was back",
                             len(unreleased))
                if ((held or reservations)
                        and time.monotonic() - renewed_at >= self.lease_seconds / 3):
                    renewed_at = time.monotonic()
                    self.renew(held, reservations)
            except Exception as exc:  # the keeper stays, whatever failed: leases lapse without it
                log.warning("slot keeper: %s", exc)

    def renew(self, slot_ids, reservation_ids=()):
        try:
            with db.connection_context():
                for model, ids in ((ConcurrencySlot, slot_ids),
                                   *((table, [i for t, i in reservation_ids if t is table])
                                     for table in (QuotaReservation, GpuReservation))):
                    if ids:
                        model.update(expires_at=time.time() + self.lease_seconds).where(
                            model.id.in_(ids)).execute()
        except Exception as exc:
            log.warning("could not renew %d concurrency slot and %d quota reservation "
                        "leases: %s", len(slot_ids), len(reservation_ids), exc)
            forget_idle_connections()


def init_app(app):
    limiter = app.extensions["limiter"] = Limiter(app.config["SETTINGS"].slot_lease_seconds)
    quota.init_app(app)
    gpu_quota.init_app(app)

    @app.after_request
    def _rate_limit_headers(response):
        """Every answer to a limited key says where it stands, refusals included."""
        key = g.get("key")
        if key is not None and key.rate_limit and "X-RateLimit-Limit" not in response.headers:
            try:
                response.headers.update(limiter.peek(key).headers())
            except peewee.PeeweeException:
                pass  # the response itself already says what went wrong
        return response
