"""Freeing what dead processes held (app/admission/holders.py): only this host's, only the dead.

tests/admission/test_holders_gateway.py kills real gunicorn workers; these check which rows go.
"""
import os
import shutil
import socket
import subprocess
import threading
import time
from types import SimpleNamespace

from app.admission import fair_queue, holders
from app.admission.fair_queue import FairQueue
from app.keys.registry import KeyInfo
from app.store.models import ConcurrencySlot, QueueEntry, QuotaReservation
from tests.gateway_process import wait_for

HERE = socket.gethostname()


def dead_pid():
    """The pid of a process of this host that has ended (and been waited for)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def pool(cap):
    return SimpleNamespace(members=[SimpleNamespace(name="gpu",
                                                    spec=SimpleNamespace(max_concurrent=cap))])


def stop(reaper):
    """Stop the reaper's sweeps and wait for its thread: one still sweeping when the test's
    database goes away can crash the interpreter (SQLite, under the test's feet)."""
    reaper.stop()
    threads = [t for t in threading.enumerate() if t.name == "holder-reaper"]
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)


def test_alive_tells_a_running_process_from_an_ended_one():
    assert holders.alive(os.getpid())
    assert not holders.alive(dead_pid())


def test_a_process_that_ended_but_was_not_waited_for_is_not_alive():
    """A killed worker stays a zombie until gunicorn's master waits for it."""
    proc = subprocess.Popen(["true"])
    try:
        assert wait_for(lambda: open(f"/proc/{proc.pid}/stat").read().split()[2] == "Z", 30)
        assert not holders.alive(proc.pid)
    finally:
        proc.wait()


def test_a_process_whose_name_has_a_parenthesis_and_a_state_letter_is_alive(tmp_path):
    """/proc/PID/stat has the name in parentheses, as the process set it: the state is the
    field after the last `)`, not after the first (a live worker is not a zombie)."""
    sleep = tmp_path / "gw) Z 1 ("
    sleep.symlink_to(shutil.which("sleep"))
    proc = subprocess.Popen([str(sleep), "60"])
    try:
        assert wait_for(lambda: b"(gw) Z 1 () " in open(f"/proc/{proc.pid}/stat", "rb").read(),
                        30)
        assert holders.alive(proc.pid)
        assert holders.dead_here([holders.holder_for(proc.pid)]) == []
    finally:
        proc.kill()
        proc.wait()


def test_holder_names_tell_this_pid_namespace_and_boot_from_others():
    """Containers on the host's network share its name (and network namespace): the pid
    namespace tells their processes apart, the boot a clone of the machine."""
    namespace = f"{os.stat('/proc/self/ns/pid').st_ino:x}"
    with open("/proc/sys/kernel/random/boot_id") as boot_id:
        boot = boot_id.read().strip()[:8]
    assert holders.holder_for(4321) == f"{HERE}/{namespace}.{boot}:4321"
    assert holders.this_process() == f"{HERE}/{namespace}.{boot}:{os.getpid()}"


def test_a_holder_name_of_128_characters_may_have_lost_digits_and_is_left_to_the_lease(
        monkeypatch):
    """holder_for() cuts names at 128 characters: `space:1234` of that length may be what
    is left of `space:12345`, a live process; only a shorter name surely names its pid."""
    pid = dead_pid()
    space = "h" * (127 - len(str(pid)) - len("/ns.boot")) + "/ns.boot"
    monkeypatch.setattr(holders, "_process_space", lambda: space)
    cut = f"{space}:{pid}"
    assert len(cut) == 128 and holders.holder_for(pid * 10) == cut
    assert holders.dead_here([cut]) == []
    assert holders.here(cut) is None

    shorter = space[1:]  # the same pid, a name that was not cut: freed
    monkeypatch.setattr(holders, "_process_space", lambda: shorter)
    assert holders.dead_here([f"{shorter}:{pid}"]) == [f"{shorter}:{pid}"]


def test_only_rows_of_dead_processes_of_this_host_are_freed(migrated, make_key):
    _, row = make_key("a", max_concurrent=9)
    pid = dead_pid()
    dead = holders.holder_for(pid)
    space = dead.rpartition(":")[0]
    kept = [holders.holder_for(os.getppid()),  # another live process here (another instance)
            holders.this_process(),  # this one
            f"other-{space}:{pid}",  # the same pid on another host
            f"{space[:1]}:{pid}",  # a host name that starts like this one
            f"{HERE}/other.{space[-8:]}:{pid}",  # this name, another pid namespace
            f"{space[:-8]}otherboo:{pid}",  # this name and namespace, another boot (a clone)
            f"{HERE}:{pid}",  # the name an older gateway gave: left to the lease
            f"{space}:{pid}0000000"]  # no such pid: not a holder of ours
    now = time.time()
    for holder in [dead, *kept]:
        QueueEntry.create(upstream="gpu", key_id=row.id, holder=holder, start_tag=0,
                          finish_tag=1, enqueued_at=now, granted_at=now, expires_at=now + 60)
        ConcurrencySlot.create(key=row.id, holder=holder, expires_at=now + 60)
        QuotaReservation.create(key_id=row.id, period_start=0, tokens=100, holder=holder,
                                expires_at=now + 60)

    freed = holders.free_dead()

    assert freed == {QueueEntry: 1, ConcurrencySlot: 1, QuotaReservation: 1}
    for model in (QueueEntry, ConcurrencySlot, QuotaReservation):
        assert sorted(h for (h,) in model.select(model.holder).tuples()) == sorted(kept)


def test_a_slot_a_dead_process_held_goes_to_the_request_waiting_for_it(migrated, make_key,
                                                                      monkeypatch):
    monkeypatch.setattr(fair_queue, "DISPATCH_SECONDS", 600)  # the waiter's own look: later
    _, row = make_key("waits")
    key = KeyInfo.from_row(row)
    now = time.time()
    QueueEntry.create(upstream="gpu", key_id=row.id, holder=holders.holder_for(dead_pid()),
                      start_tag=0, finish_tag=1, enqueued_at=now, granted_at=now,
                      expires_at=now + 60)
    queue = FairQueue(lease_seconds=60, max_wait=60)
    tickets = []
    waiter = threading.Thread(target=lambda: tickets.append(queue.acquire("gpu", 1, key)),
                              daemon=True)
    waiter.start()
    assert wait_for(lambda: QueueEntry.select().where(QueueEntry.granted_at.is_null())
                    .count() == 1, 30)

    holders.Reaper(queue, pool(1)).sweep()

    waiter.join(5)  # granted by the sweep, not by the lease 60 s on
    assert tickets and tickets[0] is not None
    queue.release(tickets[0])
    assert QueueEntry.select().count() == 0
    assert wait_for(lambda: queue._keeper is None, 30)


def test_every_worker_sweeps_again_for_processes_that_died_since(migrated, make_key):
    _, row = make_key("a", max_concurrent=9)
    reaper = holders.Reaper(FairQueue(), pool(1), sweep_seconds=0.1).start()
    try:
        assert reaper.first_sweep.is_set()
        ConcurrencySlot.create(key=row.id, holder=holders.holder_for(dead_pid()),
                               expires_at=time.time() + 60)
        assert wait_for(lambda: ConcurrencySlot.select().count() == 0, 10)
    finally:
        stop(reaper)


def test_a_sweep_that_fails_does_not_stop_the_sweeps_that_follow(migrated, make_key,
                                                                 monkeypatch, caplog):
    """The database away at one sweep: the worker serves all the same, and a later sweep
    frees what dead processes held."""
    _, row = make_key("a", max_concurrent=9)
    ConcurrencySlot.create(key=row.id, holder=holders.holder_for(dead_pid()),
                           expires_at=time.time() + 60)
    failures, free_dead = [RuntimeError("the database is away")], holders.free_dead

    def failing_once():
        if failures:
            raise failures.pop()
        return free_dead()

    monkeypatch.setattr(holders, "free_dead", failing_once)
    reaper = holders.Reaper(FairQueue(), pool(1), sweep_seconds=0.1).start(wait=30)
    try:
        assert reaper.first_sweep.is_set() and failures == []
        assert wait_for(lambda: ConcurrencySlot.select().count() == 0, 30)
    finally:
        stop(reaper)
    assert "could not look for rows held by dead processes" in caplog.text
