"""Rows a gateway process holds, and freeing them when that process dies on this host.

Queue entries, concurrency slots and quota reservations name the worker that holds them
(`host/pidns.boot:pid`, holder_for()). A
worker killed mid-request (kill -9, the out-of-memory killer) cannot give them back,
and each would still count, an upstream's slot or a key's max_concurrent, until its
lease lapsed (slot_lease_seconds). gunicorn notices the death at once and starts a
new worker; the new worker, before it serves, deletes the rows held by this host's
processes that are gone, and has the fair queue grant the slots that freed
(gunicorn_conf.post_worker_init). Every worker also sweeps every few seconds: that
catches a death among several workers, and a row that a dead worker's database
session wrote after the worker died (a statement waiting on the queue's lock).

Only holders named for this host's pid namespace and boot, only pids that are not
alive: another gateway here has live pids and keeps its rows; a dead pid that an
unrelated process took since looks alive and its rows wait for the lease, as do other
hosts', other pid namespaces' (containers on the host's network share its name) and
rows named the way gateways before this release named them (`host:pid`). An instance
that dies entirely is freed by the lease alone.
"""
import functools
import logging
import os
import socket
import threading

from app.store.db import db, forget_idle_connections
from app.store.models import ConcurrencySlot, QueueEntry, QuotaReservation

log = logging.getLogger(__name__)

# Every table whose rows a process holds: (model, its holder column). A table added
# here is freed with the others when its holder dies.
HELD = (
    (QueueEntry, QueueEntry.holder),
    (ConcurrencySlot, ConcurrencySlot.holder),
    (QuotaReservation, QuotaReservation.holder),
)
# Seconds between a worker's sweeps for rows of dead processes on this host.
SWEEP_SECONDS = 2.0
# Seconds a new worker waits for its first sweep before it serves all the same (the
# database may be away; the sweep goes on in the background).
FIRST_SWEEP_SECONDS = 5.0


@functools.lru_cache(maxsize=1)
def _process_space():
    """The host name, and what tells this host's processes from those of another with
    the same name: its pid namespace and its boot (containers sharing the host's network,
    and so its name; a cloned machine that kept its name)."""
    try:
        namespace = f"{os.stat('/proc/self/ns/pid').st_ino:x}"
    except OSError:
        namespace = "-"
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot_id:
            boot = boot_id.read().strip()[:8]
    except OSError:
        boot = "-"
    return f"{socket.gethostname()}/{namespace}.{boot}"


def holder_for(pid):
    """The holder name of process `pid` of this host: `host/pidns.boot:pid`."""
    return f"{_process_space()}:{pid}"[:128]


def this_process():
    """The holder name of this process."""
    return holder_for(os.getpid())


def here(holder):
    """`pidns.boot:pid` of a holder that is a process of this host's pid namespace and
    boot, else None (another host's, a container's, a name cut at 128 characters)."""
    space = _process_space()
    if holder.startswith(space + ":") and len(holder) < 128:
        return holder[space.rindex("/") + 1:]  # past the host name
    return None


def alive(pid):
    """Whether process `pid` runs on this host (a zombie, dead but not yet waited for, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def dead_here(holders):
    """The holders among `holders` that were processes of this host and are gone."""
    prefix, mine = f"{_process_space()}:", this_process()
    dead = []
    for holder in holders:
        pid = holder[len(prefix):]
        # A name cut at 128 characters may have lost digits of its pid: left to the lease.
        if (holder.startswith(prefix) and holder != mine and len(holder) < 128
                and pid.isascii() and pid.isdigit() and 0 < int(pid) < 2**22
                and not alive(int(pid))):
            dead.append(holder)
    return dead


def free_dead():
    """Delete every row held by a dead process of this host: {model: rows deleted}."""
    freed = {}
    with db.connection_context():
        for model, column in HELD:
            holders = [h for (h,) in model.select(column).distinct().tuples()]
            dead = dead_here(holders)
            if dead:
                freed[model] = model.delete().where(column.in_(dead)).execute()
                log.warning("freed %d %s row(s) held by %s, dead processes of this host",
                            freed[model], model._meta.table_name, ", ".join(sorted(dead)))
    return freed


class Reaper:
    """A worker's sweeps for dead holders; the fair queue grants what they free."""

    def __init__(self, queue, pool, sweep_seconds=SWEEP_SECONDS):
        self.queue = queue
        self.upstreams = {(m.name, m.spec.max_concurrent) for m in pool.members
                          if m.spec.max_concurrent}
        self.sweep_seconds = sweep_seconds
        self.first_sweep = threading.Event()
        self._stop = threading.Event()
        self._failing = False

    def start(self, wait=FIRST_SWEEP_SECONDS):
        """Sweep now and then every sweep_seconds; return after the first sweep or `wait` s."""
        threading.Thread(target=self._run, name="holder-reaper", daemon=True).start()
        self.first_sweep.wait(wait)
        return self

    def stop(self):
        self._stop.set()

    def _run(self):
        self.sweep()
        self.first_sweep.set()
        while not self._stop.wait(self.sweep_seconds):
            self.sweep()

    def sweep(self):
        """Free what dead processes of this host held, then grant the freed queue slots."""
        try:
            freed = free_dead()
            if freed.get(QueueEntry):
                self.queue.dispatch_all(self.upstreams)
            self._failing = False
        except Exception as exc:  # the database is away: the next sweep tries again
            if not self._failing:
                log.warning("could not look for rows held by dead processes: %s", exc)
            self._failing = True
            forget_idle_connections()


def start_reaper(app):
    """Start the worker's reaper; called by gunicorn before the worker serves."""
    return Reaper(app.extensions["fair_queue"], app.extensions["upstreams"]).start()
