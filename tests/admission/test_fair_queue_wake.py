"""A freed slot's grant reaches the waiting request at once (app/admission/fair_queue.py).

Two FairQueue objects in this process play two workers (each its own holder name, so its
own wake socket); the sweep, the keeper's read of the database, is set far off, so a
request served quickly was woken, not found by the sweep. The gateway-level figures are
bench/queue_handoff.py's.
"""
import itertools
import os
import socket
import struct
import threading
import time

import pytest

from app.admission import fair_queue
from app.admission.fair_queue import FairQueue, _Wait
from app.admission.holders import holder_for
from app.keys.registry import KeyInfo
from app.store import db as database
from app.store.db import is_postgres
from app.store.models import QueueEntry
from tests.gateway_process import wait_for

UPSTREAM = "gpu"
FAR = 60.0  # the sweep, when a test must not be rescued by it
_names = itertools.count()


def holder_here():
    """A holder name of this host no other queue (nor another test run here) has."""
    return holder_for(f"{os.getpid()}-{next(_names)}")


@pytest.fixture
def workers(migrated, monkeypatch):
    """workers(n, holders=None) -> n queues, each a worker of this host with its own socket."""
    monkeypatch.setattr(fair_queue, "SWEEP_SECONDS", {False: FAR, True: FAR})
    monkeypatch.setattr(fair_queue, "POLL_SECONDS", {False: FAR, True: FAR})
    monkeypatch.setattr(fair_queue, "DISPATCH_SECONDS", 600)
    made = []

    def make(n, holders=None):
        for holder in holders or [holder_here() for _ in range(n)]:
            queue = FairQueue(max_wait=120)
            queue.holder = holder
            made.append(queue)
        return made[-n:]

    yield make
    assert wait_for(lambda: all(q._keeper is None for q in made), 90), "a keeper never stopped"
    for queue in made:
        if queue._inbox is not None:
            queue._inbox.close()


@pytest.fixture
def key(make_key):
    return KeyInfo.from_row(make_key("a")[1])


class Waiter(threading.Thread):
    def __init__(self, queue, key, cap=1):
        super().__init__(daemon=True)
        self.queue, self.key, self.cap = queue, key, cap
        self.ticket = self.error = self.at = None
        self.start()

    def run(self):
        try:
            self.ticket = self.queue.acquire(UPSTREAM, self.cap, self.key)
        except Exception as exc:
            self.error = exc
        self.at = time.monotonic()


def waiting():
    return QueueEntry.select().where(QueueEntry.granted_at.is_null()).count()


def deaf_to_notifies(queue, monkeypatch):
    """The queue's keeper drops every NOTIFY: only its socket (or the sweep) wakes it."""
    monkeypatch.setattr(queue, "_read_notifies", lambda listener: (
        listener.poll(), listener.notifies.clear()))


def handoff(first, second, key):
    """`first` runs a request, `second` waits for the slot; the seconds from `first`'s
    release to `second`'s request going on, and its ticket."""
    running = first.acquire(UPSTREAM, 1, key)
    waiter = Waiter(second, key)
    assert wait_for(lambda: waiting() == 1, 30)
    assert wait_for(lambda: second._keeper is not None and second._inbox is not None, 30)
    time.sleep(0.2)  # the keeper is in its pause, reading its socket
    released = time.monotonic()
    first.release(running)
    waiter.join(FAR / 2)
    assert waiter.error is None and waiter.ticket is not None, "the grant never arrived"
    second.release(waiter.ticket)
    return waiter.at - released


def test_a_slot_freed_by_one_worker_starts_anothers_request_at_once(workers, key, monkeypatch):
    first, second = workers(2)
    if is_postgres():
        deaf_to_notifies(second, monkeypatch)  # the socket alone, on PostgreSQL too
    sent = []
    send = first._send
    monkeypatch.setattr(first, "_send", lambda address, ids: (sent.append((address, ids)),
                                                               send(address, ids)))
    seconds = handoff(first, second, key)
    assert seconds < 2.0, f"woken after {seconds:.2f} s: by the sweep, not the socket"
    assert [address for address, _ in sent] == [
        b"\0ollama-gw-queue/" + second.holder.partition("/")[2].encode()]
    assert QueueEntry.select().count() == 0


def test_a_wake_up_lost_on_the_way_is_caught_by_the_sweep(workers, key, monkeypatch):
    first, second = workers(2)
    if is_postgres():
        deaf_to_notifies(second, monkeypatch)
    monkeypatch.setattr(first, "_send", lambda address, ids: None)  # every datagram lost
    monkeypatch.setattr(fair_queue, "SWEEP_SECONDS", {False: 1.5, True: 1.5})
    seconds = handoff(first, second, key)
    assert 0.3 < seconds < 10, f"served after {seconds:.2f} s"


@pytest.mark.skipif(os.geteuid() != 0, reason="claiming another user's credentials "
                    "in a datagram takes root (CAP_SETUID)")
def test_a_wake_up_from_a_process_of_another_user_is_ignored(workers, key, monkeypatch):
    """Only the gateway's own user can start a request by a datagram (the ids are random
    too); a foreign sender is dropped, and the sweep still serves the request.

    The foreign datagram carries another user's credentials (root may claim them); one
    of this user's follows it, for another entry, on the same socket: once that one is
    delivered, the foreign one has been read before it, and its request must not run."""
    (queue,) = workers(1)
    if is_postgres():
        deaf_to_notifies(queue, monkeypatch)
    running = queue.acquire(UPSTREAM, 1, key)
    waiter = Waiter(queue, key)
    assert wait_for(lambda: waiting() == 1 and queue._waits, 30)
    entry_id, its_wait = next(iter(queue._waits.items()))
    address = fair_queue.WAKE_PREFIX + queue.holder.partition("/")[2].encode()
    marker, marker_id = _Wait(), entry_id + 1
    queue._expect(marker_id, marker)
    foreign = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        foreign.sendmsg([fair_queue._ID.pack(entry_id)], [(
            socket.SOL_SOCKET, socket.SCM_CREDENTIALS,
            struct.pack("3i", os.getpid(), 65534, 65534))], 0, address)
    finally:
        foreign.close()
    queue._send(address, [marker_id])
    assert wait_for(lambda: marker_id in marker.granted_ids, 30)
    assert not its_wait.event.is_set() and waiter.ticket is None  # the slot is not free
    with queue._lock:
        queue._waits.pop(marker_id)
    queue.release(running)
    waiter.join(FAR / 2)
    queue.release(waiter.ticket)


def test_a_grant_heard_of_before_its_request_waits_for_it_is_not_lost(workers):
    (queue,) = workers(1)
    queue._deliver([7])
    wait = _Wait()
    queue._expect(7, wait)
    assert wait.event.is_set() and wait.granted_ids == {7}
    assert 7 not in queue._early  # used up: kept, it would crowd out later ones
    queue._waits.pop(7)


def test_one_wait_under_several_entries_learns_which_was_granted(workers):
    (queue,) = workers(1)
    wait = _Wait()
    queue._expect(11, wait)
    queue._expect(12, wait)
    queue._announce([(12, queue.holder), (13, "elsewhere/1.2:3")])
    assert wait.event.is_set() and wait.granted_ids == {12}
    queue._waits.clear()


@pytest.fixture
def postgres_only(settings):
    if not settings.database_url.startswith("postgres"):
        pytest.skip("PostgreSQL's NOTIFY")


def counted_looks(queue, monkeypatch):
    looks = []
    look = queue._look_for_grants
    monkeypatch.setattr(queue, "_look_for_grants", lambda waiting: (
        looks.append(time.monotonic()), look(waiting)))
    return looks


def test_a_notify_naming_the_grant_starts_a_request_on_another_host_without_a_select(
        postgres_only, workers, key, monkeypatch):
    # Holders of another host: no socket reaches them; PostgreSQL's NOTIFY does.
    first, second = workers(2, holders=["elsewhere/1.2:3", "elsewhere/1.2:4"])
    looks = counted_looks(second, monkeypatch)
    running = first.acquire(UPSTREAM, 1, key)
    waiter = Waiter(second, key)
    assert wait_for(lambda: waiting() == 1 and second._listener is not None and looks, 30)
    time.sleep(0.2)
    released = time.monotonic()
    first.release(running)
    waiter.join(FAR / 2)
    assert waiter.ticket is not None and waiter.at - released < 2.0
    assert [at for at in looks if at > released] == []  # no SELECT: the payload said it
    second.release(waiter.ticket)


def test_an_old_gateways_notify_without_the_grants_has_the_keeper_look(
        postgres_only, workers, key, monkeypatch):
    """A gateway of the release before frees the slot (migration 0008's function, whose
    NOTIFY names the upstream only): the new worker reads the queue at once."""
    old, new = workers(2, holders=["elsewhere/1.2:3", "elsewhere/1.2:4"])
    old._grants_function = False
    looks = counted_looks(new, monkeypatch)
    running = old.acquire(UPSTREAM, 1, key)
    waiter = Waiter(new, key)
    assert wait_for(lambda: waiting() == 1 and new._listener is not None and looks, 30)
    time.sleep(0.2)
    released = time.monotonic()
    old.release(running)
    waiter.join(FAR / 2)
    assert waiter.ticket is not None and waiter.at - released < 2.0
    assert [at for at in looks if at > released]
    new.release(waiter.ticket)


def test_without_migration_0015_the_queue_works_as_before(migrated, workers, key, monkeypatch):
    """A database not upgraded yet (or downgraded): 0008's functions, a look per NOTIFY."""
    assert database.downgrade(migrated, "0015_queue_grants")[-1] == "0015_queue_grants"
    first, second = workers(2)
    if is_postgres():
        assert first._has_grants_function() is False
    seconds = handoff(first, second, key)
    assert seconds < 2.0  # SQLite: its socket; PostgreSQL: the old NOTIFY, then a look
    assert QueueEntry.select().count() == 0
    database.upgrade(migrated)


def test_a_release_that_woke_a_request_here_lets_it_go_first(workers, key, monkeypatch):
    """Under gevent, the granted request of this worker starts before the releasing one
    goes on (to record its usage, send its answer): release() yields once, and only
    then. In these threads pause() does nothing; it is counted."""
    paused = []
    monkeypatch.setattr(fair_queue, "pause", lambda: paused.append("yield"))
    here, other = workers(2)
    running = here.acquire(UPSTREAM, 1, key)
    mine = Waiter(here, key)
    assert wait_for(lambda: waiting() == 1 and here._waits, 30)  # it waits, not only entered
    here.release(running)
    mine.join(30)
    assert mine.ticket is not None and paused == ["yield"]

    # The slot goes to another worker's request: nothing here to let go first.
    theirs = Waiter(other, key)
    assert wait_for(lambda: waiting() == 1 and other._waits, 30)
    here.release(mine.ticket)
    theirs.join(30)
    assert theirs.ticket is not None and paused == ["yield"]
    other.release(theirs.ticket)
    assert paused == ["yield"]  # nothing waited
