"""What a run measures: the fake Ollama, nginx, the reference apps and the gateways."""
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from processes import (
    BENCH,
    REPO,
    Processes,
    children,
    free_port,
    http,
    log,
    nginx_binary,
    ollama_gw_command,
    tree,
    wait_http,
)

from app.limits import parse_rate_limit

NGINX_TEMPLATE = BENCH / "nginx.conf.template"
PG_ADMIN_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
# The bench key's rate limit: counted on every request, never reached. BENCH_RATE_LIMIT=none
# gives a key without one (no database statement to admit it), to measure what the count costs.
RATE_LIMIT = os.environ.get("BENCH_RATE_LIMIT", "100000000/minute")
COUNTED = parse_rate_limit(RATE_LIMIT) is not None  # as `keys add --rate-limit` reads it
BODIES = {
    "/api/generate": {"model": "llama3.2", "prompt": "Why is the sky blue?", "stream": False,
                      "options": {"num_predict": 32}},
    "/api/chat": {"model": "llama3.2", "stream": False, "options": {"num_predict": 32},
                  "messages": [{"role": "user", "content": "Why is the sky blue?"}]},
}


class Target:
    """Somewhere the load generators send requests: direct, nginx or a gateway."""

    def __init__(self, name, url, key="", pids=lambda: []):
        self.name, self.url, self.key, self._pids = name, url, key, pids

    def pids(self):
        return self._pids()



class Targets:
    """The servers one run compares: the fake upstream, nginx, the reference apps and
    gateways (this checkout or another), with their databases; stopped by cleanup()."""

    def __init__(self, args):
        self.args = args
        self.procs = Processes()
        self.work = Path(tempfile.mkdtemp(prefix="ollama-gw-bench-"))
        self.out = Path(args.out) if args.out else BENCH / "out" / time.strftime("%Y%m%d-%H%M%S")
        self.out.mkdir(parents=True, exist_ok=True)
        self.pg_admin = None
        self.pg_dbs = []
        self.results = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                        "quick": args.quick, "notes": []}

    # -- fake upstream, nginx, gateways


    def start_upstream(self):
        port = free_port()
        self.upstream_procs = [
            self.procs.start("fake-upstream",
                             [sys.executable, str(BENCH / "fake_upstream.py"), "--port", str(port)],
                             self.out / "fake_upstream.log")
            for _ in range(self.args.upstream_processes)]
        url = f"http://127.0.0.1:{port}"
        for proc in self.upstream_procs:
            wait_http(url + "/api/version", proc, "fake upstream")
        self.upstream_url = url
        return Target("direct", url, pids=lambda: [p.pid for p in self.upstream_procs])

    def start_nginx(self):
        prefix = self.work / "nginx"
        prefix.mkdir()
        prefix.chmod(0o755)
        self.work.chmod(0o755)
        port = free_port()
        conf = NGINX_TEMPLATE.read_text()
        for name, value in {"@PREFIX@": str(prefix), "@PORT@": str(port),
                            "@UPSTREAM_PORT@": self.upstream_url.rsplit(":", 1)[1],
                            "@WORKERS@": str(self.args.workers)}.items():
            conf = conf.replace(name, value)
        (prefix / "nginx.conf").write_text(conf)
        proc = self.procs.start("nginx", [nginx_binary(), "-p", str(prefix), "-e",
                                          str(prefix / "error.log"), "-c", "nginx.conf"],
                                self.out / "nginx.log")
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/api/version", proc, "nginx")
        return Target("nginx", url, pids=lambda: tree(proc.pid))

    def start_reference(self, name, app):
        """gunicorn + gevent + Flask doing less than the gateway (bench/reference_app.py)."""
        port = free_port()
        env = {**os.environ, "BENCH_UPSTREAM": self.upstream_url}
        proc = self.procs.start(
            name, [sys.executable, "-m", "gunicorn", "--worker-class", "gevent",
                   "--workers", str(self.args.workers), "--worker-connections", "10000",
                   "--keep-alive", "5", "--bind", f"127.0.0.1:{port}", "--no-control-socket",
                   "--log-level", "warning", "--chdir", str(BENCH), f"reference_app:{app}"],
            self.out / f"{name}.log", env=env)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while starting")
            with contextlib.suppress(OSError):
                if http("POST", url + "/api/generate", b"{}", timeout=1)[0] == 200:
                    break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{name} did not start within 30 s")
        return Target(name, url, pids=lambda: tree(proc.pid))

    def gateway_env(self, database_url):
        env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_GW_")}
        env.update({"DATABASE_URL": database_url, "OLLAMA_URL": self.upstream_url,
                    "PYTHONUNBUFFERED": "1",
                    # The fake upstream serves any number at once, as ref-relay's does:
                    # every request goes through the fair queue's bookkeeping, and its
                    # cap never makes one wait (bench/fair_queue.py measures waiting).
                    # BENCH_UPSTREAM_CAP=0 measures without the queue.
                    "OLLAMA_GW_UPSTREAM_MAX_CONCURRENT":
                        os.environ.get("BENCH_UPSTREAM_CAP", "100000")})
        return env

    def add_key(self, env, src=None):
        result = subprocess.run(
            [*ollama_gw_command(src), "keys", "add", "--name", "bench", "--rate-limit",
             RATE_LIMIT, "--json"], env=env, cwd=src or REPO, capture_output=True, text=True,
            timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"ollama-gw keys add failed: {result.stderr.strip()}")
        return json.loads(result.stdout)["key"]

    def start_gateway(self, name, database_url, workers, key=None, src=None):
        """`ollama-gw serve` on a loopback port; returns (Target, Popen).

        `src`: run the gateway of another checkout (--baseline-src) instead of this one.
        """
        env = self.gateway_env(database_url)
        if src:
            env["PYTHONPATH"] = src
        key = key or self.add_key(env, src)
        port = free_port()
        proc = self.procs.start(
            name, [*ollama_gw_command(src), "serve", "--bind", f"127.0.0.1:{port}",
                   "--workers", str(workers)], self.out / f"{name}.log", env=env,
            cwd=src or REPO)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc, f"gateway {name}", timeout=60)
        deadline = time.monotonic() + 10
        while len(children(proc.pid)) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
        if database_url.startswith("postgres"):
            # PostgreSQL's backends work for the gateway: count their CPU as its own.
            pids = lambda: tree(proc.pid) + self.pg_backends()  # noqa: E731
        else:
            pids = lambda: tree(proc.pid)  # noqa: E731
        target = Target(name, url, key, pids=pids)
        self.check_gateway(target)
        return target, proc

    def check_gateway(self, target):
        """The gateway really authenticates and counts: no key -> 401, key -> 200 + headers."""
        body = json.dumps(BODIES["/api/generate"]).encode()
        status, _, _ = http("POST", target.url + "/api/generate", body)
        if status != 401:
            raise RuntimeError(f"{target.name}: a request without a key got {status}, not 401")
        status, headers, _ = http("POST", target.url + "/api/generate", body,
                                  {"Authorization": f"Bearer {target.key}"})
        if status != 200 or (COUNTED and "X-RateLimit-Limit" not in headers):
            raise RuntimeError(f"{target.name}: a keyed request got {status} "
                               f"without rate-limit headers")

    def setup_postgres(self, suffix=""):
        """Create a throw-away database; None (and a note) when PostgreSQL is not reachable."""
        try:
            import psycopg2
        except ImportError:
            return None
        admin = self.args.postgres_url
        name = f"ollama_gw_bench_{os.getpid()}{suffix}"
        try:
            conn = psycopg2.connect(admin, connect_timeout=3)
        except psycopg2.Error as exc:
            self.results["notes"].append(f"PostgreSQL not reachable ({str(exc).strip()}): "
                                         "PostgreSQL rows skipped")
            return None
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        self.pg_admin = admin
        self.pg_dbs.append(name)
        base = admin.rsplit("/", 1)[0]
        return f"{base}/{name}"

    def pg_backends(self):
        """PIDs of the PostgreSQL server processes connected to the bench's database."""
        import psycopg2

        try:
            with contextlib.closing(psycopg2.connect(self.pg_admin, connect_timeout=3)) as conn:
                with conn.cursor() as cur:
                    cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = ANY(%s)",
                                (self.pg_dbs,))
                    return [row[0] for row in cur.fetchall()]
        except psycopg2.Error:
            return []

    def drop_postgres(self):
        if not self.pg_dbs:
            return
        import psycopg2

        try:
            conn = psycopg2.connect(self.pg_admin, connect_timeout=3)
            conn.autocommit = True
            with conn.cursor() as cur:
                for name in self.pg_dbs:
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.close()
        except psycopg2.Error as exc:
            log(f"could not drop database(s) {', '.join(self.pg_dbs)}: {exc}")
        self.pg_dbs = []

    def cleanup(self):
        self.procs.stop_all()
        self.drop_postgres()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- load generators

