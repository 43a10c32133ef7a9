"""gunicorn settings for ollama-gw.

Read by `ollama-gw serve` (through app/serving/server.py), or by
`gunicorn -c python:app.gunicorn_conf wsgi:app` (app/gunicorn_conf.py re-exports this).

Values come from the gateway's own configuration so there is one place to set them.
"""
import os
import shutil
import subprocess
import sys
import tempfile

from app.config import load_settings

_settings = load_settings()
# Every worker writes its metrics here and /metrics sums them (prometheus-client's
# multiprocess mode). A fresh directory per server: old files would be summed in too.
_metrics_dir = tempfile.mkdtemp(prefix="ollama-gw-metrics-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir

# host:port to listen on.
bind = _settings.bind
# Processes. Each gevent worker multiplexes thousands of connections on one core, so
# one per core is right; more only adds memory.
workers = _settings.workers
# Cooperative I/O: a request waiting on Ollama costs a greenlet (~10 KiB), not a thread.
# gunicorn's gevent worker, plus closing connections whose body the gateway refused
# unread and masking keys in gunicorn's 400 pages (app/serving/worker.py).
worker_class = "app.serving.worker.GatewayWorker"
# gunicorn's own log lines go through the same key redaction as the gateway's.
logger_class = "app.serving.worker.GatewayLogger"
# Simultaneous client connections per worker (mostly long streams waiting on the GPU);
# each stream also holds a connection to Ollama, so a worker may use twice as many file
# descriptors (the systemd unit allows 65,536).
worker_connections = 20000
# Seconds a worker may go without a heartbeat before the master restarts it. With gevent
# the heartbeat runs in its own greenlet, so long streams are NOT cut by this.
timeout = 30
# Seconds in-flight requests get to finish after SIGTERM or SIGHUP before being cut.
graceful_timeout = _settings.graceful_timeout
# Seconds an idle keep-alive connection stays open.
keepalive = 5
# Never preload: gevent patches the standard library in each worker after fork, and
# the app must create its sockets and database pool after that.
preload_app = False
# The gateway writes its own log lines; gunicorn's access log would print query strings,
# and legacy clients put keys there.
accesslog = None
errorlog = "-"
loglevel = _settings.log_level
proc_name = "ollama-gw"
# gunicorn 23+ opens a control socket at one fixed path per user: two instances on one
# machine would fight over it, and a hardened unit cannot create it. The gateway is
# managed with signals (TERM drains, HUP reloads) instead.
control_socket_disable = True


def on_starting(server):
    """Apply pending migrations before any worker serves a request.

    In a child process: the master must not import the database layer before gevent
    patches the workers (app/serving/server.py says why). `ollama-gw serve` has migrated already
    and turns this off; it matters when gunicorn is run directly. Concurrent starts
    queue on the migration lock. The DEMO_* keys (app/keys/demo_keys.py) are set up with them.
    """
    if _settings.auto_migrate:
        subprocess.run([sys.executable, "-P", "-m", "cli", "db", "upgrade", "--demo-keys"],
                       check=True)


def when_ready(server):
    """Say once, in the master, that the web dashboard is on and where (not per worker)."""
    if _settings.ui:
        server.log.info("web dashboard on at http://%s/ui/ (ui = true)", _settings.bind)


def post_fork(server, worker):
    """Let psycopg2 yield to other greenlets while it waits on PostgreSQL."""
    if _settings.resolved_database_url.startswith("postgres"):
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()


def post_worker_init(worker):
    """Before a worker serves: free what dead workers of this host held, then sweep on.

    A worker killed mid-request leaves its queue entries and concurrency slots behind;
    the worker gunicorn starts in its place deletes them (app/admission/holders.py), so the
    upstream's slots and the key's max_concurrent come back now, not after the lease.
    Runs in the worker, after gevent patched it: the master imports nothing of this.
    """
    from app.admission.holders import start_reaper

    start_reaper(worker.flask_app)


def worker_exit(server, worker):
    """After a worker's last request (SIGTERM, reload): write its usage, then its webhooks.

    Usage first: its batch stores webhook events, which the dispatcher then tries to
    send before it stops (or leaves in the database for the next sender). Usage the
    database does not take within a few seconds is saved to a file in the data
    directory and written by the next gateway to start (app/accounting/usage.py). Also called in
    the master for a worker that vanished; that has no app, and the master must not
    import one.
    """
    app = getattr(worker, "flask_app", None)
    extensions = getattr(app, "extensions", {})
    if "usage" in extensions:
        from app.accounting.request_record import flush_at_exit

        flush_at_exit(app)
    dispatcher = extensions.get("webhook_dispatcher")
    if dispatcher is not None:
        dispatcher.stop()


def child_exit(server, worker):
    """A worker is gone: its live gauges (streams in flight, buffer depth) go with it."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    shutil.rmtree(_metrics_dir, ignore_errors=True)
