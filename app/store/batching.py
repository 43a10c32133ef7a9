"""Database work that arrives while the same work is running waits, then runs as one batch.

A statement per request is a round trip each (PostgreSQL) or a turn at the write lock
each (SQLite): under load, one key's or one upstream's requests would queue behind each
other one statement at a time. Here, while a statement for a group runs, the group's
next requests gather, and the first of them runs them all in one go once it is done.
A request that finds nothing running yields once first (under gevent), so that the
worker's other ready requests can join it: a SQLite statement never yields, and without
that pause nobody could ever gather behind one.
"""
import threading

import peewee

from app.cooperative import pause


class _Batch:
    def __init__(self, item):
        self.items = [item]
        self.done = threading.Event()
        self.results = None
        self.error = None


class Gather:
    """`gather(group, item)` returns `run(group, items)[i]` for this item, run in a batch.

    `run` gets the items of one group in arrival order and returns one result each; it
    is called for one group at a time, never twice at once. If it raises, every item of
    the batch raises that error (a leader interrupted by something other than an
    Exception gives the others a database error). `eager`: a request that finds nothing
    running runs at once, without the pause (for work that others wait on, such as
    freeing a slot: 0.2 ms less idle a hand-off on SQLite, bench/queue_handoff.py);
    requests still gather behind one that is running.
    """

    def __init__(self, run, eager=False):
        self._run = run
        self._eager = eager
        self._lock = threading.Lock()
        self._running = {}  # group -> the batch whose run is under way
        self._gathering = {}  # group -> the batch that runs next

    def __call__(self, group, item):
        with self._lock:
            batch = self._gathering.get(group)
            running = self._running.get(group)
            if batch is not None:  # join the batch that runs next
                position, leads = len(batch.items), False
                batch.items.append(item)
            else:
                batch, position, leads = _Batch(item), 0, True
                self._gathering[group] = batch
        if not leads:
            batch.done.wait()
        else:
            try:
                if running is not None:
                    running.done.wait()
                elif not self._eager:
                    pause()  # greenlets about to do the same join in (gevent only)
                with self._lock:  # no one joins from here: later items gather anew
                    del self._gathering[group]
                    self._running[group] = batch
                batch.results = self._run(group, batch.items)
            except BaseException as exc:
                batch.error = exc if isinstance(exc, Exception) else peewee.OperationalError(
                    "the statement running this request with others was interrupted")
                raise
            finally:
                with self._lock:
                    for batches in (self._gathering, self._running):
                        if batches.get(group) is batch:
                            del batches[group]
                batch.done.set()
        if batch.error is not None:
            raise batch.error
        return batch.results[position]

    def idle(self):
        """True when nothing runs or waits (tests check nothing is left behind)."""
        with self._lock:
            return not self._running and not self._gathering
