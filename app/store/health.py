"""Is this gateway fit to serve? The database must answer and take writes.

A load balancer polls /health without a key, so each answer is cached for a few
seconds per process: polling cannot be turned into load on the database.
"""
import logging
import os
import socket
import time
from pathlib import Path

import peewee

from app.errors import DATABASE_ERRORS, database_problem
from app.store.db import db, forget_idle_connections, is_postgres
from app.store.models import Heartbeat

log = logging.getLogger(__name__)

# Below this much free space next to a SQLite file, writes are about to fail.
MIN_FREE_BYTES = 1024 * 1024


class DatabaseHealth:
    def __init__(self, max_age=5.0):
        self.max_age = max_age
        self.holder = f"{socket.gethostname()}:{os.getpid()}"[:128]
        self._checked = (0.0, None)

    def state(self):
        """(ok, problem in words or None), from a real write at most every max_age seconds."""
        checked_at, result = self._checked
        if result is not None and time.monotonic() - checked_at < self.max_age:
            return result
        result = self._probe()
        self._checked = (time.monotonic(), result)
        return result

    def _probe(self):
        try:
            with db.connection_context():
                low = self._low_disk()
                if low:
                    return False, low
                now = time.time()
                Heartbeat.insert(holder=self.holder, seen_at=now).on_conflict(
                    conflict_target=[Heartbeat.holder], update={Heartbeat.seen_at: now},
                ).execute()
                Heartbeat.delete().where(Heartbeat.seen_at < now - 86400).execute()
            return True, None
        except (*DATABASE_ERRORS, peewee.DatabaseError) as exc:
            log.error("health check: the database failed a write: %s", exc)
            forget_idle_connections()
            return False, database_problem(exc)

    @staticmethod
    def _low_disk():
        if is_postgres():
            return None  # the database server watches its own disk
        path = Path(db.obj.database).parent
        stat = os.statvfs(path)
        if stat.f_bavail * stat.f_frsize < MIN_FREE_BYTES:
            return database_problem("database or disk is full")
        return None


def init_app(app):
    app.extensions["database_health"] = DatabaseHealth()
