"""Each upstream serves at most its max_concurrent requests; the rest wait here, fairly.

Ollama serves a few requests at once and queues the rest in arrival order, so one
script's hundreds of requests make everyone else wait behind them. The gateway keeps
that queue itself, and serves it by start-time fair queueing: a key's requests are
tagged one after another (S = max(V, the key's last finish tag), F = S + 1/priority,
V the newest start tag being served), and a free slot goes to the smallest tag. A key
with one request waiting goes ahead of another key's 200th; a key that has been idle
starts level with the requests being served, not ahead by the time it was away.

The queue is rows in the database (queue_entry), so every worker and gateway instance
sees one queue per upstream. Each change to an upstream's queue runs under one lock
(PostgreSQL: an advisory lock; SQLite: its write lock), and whoever frees a slot grants
the next. Entries carry a lease the holding worker renews: a crashed worker's entries lapse.

The granted request starts at once, wherever it waits. Once the grant is committed,
the worker that made it wakes the request's worker: itself directly; another worker of
this host (same pid namespace) by a datagram carrying the entry's id, on a Unix socket in
Linux's abstract namespace named after that worker (`ollama-gw-queue/pidns.boot:pid`,
app/admission/holders.py), which each worker's keeper reads; on PostgreSQL, workers of
other hosts from the NOTIFY the grant sends, whose payload names the grants (migration
0015). The database stays the source of truth: a wake-up lost on the way (a full socket
buffer, a gateway of the release before) is caught by the keeper's sweep, a read of the
waiting entries every SWEEP_SECONDS.
"""
import collections
import contextlib
import dataclasses
import functools
import logging
import math
import os
import secrets
import select
import socket
import struct
import threading
import time
import zlib

import peewee

from app import metrics
from app.admission.holders import here, this_process
from app.cooperative import pause
from app.errors import DATABASE_ERRORS, GatewayError, RateLimited
from app.store.batching import Gather
from app.store.db import db, forget_idle_connections, is_postgres
from app.store.models import QueueEntry

log = logging.getLogger(__name__)

CHANNEL = "ollama_gw_queue"
# How often a worker with requests waiting reads whether they were granted (by PostgreSQL
# or not): a safety net under the wake-ups, for one lost on the way...
SWEEP_SECONDS = {False: 0.25, True: 1.0}
# ...and the only way to learn of a grant from another worker when this one has no wake
# socket (not Linux, or its name taken).
POLL_SECONDS = {False: 0.02, True: 0.25}
# A worker's wake socket: this, then its holder name past the host (abstract namespace).
WAKE_PREFIX = b"\0ollama-gw-queue/"
_ID = struct.Struct("<q")  # an entry id in a wake datagram
_IDS_PER_DATAGRAM = 64
# Grants heard of before their request began to wait for them, remembered (at most).
EARLY_GRANTS = 1024
# How often a worker with requests waiting re-runs the grant itself: a slot freed by a
# worker that crashed lapses with its lease, and no one else would notice.
DISPATCH_SECONDS = 1.0
# Endpoints that make Ollama run a model: only these wait for a slot.
QUEUED_PATHS = frozenset({
    "/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/v1/chat/completions",
    "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages",
    "/v1/images/generations", "/v1/images/edits", "/v1/audio/transcriptions"})


# Statements every model request runs, written once: peewee would build each anew, at
# several times the cost of running it (the queue's CPU per request halved on SQLite).
# _ENTER reads the upstream's queue and inserts the request's entry in one statement:
# running at once if a slot is free and no one waits; none if the key's share is full.
_ENTER = (
    "INSERT INTO queue_entry (id, upstream, key_id, holder, start_tag, finish_tag, enqueued_at, "
    "granted_at, expires_at) "
    "SELECT {p}, {p}, {p}, {p}, s.start, s.start + {p}, {p}, "
    "CASE WHEN s.running < {p} AND s.waiting = 0 THEN {p} END, {p} FROM ("
    "SELECT CASE WHEN {p} = 1 THEN {greatest}("
    "COALESCE(MAX(CASE WHEN granted_at IS NOT NULL THEN start_tag END), 0), "
    "COALESCE(MAX(CASE WHEN key_id = {p} THEN finish_tag END), 0)) ELSE {p} END AS start, "
    "COALESCE(SUM(CASE WHEN granted_at IS NOT NULL THEN 1 ELSE 0 END), 0) AS running, "
    "COALESCE(SUM(CASE WHEN granted_at IS NULL THEN 1 ELSE 0 END), 0) AS waiting, "
    "COALESCE(SUM(CASE WHEN granted_at IS NULL AND key_id = {p} THEN 1 ELSE 0 END), 0) AS mine "
    "FROM queue_entry WHERE upstream = {p} AND expires_at > {p}) s "
    "WHERE s.running < {p} OR s.mine < {p}")
_ENTER_RETURNING = _ENTER + " RETURNING granted_at"  # SQLite: whether it runs now
# Leaving: the entries go, and the statement says how many others run and wait.
# (The entries deleted are left out by id: SQLite does not say whether a subquery in
# RETURNING sees the table before or after the rows it deletes.)
_DELETE = ("DELETE FROM queue_entry WHERE id IN ({ids}) RETURNING "
           "(SELECT COUNT(*) FROM queue_entry q WHERE q.upstream = {{p}} "
           "AND q.granted_at IS NOT NULL AND q.expires_at > {{p}} AND q.id NOT IN ({ids})), "
           "(SELECT COUNT(*) FROM queue_entry q WHERE q.upstream = {{p}} "
           "AND q.granted_at IS NULL AND q.expires_at > {{p}} AND q.id NOT IN ({ids}))")
# PostgreSQL: entering and leaving are functions (migrations/0008_fair_queue.py), each
# holding the upstream's lock only while the server works. A batch is one statement, one
# round trip: ORDER BY n makes PostgreSQL call the functions in the batch's order (the
# plan keeps unnest's order and sorts nothing), and each call sees what those before wrote.
_PG_ENTER = ("SELECT n, ollama_gw_queue_enter(id, %s, key_id, %s, step, arrived, %s, %s, %s, %s, "
             "%s) FROM unnest(%s::bigint[], %s::bigint[], %s::float8[], %s::float8[]) "
             "WITH ORDINALITY AS e(id, key_id, step, arrived, n) ORDER BY n")
_PG_LEAVE = ("SELECT ollama_gw_queue_leave(id, %s, %s, %s, %s, %s) "
             "FROM unnest(%s::bigint[]) WITH ORDINALITY AS e(id, n) ORDER BY n")
# Migration 0015's: the same, and it says whom it granted (in its NOTIFY too).
_PG_LEAVE_GRANTS = _PG_LEAVE.replace("ollama_gw_queue_leave(", "ollama_gw_queue_leave_grants(")
_PG_HAS_GRANTS = ("SELECT to_regprocedure('ollama_gw_queue_leave_grants(bigint, text, integer, "
                  "double precision, bigint, text)') IS NOT NULL")
# SQLite: the n waiting entries with the smallest start tags run (in a transaction
# under the write lock; PostgreSQL's functions grant for themselves).
_GRANT = ("UPDATE queue_entry SET granted_at = {p} WHERE id IN (SELECT id FROM queue_entry "
          "WHERE upstream = {p} AND granted_at IS NULL AND expires_at > {p} "
          "ORDER BY start_tag, id LIMIT {p}) RETURNING id, holder, start_tag")
_GRANTED = "SELECT granted_at FROM queue_entry WHERE id = {p}"
_STATE = ("SELECT COALESCE(SUM(CASE WHEN granted_at IS NOT NULL THEN 1 ELSE 0 END), 0), "
          "COALESCE(SUM(CASE WHEN granted_at IS NULL THEN 1 ELSE 0 END), 0) "
          "FROM queue_entry WHERE upstream = {p} AND expires_at > {p}")


@functools.lru_cache(maxsize=256)
def _sql(statement, param, postgres):
    return statement.format(p=param, greatest="GREATEST" if postgres else "MAX")


@functools.lru_cache(maxsize=64)
def _delete(n):
    """_DELETE for n entries."""
    return _DELETE.format(ids=", ".join("{p}" for _ in range(n)))


def _run(statement, params):
    """Run one of the statements above with this database's parameter mark (each is
    written out once, not on every call: its text never changes)."""
    return db.execute_sql(_sql(statement, db.obj.param, is_postgres()), params)


def _lock_id(upstream):
    return zlib.crc32(b"ollama-gw queue " + upstream.encode())


# What entering the queue came to.
RUNS_NOW, RUNS_AFTER_A_WAIT, WAITS = "runs now", "runs after a wait", "waits"


class QueueTimeout(GatewayError):
    status, kind = 503, "service_unavailable"
    refusal = "queue_timeout"


@dataclasses.dataclass
class Ticket:
    """A request's place at an upstream: running once acquire() returned it."""

    entry_id: int | None  # None once released
    upstream: str
    cap: int
    waited: float  # seconds spent waiting for the slot
    granted: float = dataclasses.field(default_factory=time.monotonic)  # when it got it


class _Wait:
    """A request waiting for a slot: under one entry id in FairQueue._waits, or several."""

    def __init__(self):
        self.event = threading.Event()
        self.lost = False  # the entry vanished (its lease lapsed): no slot will come
        self.granted_ids = set()  # which of its entries were granted, before event is set


def _parse_grants(text):
    """[(entry id, holder)] from `<id>:<holder> <id>:<holder> ...` (0015's format)."""
    grants = []
    for item in (text or "").split(" "):
        entry_id, _, holder = item.partition(":")
        if entry_id.isdigit() and holder:
            grants.append((int(entry_id), holder))
    return grants


# queue_fair = "gpu_time": a key new to an upstream is tagged as if its requests took
# this long until its own have been timed; a tag never advances by less than MIN_STEP.
FIRST_ESTIMATE_SECONDS, MIN_STEP = 1.0, 0.001


class FairQueue:
    def __init__(self, lease_seconds=60, per_key=64, max_wait=300.0, fair="gpu_time"):
        self.lease_seconds = lease_seconds
        mode = {True: "gpu_time", False: "off"}.get(fair, fair)
        self.fair = mode != "off"  # off: first come, first served (bench/fair_queue.py compares)
        self.by_time = mode == "gpu_time"
        self._timing = GpuTimeTags()
        self.per_key = per_key
        self.max_wait = max_wait
        self.holder = this_process()
        self._lock = threading.Lock()
        self._held = {}  # entry id -> (upstream, cap), waiting or running here
        self._waits = {}  # entry id -> _Wait
        self._unreleased = {}  # entry id -> (upstream, cap) whose release failed
        self._wake = threading.Event()  # a request started waiting: look more often
        self._woken = 0  # requests of this worker woken by a grant, so far
        self._early = collections.OrderedDict()  # entry id -> None: granted, not yet waiting
        self._inbox = None  # this worker's wake socket, bound before its first entry
        self._inbox_tried_at = -math.inf
        self._sender = None  # the socket wake-ups to other workers leave from
        self._grants_function = None  # PostgreSQL: whether migration 0015's exists (cached)
        self._look_now = False  # an old gateway's NOTIFY, without the grants: read them
        self._keeper = None
        self._listener = None  # PostgreSQL connection LISTENing on CHANNEL
        self._listen_failed = False  # said once per outage
        self._warned_at = -math.inf
        self._entering = Gather(self._enter_batch)  # groups: (upstream, cap)
        # A freed slot idles until its release runs: no pause to gather others first.
        self._leaving = Gather(self._leave_batch, eager=True)

    # -- the request's side

    def acquire(self, upstream, cap, key, watch=None):
        """Take a slot at `upstream`, waiting in the fair queue while it has `cap` running.

        429 if the key already has `per_key` requests waiting there, 503 after
        `max_wait` seconds; a client hang-up (through `watch`) leaves the queue at once.
        None, and no wait, while the database is unreachable.
        """
        started, entry_id = time.monotonic(), secrets.randbits(62)
        try:
            granted = self._enqueue(entry_id, upstream, cap, key)
        except DATABASE_ERRORS as exc:
            self._timing.ran(entry_id, upstream, None)
            # Without the database the queue cannot be shared: the request goes on
            # uncounted, and Ollama queues it as it would without a gateway. Its entry,
            # if it was made, is deleted once the database answers again.
            forget_idle_connections()
            with self._lock:
                self._unreleased[entry_id] = (upstream, cap)
            self._start_keeper()
            if time.monotonic() >= self._warned_at + 10:
                self._warned_at = time.monotonic()
                log.warning("the fair queue cannot reach the database; requests go to "
                            "Ollama without waiting their turn until it is back: %s", exc)
            return None
        self._hold(entry_id, upstream, cap)
        if granted != WAITS:
            waited = 0.0 if granted == RUNS_NOW else time.monotonic() - started
            metrics.TALLY.observe_queue_wait(upstream, key.prefix, waited)
            return Ticket(entry_id, upstream, cap, waited)
        wait = _Wait()
        self._expect(entry_id, wait)
        waiting = metrics._child(metrics.QUEUE_WAITING, upstream, key.prefix)
        waiting.inc()
        try:
            with watch.waiting() if watch is not None else contextlib.nullcontext():
                wait.event.wait(self.max_wait)
        except BaseException:
            self._release(entry_id, upstream, cap)
            raise
        finally:
            waiting.dec()
            metrics.TALLY.observe_queue_wait(upstream, key.prefix, time.monotonic() - started)
            with self._lock:
                self._waits.pop(entry_id, None)
        if wait.lost or not wait.event.is_set():
            self._release(entry_id, upstream, cap)
            retry = max(1, math.ceil(self.max_wait / 10))
            raise QueueTimeout(
                f"upstream {upstream} stayed busy: waited {time.monotonic() - started:.0f} s "
                f"for one of its {cap} slots (queue_max_wait_seconds {self.max_wait:g}); "
                f"retry in {retry} s", headers={"Retry-After": str(retry)})
        return Ticket(entry_id, upstream, cap, time.monotonic() - started)

    def acquire_any(self, choices, key, watch=None, elsewhere=False):
        """A slot at whichever of `choices` [(upstream, cap)], best first, has one first.

        (index in choices, Ticket): the first choice with a slot free runs at once; if
        none has, the request waits in every choice's queue and runs where a slot is
        granted first, leaving the other queues (a slot granted to it there too is handed
        on at once). `elsewhere`: the request may also go to an upstream without a cap,
        so rather than wait it gets (None, None). (0, None) while the database is
        unreachable, as acquire() does.

        A key waiting in two queues at once takes no more than its share in either:
        its place in each is tagged as usual, and the tag of the entry it leaves goes
        with the entry.
        """
        if len(choices) == 1 and not elsewhere:
            return 0, self.acquire(*choices[0], key, watch)
        started, entered, refused = time.monotonic(), [], None
        try:
            for i, (upstream, cap) in enumerate(choices):
                entry_id = secrets.randbits(62)
                try:
                    granted = self._enqueue(entry_id, upstream, cap, key)
                except RateLimited as exc:  # its share of this queue is full: the others
                    refused = exc
                    continue
                self._hold(entry_id, upstream, cap)
                if granted != WAITS:
                    self._leave_all(entered)
                    waited = 0.0 if granted == RUNS_NOW else time.monotonic() - started
                    metrics.TALLY.observe_queue_wait(upstream, key.prefix, waited)
                    return i, Ticket(entry_id, upstream, cap, waited)
                entered.append((i, entry_id))
        except DATABASE_ERRORS:
            self._timing.ran(entry_id, upstream, None)
            with self._lock:  # it may have been made: deleted once the database answers
                self._unreleased[entry_id] = (upstream, cap)
            self._leave_all(entered)
            return 0, self.acquire(*choices[0], key, watch)  # which goes on without a queue
        except BaseException:
            self._leave_all(entered)
            raise
        if not entered:
            raise refused
        if elsewhere:
            self._leave_all(entered)
            return None, None
        return self._wait_for_any(choices, entered, key, watch, started)

    def _wait_for_any(self, choices, entered, key, watch, started):
        wait, all_ids = _Wait(), [entry_id for _, entry_id in entered]
        for entry_id in all_ids:
            self._expect(entry_id, wait)
        first = choices[entered[0][0]][0]
        waiting = metrics._child(metrics.QUEUE_WAITING, first, key.prefix)
        waiting.inc()
        deadline, winner = started + self.max_wait, None
        try:
            with watch.waiting() if watch is not None else contextlib.nullcontext():
                while entered and winner is None:
                    if not wait.event.wait(max(0.0, deadline - time.monotonic())):
                        break
                    wait.event.clear()  # before the look: a grant after it wakes it again
                    with self._lock:
                        heard = [(i, e) for i, e in entered if e in wait.granted_ids]
                    if heard:  # the wake-up said which: no need to ask the database
                        winner = heard[0]
                        break
                    with db.connection_context():  # a lapse, or a grant the sweep found
                        rows = dict(QueueEntry.select(QueueEntry.id, QueueEntry.granted_at)
                                    .where(QueueEntry.id.in_([e for _, e in entered])).tuples())
                    self._leave_all([(i, e) for i, e in entered if e not in rows])  # lapsed
                    entered = [(i, e) for i, e in entered if e in rows]
                    winner = next(((i, e) for i, e in entered if rows[e] is not None), None)
        except BaseException:
            self._leave_all(entered)
            raise
        finally:
            waiting.dec()
            with self._lock:
                for entry_id in all_ids:
                    self._waits.pop(entry_id, None)
        waited = time.monotonic() - started
        metrics.TALLY.observe_queue_wait(first, key.prefix, waited)
        self._leave_all([(i, e) for i, e in entered if (i, e) != winner])
        if winner is None:
            names = ", ".join(choices[i][0] for i, _ in entered) or first
            retry = max(1, math.ceil(self.max_wait / 10))
            raise QueueTimeout(
                f"upstreams {names} stayed busy: waited {waited:.0f} s for a slot "
                f"(queue_max_wait_seconds {self.max_wait:g}); retry in {retry} s",
                headers={"Retry-After": str(retry)})
        i, entry_id = winner
        return i, Ticket(entry_id, choices[i][0], choices[i][1], waited)

    def _leave_all(self, entered):
        for _, entry_id in entered:
            upstream, cap = self._held.get(entry_id) or (None, None)
            if upstream is not None:
                self._release(entry_id, upstream, cap)

    def release(self, ticket):
        """Free the ticket's slot and grant it to the next waiting request.

        Raises nothing but what interrupts this greenlet (a kill, during its yield), and
        does nothing the second time for one ticket. If the slot went
        to a request of this worker, that one is let go first (under gevent): otherwise
        it would wait, its slot idle, while this one records its usage and sends its
        answer (0.8 ms a hand-off, bench/queue_handoff.py).
        """
        if ticket is not None and ticket.entry_id is not None:
            entry_id, ticket.entry_id = ticket.entry_id, None
            self._timing.ran(entry_id, ticket.upstream, time.monotonic() - ticket.granted)
            woken = self._woken
            self._release(entry_id, ticket.upstream, ticket.cap)
            if self._woken != woken:
                pause()

    def _release(self, entry_id, upstream, cap):
        self._timing.ran(entry_id, upstream, None)  # never ran (release() said if it did)
        with self._lock:
            self._held.pop(entry_id, None)
            self._early.pop(entry_id, None)
        try:
            self._leaving((upstream, cap), entry_id)
        except Exception as exc:  # the keeper retries; the lease bounds the damage
            log.warning("could not free a queue slot at %s, retrying every second: %s",
                        upstream, exc)
            forget_idle_connections()
            with self._lock:
                self._unreleased[entry_id] = (upstream, cap)
            self._start_keeper()

    # -- the database

    @staticmethod
    def _state(upstream, now):
        """(running, waiting) at the upstream (SQLite; PostgreSQL's functions read their own)."""
        running, waiting = _run(_STATE, (upstream, now)).fetchone()
        return int(running), int(waiting)

    def _enqueue(self, entry_id, upstream, cap, key):
        """Insert the request's entry: RUNS_NOW, RUNS_AFTER_A_WAIT or WAITS.

        Requests that arrive while another enters the same upstream's queue enter
        together, after it, in one round trip (app/store/batching.py), each with the time it
        arrived (first come, first served orders by it).
        """
        step = self._timing.step(key.id, upstream, entry_id) if self.by_time else 1.0
        step /= max(1, key.priority or 1)
        self._open_inbox()  # before the entry exists: no wake-up for it can miss the socket
        outcome = self._entering((upstream, cap), (entry_id, key.id, step, time.time()))
        if outcome < 0:
            self._timing.ran(entry_id, upstream, None)
            raise RateLimited(
                f"queue full: this key already has {self.per_key} requests waiting for "
                f"upstream {upstream} (queue_per_key); retry when one is answered",
                headers={"Retry-After": "1"}, refusal="queue_full")
        if outcome:
            return RUNS_NOW
        # Waiting. A slot may be free all the same, if one lapsed: grant what is due (or a
        # slot freed meanwhile was granted to it).
        with db.connection_context():
            self._dispatch(upstream, cap, time.time())
            row = _run(_GRANTED, (entry_id,)).fetchone()
        # No row: the entry is gone already (lapsed and swept); it waits, and the keeper's
        # next look finds it lost and ends the wait with a 503.
        return RUNS_AFTER_A_WAIT if row is not None and row[0] is not None else WAITS

    def _enter_batch(self, group, entries):
        """Enter [(entry id, key id, step, arrived)] in order: 1 runs now, 0 waits, -1 full.

        One round trip: a function call per entry in one statement on PostgreSQL; on
        SQLite one statement each, under one turn at the write lock.
        """
        upstream, cap = group
        with db.connection_context():
            if is_postgres():
                ids, keys, steps, arrived = (list(c) for c in zip(*entries, strict=True))
                rows = db.execute_sql(_PG_ENTER, (
                    upstream, self.holder, cap, self.lease_seconds, self.fair, self.per_key,
                    _lock_id(upstream), ids, keys, steps, arrived)).fetchall()
                return [outcome for _, outcome in rows]
            with db.atomic() if len(entries) > 1 else contextlib.nullcontext():
                return [self._enter_sqlite(upstream, cap, *entry) for entry in entries]

    def _enter_sqlite(self, upstream, cap, entry_id, key_id, step, now):
        with peewee.__exception_wrapper__:  # sqlite3 reports some errors on reading
            row = _run(_ENTER_RETURNING, (
                entry_id, upstream, key_id, self.holder, step, now, cap, now,
                now + self.lease_seconds, int(self.fair), key_id, now, key_id, upstream,
                now, cap, self.per_key)).fetchone()
        return -1 if row is None else int(row[0] is not None)

    def _leave_batch(self, group, entry_ids):
        """Leave the upstream's queue with a batch of entries (see _leave)."""
        upstream, cap = group
        with db.connection_context():
            self._leave(entry_ids, upstream, cap, time.time())
        return [None] * len(entry_ids)

    def _leave(self, entry_ids, upstream, cap, now):
        """Delete the entries (none: []) and grant free slots to the next waiting requests.

        Whoever was granted one hears of it: through NOTIFY on PostgreSQL (this worker
        too), directly or by its poll on SQLite.
        """
        if is_postgres():
            params = (upstream, cap, now, _lock_id(upstream), CHANNEL, list(entry_ids) or [None])
            if not self._has_grants_function():
                db.execute_sql(_PG_LEAVE, params).fetchall()
                return
            try:
                rows = db.execute_sql(_PG_LEAVE_GRANTS, params).fetchall()
            except peewee.ProgrammingError:
                self._grants_function = None  # the migration was reverted: ask again
                raise
            self._announce([grant for (text,) in rows for grant in _parse_grants(text)])
            return
        # One transaction: the counts the delete returns are read under the write lock
        # it took, and the grant commits with it (one commit per slot handed on).
        if not entry_ids:  # a look for lapsed slots: the write lock only if one is free
            running, waiting = self._state(upstream, now)
            if not waiting or running >= cap:
                return
        state, grants = None, []
        with db.atomic():
            if entry_ids:
                with peewee.__exception_wrapper__:
                    state = _run(_delete(len(entry_ids)), (
                        *entry_ids, upstream, now, *entry_ids, upstream, now,
                        *entry_ids)).fetchone()
            if state is None:  # nothing to delete, or it was gone (lapsed): look all the same
                state = self._state(upstream, now)
            running, waiting = state
            if waiting and running < cap:
                grants = self._grant(upstream, cap - running, now)
        self._announce(grants)

    def _dispatch(self, upstream, cap, now):
        """Grant free slots to waiting entries (a slot that lapsed frees no one)."""
        self._leave([], upstream, cap, now)

    def _grant(self, upstream, n, now):
        """Grant the n waiting entries with the smallest start tags; [(id, holder)] in that
        order, the order they are woken in (SQLite returns the rows in its own)."""
        rows = sorted(_run(_GRANT, (now, upstream, now, n)).fetchall(),
                      key=lambda row: (row[2], row[0]))
        return [(entry_id, holder) for entry_id, holder, _ in rows]

    def _has_grants_function(self):
        """Whether migration 0015's function is there (asked once; a database not yet
        upgraded gets 0008's, and its waiting workers learn of grants by reading)."""
        if self._grants_function is None:
            self._grants_function = bool(db.execute_sql(_PG_HAS_GRANTS).fetchone()[0])
        return self._grants_function

    def _announce(self, grants):
        """After the commit: wake the granted [(entry id, holder)] of this host.

        This worker's directly; another worker's by a datagram to its socket, without
        waiting: whatever goes wrong (no such socket, its buffer full) its sweep covers.
        Workers elsewhere hear it from PostgreSQL's NOTIFY.
        """
        mine, others = [], {}
        for entry_id, holder in grants:
            if holder == self.holder:
                mine.append(entry_id)
            elif (name := here(holder)) is not None:
                others.setdefault(name, []).append(entry_id)
        if mine:
            self._deliver(mine)
        for name, entry_ids in others.items():
            self._send(WAKE_PREFIX + name.encode(), entry_ids)

    def _send(self, address, entry_ids):
        try:
            if self._sender is None:
                sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sender.setblocking(False)
                self._sender = sender
            for at in range(0, len(entry_ids), _IDS_PER_DATAGRAM):
                self._sender.sendto(b"".join(_ID.pack(entry_id) for entry_id in
                                             entry_ids[at:at + _IDS_PER_DATAGRAM]), address)
        except OSError:
            pass  # the sweep catches it

    def _deliver(self, entry_ids):
        """These entries of this worker were granted: their requests go on.

        A grant heard of before its request waits for it (the wake-up can overtake the
        return of the statement that entered it) is kept for _expect().
        """
        with self._lock:
            for entry_id in entry_ids:
                wait = self._waits.get(entry_id)
                if wait is None:
                    self._early[entry_id] = None
                    if len(self._early) > EARLY_GRANTS:
                        self._early.popitem(last=False)
                    continue
                wait.granted_ids.add(entry_id)
                wait.event.set()
                self._woken += 1

    def _expect(self, entry_id, wait):
        """Have `wait` woken when entry `entry_id` is granted (at once if it was already)."""
        with self._lock:
            self._waits[entry_id] = wait
            if entry_id in self._early:
                del self._early[entry_id]
                wait.granted_ids.add(entry_id)
                wait.event.set()
        self._wake.set()

    # -- the wake socket

    def _open_inbox(self):
        """Bind this worker's wake socket, once (a failure is retried now and then)."""
        if self._inbox is not None or time.monotonic() < self._inbox_tried_at + 10:
            return
        self._inbox_tried_at = time.monotonic()
        name = here(self.holder)
        if name is None or not hasattr(socket, "SO_PASSCRED"):
            return
        inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            inbox.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            inbox.bind(WAKE_PREFIX + name.encode())
            inbox.setblocking(False)
        except OSError as exc:  # e.g. another queue of this process has the name (tests)
            inbox.close()
            log.info("queue: no wake socket (%s); reading for grants every %g s instead",
                     exc, POLL_SECONDS[is_postgres()])
            return
        with self._lock:
            if self._inbox is None:
                self._inbox = inbox
                return
        inbox.close()

    def _read_inbox(self):
        """Deliver the entry ids datagrams brought, from processes of this user only."""
        entry_ids = []
        creds = socket.CMSG_SPACE(struct.calcsize("3i"))
        while True:
            try:
                data, ancillary, _, _ = self._inbox.recvmsg(4096, creds)
            except (BlockingIOError, InterruptedError):
                break
            sender = next((struct.unpack("3i", d[:12]) for level, kind, d in ancillary
                           if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                           and len(d) >= 12), None)
            if sender is None or sender[1] != os.getuid():
                continue
            entry_ids += [entry_id for (entry_id,) in
                          _ID.iter_unpack(data[:len(data) - len(data) % _ID.size])]
        if entry_ids:
            self._deliver(entry_ids)

    # -- the keeper: leases, grants from elsewhere, lapsed slots, failed releases

    def _hold(self, entry_id, upstream, cap):
        with self._lock:
            self._held[entry_id] = (upstream, cap)
        self._start_keeper()

    def _start_keeper(self):
        keeper = self._keeper
        if keeper is not None and keeper.is_alive():
            return  # the usual case under load: no lock taken
        with self._lock:
            if self._keeper is None or not self._keeper.is_alive():
                self._keeper = threading.Thread(target=self._keep, name="queue-keeper",
                                                daemon=True)
                self._keeper.start()

    def _keep(self):
        renewed_at = dispatched_at = time.monotonic()
        looked_at = -math.inf
        while True:
            with self._lock:
                waiting = dict(self._waits)
                held, unreleased = dict(self._held), dict(self._unreleased)
                if not held and not unreleased:
                    self._keeper = None
                    self._close_listener()
                    return
            try:
                interval = (POLL_SECONDS if self._inbox is None else SWEEP_SECONDS)[is_postgres()]
                if waiting and (self._look_now or time.monotonic() - looked_at >= interval):
                    self._look_now = False
                    looked_at = time.monotonic()
                    self._look_for_grants(waiting)
                if waiting:
                    if time.monotonic() - dispatched_at >= DISPATCH_SECONDS:
                        dispatched_at = time.monotonic()
                        self.dispatch_all({held[i] for i in waiting if i in held})
                if unreleased:
                    self._retry_releases(unreleased)
                if time.monotonic() - renewed_at >= self.lease_seconds / 3:
                    renewed_at = time.monotonic()
                    self._renew(list(held))
                # At most a second: a keeper with nothing left to do stops soon after.
                self._pause(bool(waiting), min(looked_at + interval, time.monotonic() + 1.0))
            except Exception as exc:
                # Whatever failed (a query, the LISTEN connection's poll or select after
                # a database restart), the keeper stays: without it no waiting request
                # here would hear of its grant. The next pause LISTENs anew and the next
                # look re-reads the queue, so grants NOTIFYed meanwhile are not lost.
                log.warning("queue keeper: the database failed, retrying: %s", exc)
                forget_idle_connections()
                self._close_listener()
                time.sleep(1)

    def _pause(self, waiting, until):
        """Until the next sweep (`until`, monotonic), or a new waiting request while none
        waits: grants delivered as their wake-ups (datagrams, NOTIFYs) come in."""
        if not waiting:
            self._wake.wait(min(1.0, self.lease_seconds / 3))
            self._wake.clear()
            return
        self._wake.clear()
        listening = self._listener is not None
        listener = self._listen() if is_postgres() else None
        if listener is not None and not listening:
            self._look_now = True  # a grant made before LISTEN took effect sent no word
            return
        sources = [source for source in (self._inbox, listener) if source is not None]
        while not self._look_now and (timeout := until - time.monotonic()) > 0:
            if not sources:
                time.sleep(timeout)
                return
            ready = select.select(sources, [], [], timeout)[0]
            if self._inbox is not None and self._inbox in ready:
                self._read_inbox()
            if listener is not None and listener in ready:
                self._read_notifies(listener)

    def _read_notifies(self, listener):
        """Grants named in NOTIFYs (migration 0015's) go on; any other NOTIFY (a gateway
        of the release before, naming only the upstream) has the keeper read them."""
        listener.poll()
        mine = []
        while listener.notifies:
            payload = listener.notifies.pop(0).payload
            if payload.startswith("g:"):
                mine += [entry_id for entry_id, holder in _parse_grants(payload[2:])
                         if holder == self.holder]
            else:
                self._look_now = True
        if mine:
            self._deliver(mine)

    def _listen(self):
        if self._listener is None:
            conn = None
            try:
                import psycopg2

                conn = psycopg2.connect(database=db.obj.database, **db.obj.connect_params)
                conn.autocommit = True
                conn.cursor().execute(f"LISTEN {CHANNEL}")
                self._listener = conn
            except Exception as exc:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                if not self._listen_failed:
                    log.warning("queue: cannot LISTEN for grants, polling instead: %s", exc)
                self._listen_failed = True
                return None
            self._listen_failed = False
        return self._listener

    def _close_listener(self):
        conn, self._listener = self._listener, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _look_for_grants(self, waiting):
        with db.connection_context():
            rows = dict(QueueEntry.select(QueueEntry.id, QueueEntry.granted_at)
                        .where(QueueEntry.id.in_(list(waiting))).tuples())
        with self._lock:
            for entry_id, wait in waiting.items():
                if entry_id not in rows:
                    wait.lost = True
                elif rows[entry_id] is not None:
                    wait.granted_ids.add(entry_id)
                else:
                    continue
                wait.event.set()

    def dispatch_all(self, upstreams):
        """Grant the free slots of [(upstream, cap)].

        app/admission/holders.py calls this after freeing some.
        """
        with db.connection_context():
            for upstream, cap in upstreams:
                self._dispatch(upstream, cap, time.time())

    def _retry_releases(self, unreleased):
        by_upstream = {}
        for entry_id, upstream_cap in unreleased.items():
            by_upstream.setdefault(upstream_cap, []).append(entry_id)
        with db.connection_context():
            for (upstream, cap), entry_ids in by_upstream.items():
                for at in range(0, len(entry_ids), 500):  # within SQLite's parameter limit
                    self._leave(entry_ids[at:at + 500], upstream, cap, time.time())
                with self._lock:
                    for entry_id in entry_ids:
                        self._unreleased.pop(entry_id, None)
        log.info("cleared %d queue entr(y/ies) left by failed database calls, now that the "
                 "database answers", len(unreleased))

    def _renew(self, entry_ids):
        now = time.time()
        with db.connection_context():
            if entry_ids:
                QueueEntry.update(expires_at=now + self.lease_seconds).where(
                    QueueEntry.id.in_(entry_ids)).execute()
            # Entries of crashed workers are ignored once lapsed; this clears them away.
            QueueEntry.delete().where(QueueEntry.expires_at <= now).execute()


class GpuTimeTags:
    """What a request adds to its key's tag under queue_fair = "gpu_time": its GPU time.

    A request's cost is known only when it ends, but its tag is set when it enters the
    queue: so it is tagged with an estimate (the key's recent time per request at that
    upstream in this worker; for a key new there, that of the upstream's requests), and
    when it ends the difference between the time it held its slot and the estimate is
    added to the key's next request there. The difference carried is at most one
    request's estimate either way: tags live only while a key's requests wait, so what a
    key was over- or undercharged long ago says nothing about where it stands now, and
    an estimate that was far off (a key's first requests) is corrected by the estimate
    itself within a few requests. Per slot, not per GPU: an upstream's slot count is the
    same for every key waiting there, so it cancels out.
    """

    ALPHA = 0.3  # weight of the newest request in an estimate

    def __init__(self):
        self._estimate = {}  # (key id, upstream) or upstream -> seconds a request holds a slot
        self._owed = {}  # (key id, upstream) -> seconds its tags are behind (or ahead)
        self._pending = {}  # entry id -> (key id, estimate charged)

    def step(self, key_id, upstream, entry_id):
        """The tag step of a new request (before the key's priority divides it)."""
        at = (key_id, upstream)
        charged = self._estimate.get(at) or self._estimate.get(upstream) or \
            FIRST_ESTIMATE_SECONDS
        owed = max(-charged, min(charged, self._owed.pop(at, 0.0)))
        self._pending[entry_id] = (key_id, charged, owed)
        return max(MIN_STEP, charged + owed)

    def ran(self, entry_id, upstream, seconds):
        """The request ended after holding its slot `seconds` (None: it never ran, and what
        its key owed is owed by its next request: leaving the queue does not settle it)."""
        key_id, charged, owed = self._pending.pop(entry_id, (None, None, None))
        if key_id is None:
            return
        at = (key_id, upstream)
        if seconds is None:
            self._owed[at] = self._owed.get(at, 0.0) + owed
            return
        self._owed[at] = self._owed.get(at, 0.0) + seconds - charged
        for where in (at, upstream):
            old = self._estimate.get(where)
            self._estimate[where] = seconds if old is None else old + self.ALPHA * (seconds - old)


def snapshot(now=None):
    """[(upstream, key id, running, waiting, oldest wait in s)] of live entries, for the CLI."""
    now = time.time() if now is None else now
    rows = {}
    for upstream, key_id, granted_at, enqueued_at in (
            QueueEntry.select(QueueEntry.upstream, QueueEntry.key_id, QueueEntry.granted_at,
                              QueueEntry.enqueued_at)
            .where(QueueEntry.expires_at > now).tuples()):
        row = rows.setdefault((upstream, key_id), [0, 0, 0.0])
        if granted_at is None:
            row[1] += 1
            row[2] = max(row[2], now - enqueued_at)
        else:
            row[0] += 1
    return [(upstream, key_id, *row) for (upstream, key_id), row in sorted(rows.items())]


def init_app(app):
    settings = app.config["SETTINGS"]
    app.extensions["fair_queue"] = FairQueue(
        settings.slot_lease_seconds, settings.queue_per_key, settings.queue_max_wait_seconds,
        settings.queue_fair)
