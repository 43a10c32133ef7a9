"""The database: one proxy, bound from a URL, connected lazily per request; migrations.

SQLite and PostgreSQL run the same code. Connections come from a pool and are
greenlet-local under gevent (peewee keeps its state in ``threading.local``, which
gevent patches), so each request uses its own connection and returns it at teardown.
"""
import contextlib
import fcntl
import os
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import peewee
from playhouse import db_url
from playhouse.migrations import Runner
from playhouse.pool import PooledPostgresqlDatabase, PooledSqliteDatabase

import migrations
from app.store.private_files import create_private, private_dir, private_opener

db = peewee.DatabaseProxy()

MIGRATIONS_DIR = os.path.dirname(migrations.__file__)
# Any fixed number works; it only has to be the same in every gateway instance.
_PG_MIGRATION_LOCK = zlib.crc32(b"ollama-gw migrations")

SQLITE_PRAGMAS = {
    "journal_mode": "wal",  # readers never block the writer; 8x the throughput of rollback mode
    "synchronous": "normal",  # safe with WAL: a power cut loses at most the last commits
    # No waiting inside SQLite: its busy handler sleeps in C and would freeze every
    # stream of a gevent worker. CooperativeSqliteDatabase waits instead.
    "busy_timeout": 0,
    "foreign_keys": 1,
}
# How long a write waits for another process's write to finish, and how it polls.
SQLITE_LOCK_WAIT = 10.0
_FIRST_PAUSE, _LONGEST_PAUSE = 0.0002, 0.002


class CooperativeSqliteDatabase(PooledSqliteDatabase):
    """Pooled SQLite whose waits for the write lock let other greenlets run.

    A write that finds the lock taken fails at once (busy_timeout 0) and is retried
    after a short sleep, which under gevent is a yield. Only statements that cannot
    have done anything are retried: a BEGIN, or a statement outside a transaction
    (SQLite reports a busy lock before it changes a row). Inside a transaction begun
    with BEGIN IMMEDIATE the lock is already held, so nothing there waits.
    """

    def begin(self, lock_type=None):
        self._retry_while_locked(lambda: super(CooperativeSqliteDatabase, self).begin(lock_type))

    def execute_sql(self, sql, params=None):
        if self.in_transaction():
            return super().execute_sql(sql, params)
        return self._retry_while_locked(lambda: super(CooperativeSqliteDatabase, self)
                                        .execute_sql(sql, params))

    @staticmethod
    def _retry_while_locked(run):
        deadline, pause = time.monotonic() + SQLITE_LOCK_WAIT, _FIRST_PAUSE
        while True:
            try:
                return run()
            except peewee.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)  # gevent's sleep in a worker: other greenlets run
            pause = min(pause * 2, _LONGEST_PAUSE)


class PooledPostgresDatabase(PooledPostgresqlDatabase):
    """PostgreSQL's pool, without a round trip to the server on every checkout.

    peewee's pool sends `SELECT 1` each time it hands out a connection: one more round
    trip per request, 6 % of a worker's time under load (py-spy, bench/). A connection
    given back less than PING_AFTER_IDLE seconds ago, idle and not closed, was working
    then and is handed out as it is; one that idled longer is checked as before. If the
    server went away in between, that request fails and forget_idle_connections() drops
    the other idle connections, as after any database failure.
    """

    PING_AFTER_IDLE = 1.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._returned_at = {}  # conn_key -> when the connection came back to the pool

    def _is_closed(self, conn):
        returned = self._returned_at.get(self.conn_key(conn))
        if (returned is not None and time.monotonic() - returned < self.PING_AFTER_IDLE
                and not conn.closed
                and self._adapter.txn_status(conn) == self._adapter.txn_idle):
            return False
        return super()._is_closed(conn)

    def _close(self, conn, close_conn=False):
        super()._close(conn, close_conn)
        if not close_conn and not conn.closed:
            self._returned_at[self.conn_key(conn)] = time.monotonic()

    def _close_raw(self, conn):
        self._returned_at.pop(self.conn_key(conn), None)
        super()._close_raw(conn)


def open_database(url, max_connections=16):
    """Create a pooled peewee database for a sqlite:// or postgresql:// URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0]
    pool = {"max_connections": max_connections, "stale_timeout": 300, "timeout": 10}
    if scheme == "sqlite":
        path = db_url.parse(url)["database"]
        if path != ":memory:":
            private_dir(Path(path).parent)
            create_private(path)  # before SQLite makes it with the umask's mode
        # IMMEDIATE: every transaction here writes, so take the write lock up front
        # (cooperatively, see above) instead of failing on a lock upgrade.
        return CooperativeSqliteDatabase(
            path, pragmas=SQLITE_PRAGMAS, lock_type="IMMEDIATE", check_same_thread=False,
            **pool)
    if scheme in ("postgres", "postgresql"):
        params = db_url.parse("postgresql://" + url[len(parts.scheme) + 3:])
        return PooledPostgresDatabase(**{**params, **pool})
    raise ValueError(f"unsupported database URL scheme {parts.scheme!r}")


def init_app(app):
    """Bind the proxy to the configured database and close connections after each request."""
    _require_greenlet_local_connections()
    settings = app.config["SETTINGS"]
    db.initialize(open_database(settings.resolved_database_url, settings.database_pool_size))

    @app.teardown_appcontext
    def _close_connection(exc):
        if not db.is_closed():
            db.close()


def forget_idle_connections():
    """After a database failure, drop the pool's idle connections.

    A database restart kills every pooled connection, and the pool only learns that a
    connection is dead when a request fails on it: each of up to database_pool_size
    connections per worker would fail one more request after the database is back.
    """
    with contextlib.suppress(Exception):
        db.obj.close_idle()


def _require_greenlet_local_connections():
    """Refuse to run where greenlets of one worker would share a database connection.

    That happens when peewee is imported before gevent patches threading.local.
    """
    try:
        from gevent import local, monkey
    except ImportError:
        return
    if monkey.is_module_patched("threading") and not issubclass(
        peewee._ConnectionLocal, local.local
    ):
        raise RuntimeError(
            "peewee was imported before gevent patched this worker: greenlets would share "
            "database connections. Do not import the app in gunicorn's master (no "
            "preload_app, no app imports in gunicorn settings)."
        )


def is_postgres(database=None):
    database = database or db.obj
    return isinstance(database, peewee.PostgresqlDatabase)


@contextlib.contextmanager
def migration_lock(database):
    """Serialise migrations across workers and instances that start at the same moment."""
    if is_postgres(database):
        database.connect(reuse_if_open=True)
        database.execute_sql("SELECT pg_advisory_lock(%s)", (_PG_MIGRATION_LOCK,))
        try:
            yield
        finally:
            database.execute_sql("SELECT pg_advisory_unlock(%s)", (_PG_MIGRATION_LOCK,))
        return
    # SQLite can only be shared by processes on this machine: a lock file next to it does.
    path = database.database
    lock_path = os.devnull if path == ":memory:" else path + ".migrate-lock"
    with open(lock_path, "a", opener=private_opener) as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def migration_runner(database):
    return Runner(database, MIGRATIONS_DIR)


# Each is called with (database, names applied) when upgrade() applied something.
# app/store/audit.py adds the one that records `db.upgraded`: it imports the tables,
# which import this module, so this module cannot import it.
UPGRADE_LISTENERS = []


def upgrade(database):
    """Apply pending migrations; return the names applied (none if up to date)."""
    with migration_lock(database):
        applied = migration_runner(database).up()
    if applied:
        for listener in UPGRADE_LISTENERS:
            listener(database, applied)
    return applied


def downgrade(database, target=None):
    """Revert the newest migration, or every one back through `target`."""
    with migration_lock(database):
        return migration_runner(database).down(target)


def migration_status(database):
    """[(name, applied_at or None)] in order, including applied ones whose file is gone."""
    return [(m.name, m.applied) for m in migration_runner(database).status()]


def pending_migrations(database):
    return [name for name, applied in migration_status(database) if applied is None]
