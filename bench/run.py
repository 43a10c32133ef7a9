"""The ollama-gw benchmark suite: one command, one table.

    bench/run            # the full suite (about 6 minutes on 2 cores)
    bench/run --quick    # a short version (under a minute)

Everything runs on this machine and talks to 127.0.0.1 only: a fast fake Ollama
(bench/fake_upstream.py), nginx as a plain reverse proxy (the floor), and ollama-gw
itself (`ollama-gw serve`) on SQLite and on PostgreSQL, each measured side by side with
going straight to the fake upstream, in the same run. See bench/README.md.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import queue
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WRK_SCRIPT = BENCH / "wrk_report.lua"
NGINX_TEMPLATE = BENCH / "nginx.conf.template"
PG_ADMIN_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
RATE_LIMIT = "100000000/minute"  # counted on every request, never reached
TOKEN_RATE = 40  # tokens per second for the streaming tests (a typical local model)

BODIES = {
    "/api/generate": {"model": "llama3.2", "prompt": "Why is the sky blue?", "stream": False,
                      "options": {"num_predict": 32}},
    "/api/chat": {"model": "llama3.2", "stream": False, "options": {"num_predict": 32},
                  "messages": [{"role": "user", "content": "Why is the sky blue?"}]},
}

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method, url, body=None, headers=None, timeout=5):
    """(status, headers, body bytes) of one request; never raises for HTTP errors."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with NO_PROXY.open(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# ---------------------------------------------------------------- tools and processes

def ensure_tools(need_profiler):
    """Install wrk, nginx and py-spy when missing (apt-get / pip, non-interactive)."""
    packages = []
    if not shutil.which("wrk"):
        packages.append("wrk")
    if not nginx_binary():
        packages.append("nginx-light")
    if packages:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            sys.exit(f"bench needs {', '.join(packages)}: install them (apt-get install -y "
                     f"{' '.join(packages)}) or run as root so the bench can")
        log(f"installing {', '.join(packages)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # Keep Debian's maintainer scripts from starting the system nginx: the bench runs
        # its own, on a loopback port, with its own configuration.
        policy = Path("/usr/sbin/policy-rc.d")
        made_policy = False
        if not policy.exists():
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            made_policy = True
        try:
            cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
            if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
                subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL,
                               check=True)
                subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
        finally:
            if made_policy:
                policy.unlink()
    if need_profiler and not py_spy_binary():
        log("installing py-spy with pip")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)


def nginx_binary():
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def py_spy_binary():
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def ollama_gw_command(src=None):
    """The `ollama-gw` command; for another checkout (src), its CLI run from there."""
    local = Path(sys.executable).parent / "ollama-gw"
    if local.exists() and not src:
        return [str(local)]
    return [sys.executable, "-c", "from cli import main; main()"]


class Processes:
    """Every server the bench starts, each in its own process group; all stopped at the end."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, log_path, env=None, cwd=REPO):
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        proc.bench_name = name
        self.procs.append(proc)
        return proc

    def stop(self, proc, timeout=15):
        if proc in self.procs:
            self.procs.remove(proc)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # The group may still hold children (gunicorn workers) after the leader is gone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def pids(self):
        return [pid for proc in self.procs for pid in tree(proc.pid)]

    def stop_all(self):
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def children(pid):
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def tree(pid):
    pids = [pid]
    for child in children(pid):
        pids.extend(tree(child))
    return pids


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pids):
    """User + system CPU seconds used so far by these processes."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def machine_cpu():
    """(busy, total) CPU seconds of the whole machine so far, all cores, from /proc/stat.

    Busy counts user, nice and system time only: interrupt and softirq time (the kernel's
    loopback networking, a good share under load) is charged to no process, so leaving it
    out keeps `busy - CPU of the bench's processes` a measure of other people's work.
    """
    tick = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (fields[0] + fields[1] + fields[2]) / tick, sum(fields) / tick


class CpuWatch:
    """How much CPU processes the bench did not start used during a measurement.

    Other people's tests on a shared machine make a benchmark lie; this says how much.
    """

    def __init__(self, bench_pids):
        self.bench_pids = bench_pids

    def __enter__(self):
        self.ours0 = cpu_seconds(self.bench_pids()) + self._children()
        self.busy0, _ = machine_cpu()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        wall = time.monotonic() - self.t0
        busy = machine_cpu()[0] - self.busy0
        ours = cpu_seconds(self.bench_pids()) + self._children() - self.ours0
        self.foreign_pct = max(0.0, (busy - ours) / wall / os.cpu_count() * 100)
        self.busy_pct = busy / wall / os.cpu_count() * 100

    @staticmethod
    def _children():
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime


def calibrate():
    """Milliseconds a fixed pure-Python loop takes: how fast this (virtual) CPU is right now."""
    best = None
    for _ in range(3):
        start = time.perf_counter()
        total = 0
        for i in range(2_000_000):
            total += i
        elapsed = (time.perf_counter() - start) * 1000
        best = elapsed if best is None else min(best, elapsed)
    return round(best, 1)


def background_load(seconds=2.0):
    """Percent of all cores busy while the bench does nothing (other people's work)."""
    busy0, total0 = machine_cpu()
    time.sleep(seconds)
    busy1, total1 = machine_cpu()
    return round(100 * (busy1 - busy0) / max(total1 - total0, 1e-9), 1)


def wait_http(url, proc, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting")
        with contextlib.suppress(OSError):
            if http("GET", url, timeout=1)[0] == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer {url} within {timeout} s")


# ---------------------------------------------------------------- the servers

class Target:
    """Somewhere the load generators send requests: direct, nginx or a gateway."""

    def __init__(self, name, url, key="", pids=lambda: []):
        self.name, self.url, self.key, self._pids = name, url, key, pids

    def pids(self):
        return self._pids()


class Bench:
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
                    "PYTHONUNBUFFERED": "1"})
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
        if status != 200 or "X-RateLimit-Limit" not in headers:
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

    def wrk(self, target, path, connections, duration):
        env = {**os.environ, "BENCH_BODY": json.dumps(BODIES[path]), "BENCH_KEY": target.key}
        pids = target.pids()
        cpu_before = cpu_seconds(pids)
        with CpuWatch(lambda: self.procs.pids() + (self.pg_backends() if self.pg_dbs else [])) \
                as watch:
            result = subprocess.run(
                ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
                 "-s", str(WRK_SCRIPT), target.url + path],
                env=env, capture_output=True, text=True, timeout=duration + 60)
        cpu = cpu_seconds(pids) - cpu_before
        line = next((ln for ln in result.stdout.splitlines() if ln.startswith("BENCH_RESULT ")),
                    None)
        if line is None:
            raise RuntimeError(f"wrk failed: {result.stdout}\n{result.stderr}")
        data = json.loads(line.split(" ", 1)[1])
        if data["requests"] == 0:
            raise RuntimeError(f"wrk completed no request against {target.name} {path}: "
                               f"{result.stdout}\n{result.stderr}")
        seconds = data["duration_us"] / 1e6
        errors = sum(data[k] for k in ("err_connect", "err_read", "err_write", "err_status",
                                       "err_timeout"))
        return {"target": target.name, "path": path, "connections": connections,
                "requests": data["requests"], "rps": data["requests"] / seconds,
                "p50_ms": data["p50_us"] / 1000, "p95_ms": data["p95_us"] / 1000,
                "p99_ms": data["p99_us"] / 1000, "errors": errors,
                "non_2xx": data["err_status"],
                "cpu_us_per_req": cpu / max(data["requests"], 1) * 1e6 if pids else None,
                "machine_busy_pct": watch.busy_pct, "foreign_cpu_pct": watch.foreign_pct}

    def loadgen(self, *argv, timeout=180):
        result = subprocess.run([sys.executable, str(BENCH / "loadgen.py"), *argv],
                                capture_output=True, text=True, timeout=timeout)
        line = next((ln for ln in result.stdout.splitlines() if ln.startswith("BENCH_RESULT ")),
                    None)
        if line is None:
            raise RuntimeError(f"loadgen failed: {result.stdout}\n{result.stderr}")
        return json.loads(line.split(" ", 1)[1])

    # -- the measurements

    def measure_upstream_alone(self, direct):
        log("fake upstream alone (wrk -> fake upstream, 64 connections)")
        row = self.wrk(direct, "/api/generate", 64, self.args.duration)
        self.results["upstream_alone"] = row
        log(f"  {row['rps']:.0f} req/s, p50 {row['p50_ms']:.2f} ms, "
            f"{row['cpu_us_per_req']:.0f} us CPU per request")

    def measure_throughput(self, targets):
        rows = []
        for target in targets:  # warm each target: connection pools, key caches, imports
            if self.args.quick:
                for path in BODIES:
                    for _ in range(20):
                        http("POST", target.url + path, json.dumps(BODIES[path]).encode(),
                             {"Authorization": f"Bearer {target.key}"} if target.key else {})
            else:
                self.wrk(target, "/api/generate", 16, 1)
        for path in BODIES:
            for connections in (1, 16, 64):
                if not self.args.quick:
                    self.results["calibration_ms"].append(calibrate())
                for target in targets:
                    row = self.wrk(target, path, connections, self.args.duration)
                    rows.append(row)
                    log(f"  {path} c={connections:<3} {target.name:<10} {row['rps']:8.0f} req/s"
                        f"  p50 {row['p50_ms']:6.2f}  p95 {row['p95_ms']:6.2f}"
                        f"  p99 {row['p99_ms']:6.2f} ms  errors {row['errors']}")
        self.results["throughput"] = rows

    def measure_streaming(self, targets):
        rows = []
        interval = 1 / TOKEN_RATE
        q = self.args.quick
        # (concurrent streams, streams in all, tokens each)
        plans = [(1, 3, 12), (16, 16, 20)] if q else [(1, 6, 40), (64, 128, 40)]
        for concurrency, streams, tokens in plans:
            for target in targets:
                data = self.loadgen("stream", "--url", target.url, "--path", "/api/generate",
                                    "--key", target.key, "--streams", str(streams),
                                    "--concurrency", str(concurrency), "--tokens", str(tokens),
                                    "--interval", f"{interval:.6f}")
                row = {"target": target.name, "concurrency": concurrency, "streams": streams,
                       "tokens": tokens, **data}
                rows.append(row)
                log(f"  streams c={concurrency:<3} {target.name:<10} ttfb p50 "
                    f"{data['ttfb'].get('p50', 0):6.2f} ms  chunk delay p50 "
                    f"{data['chunk_delay'].get('p50', 0):5.2f} p99 "
                    f"{data['chunk_delay'].get('p99', 0):5.2f} ms  errors {data['errors']}")
        self.results["streaming"] = rows

    def profile(self, target, proc):
        """py-spy on the gateway's workers while wrk drives /api/generate at 16 connections."""
        seconds = self.args.profile_seconds
        raw = self.out / "profile-gw-sqlite.txt"
        spy = subprocess.Popen(
            [py_spy_binary(), "record", "--pid", str(proc.pid), "--subprocesses", "--rate", "200",
             "--duration", str(seconds + 2), "--format", "raw", "--output", str(raw),
             "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1)
        row = self.wrk(target, "/api/generate", 16, seconds)
        try:
            _, err = spy.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        if spy.returncode != 0 or not raw.exists():
            self.results["notes"].append(f"py-spy failed: {err.strip()[-300:]}")
            return
        self.results["profile"] = {"raw": str(raw), "under_load": row,
                                   **summarize_profile(raw.read_text())}

    def measure_scale(self, sqlite_url, key):
        rows = []
        for streams in self.args.scale:
            target, proc = self.start_gateway(f"gw-scale-{streams}", sqlite_url, 1, key=key)
            try:
                worker = children(proc.pid)[0]
                # Warm the worker: imports, pools, caches; then its resting size.
                self.loadgen("stream", "--url", target.url, "--key", key, "--streams", "50",
                             "--concurrency", "50", "--tokens", "3", "--interval", "0.01")
                time.sleep(0.5)
                rss_before = rss_kib(worker)
                rows.append(self.hold_streams(target, worker, streams, rss_before, proc))
            finally:
                self.procs.stop(proc)
        self.results["scale"] = rows

    def hold_streams(self, target, worker, streams, rss_before, proc):
        hold = self.args.hold_seconds
        argv = [sys.executable, str(BENCH / "loadgen.py"), "hold", "--url", target.url,
                "--key", target.key, "--release-url", self.upstream_url,
                "--streams", str(streams), "--interval", str(self.args.slow_interval),
                "--hold", str(hold)]
        gen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(ln) for ln in gen.stdout] and None,
                         daemon=True).start()
        samples = []
        result = None
        deadline = time.monotonic() + 180 + hold
        try:
            while time.monotonic() < deadline and result is None:
                try:
                    line = lines.get(timeout=1)
                except queue.Empty:
                    if gen.poll() is not None and lines.empty():
                        break
                    continue
                if line.startswith("ALL_OPEN"):
                    _, held, open_seconds = line.split()
                    log(f"  {held} of {streams} streams open after {open_seconds} s; "
                        f"holding {hold} s")
                    end = time.monotonic() + hold * 0.8
                    cpu0 = cpu_seconds([worker])
                    t0 = time.monotonic()
                    while time.monotonic() < end:
                        samples.append(rss_kib(worker))
                        time.sleep(0.25)
                    worker_cpu = (cpu_seconds([worker]) - cpu0) / (time.monotonic() - t0)
                elif line.startswith("BENCH_RESULT "):
                    result = json.loads(line.split(" ", 1)[1])
        finally:
            if gen.poll() is None:
                gen.kill()
            gen.wait()
        if result is None:
            raise RuntimeError(f"loadgen hold failed: {gen.stderr.read()[-2000:]}")
        log_text = (self.out / f"{target.name}.log").read_text(errors="replace")
        restarts = len(re.findall(r"Booting worker", log_text)) - 1
        tracebacks = log_text.count("Traceback")
        rss_open = max(samples) if samples else None
        row = {"streams": streams, **result, "worker_restarts": restarts,
               "worker_tracebacks": tracebacks, "rss_before_kib": rss_before,
               "rss_open_kib": rss_open,
               "kib_per_stream": (rss_open - rss_before) / streams if rss_open else None,
               "worker_cpu_while_holding": worker_cpu if samples else None,
               "slow_interval": self.args.slow_interval}
        log(f"  {streams} streams: {result['completed']} completed, {result['errors']} errors, "
            f"worker RSS {rss_before / 1024:.0f} -> {(rss_open or 0) / 1024:.0f} MiB "
            f"({row['kib_per_stream'] or 0:.1f} KiB per stream), restarts {restarts}")
        return row

    def note_openai(self):
        self.results["notes"].append(
            "/v1 (the OpenAI API) is not measured: bench/fake_upstream.py speaks only "
            "Ollama's native API; the gateway relays /v1 with the same code path")

    # -- the whole run

    def run(self):
        a = self.args
        t0 = time.monotonic()
        self.results["machine"] = machine()
        self.results["command"] = "bench/run" + (" --quick" if a.quick else "")
        load = background_load(1 if a.quick else 2)
        deadline = time.monotonic() + a.wait_idle
        while load > 10 and time.monotonic() < deadline:
            log(f"machine {load}% busy before the bench started; waiting for it to settle")
            load = background_load(5)
        if load > 10:
            log(f"WARNING: the machine is {load}% busy with other work; figures will suffer")
            self.results["notes"].append(
                f"the machine was {load}% busy with other processes when the bench started")
        self.results["background_load_pct"] = load
        self.results["calibration_ms"] = [calibrate()]
        self.results["notes"].append(
            "the gw-* targets run with usage accounting on: a usage record, metrics and a "
            "JSON access-log line per request (gw-*-base rows: whatever --baseline-src has)")
        direct = self.start_upstream()
        self.measure_upstream_alone(direct)
        targets = [direct]
        if not a.no_nginx:
            targets.append(self.start_nginx())
        if not a.no_reference:
            targets.append(self.start_reference("ref-flask", "hello"))
            targets.append(self.start_reference("ref-relay", "relay"))
        sqlite_url = f"sqlite:///{self.work / 'gw.db'}"
        gw_sqlite, gw_sqlite_proc = self.start_gateway("gw-sqlite", sqlite_url, a.workers)
        targets.append(gw_sqlite)
        pg_url = None if a.no_postgres else self.setup_postgres()
        gw_pg = None
        if pg_url:
            gw_pg, gw_pg_proc = self.start_gateway("gw-postgres", pg_url, a.workers)
            targets.append(gw_pg)
        if a.baseline_src:
            src = str(Path(a.baseline_src).resolve())
            base_sqlite, _ = self.start_gateway(
                "gw-sqlite-base", f"sqlite:///{self.work / 'gw-base.db'}", a.workers, src=src)
            targets.append(base_sqlite)
            base_pg_url = self.setup_postgres("_base") if pg_url else None
            if base_pg_url:
                base_pg, _ = self.start_gateway("gw-postgres-base", base_pg_url, a.workers,
                                                src=src)
                targets.append(base_pg)
            self.results["baseline_src"] = src
        self.note_openai()
        log(f"targets ready ({', '.join(t.name for t in targets)}); non-streaming throughput, "
            f"{a.duration} s per run")
        self.measure_throughput(targets)
        log(f"streaming at {TOKEN_RATE} tokens/s")
        self.measure_streaming([t for t in targets if not t.name.startswith("ref-")])
        if not a.no_profile:
            log(f"profiling gw-sqlite with py-spy for {a.profile_seconds} s under wrk -c16")
            self.profile(gw_sqlite, gw_sqlite_proc)
        if gw_pg is not None:
            self.procs.stop(gw_pg_proc)
        self.procs.stop(gw_sqlite_proc)
        if a.scale:
            log(f"scale: slow streams (one token every {a.slow_interval} s) held by ONE worker")
            self.measure_scale(sqlite_url, gw_sqlite.key)
        self.results["calibration_ms"].append(calibrate())
        self.results["seconds"] = time.monotonic() - t0
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))
        report = render(self.results)
        (self.out / "results.md").write_text(report)
        print(report)
        log(f"done in {self.results['seconds']:.0f} s; results and logs in {self.out}")
        return 0


# ---------------------------------------------------------------- profile summary

# Areas of the request path, matched against whole stacks (inclusive time).
PROFILE_AREAS = [
    ("gunicorn: parse request, write response", ("gunicorn/http/",)),
    ("Flask/werkzeug's own work (routing, request/response objects)", ("Flask.__call__",)),
    ("app: read and parse the JSON body", ("read_json_body (app/",)),
    ("app: authenticate (key cache)", ("current_key (app/",)),
    ("app: rate limit (database write)", ("Limiter.admit (app/",)),
    ("app: send to upstream (requests/urllib3/http.client)", ("open_upstream (app/",)),
    ("app: relay the answer body", ("RelayBody", "relay_body (app/")),
    ("app: client-hang-up watcher greenlet", ("ClientWatch",)),
    ("Flask teardown: return DB connection to pool", ("do_teardown_appcontext",)),
]


def summarize_profile(raw_text):
    """Self and inclusive shares of the gateway workers' samples, by function and by area."""
    worker = []
    for line in raw_text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [short(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        # Only request handling in the workers (the master and idle loops just sleep).
        if any("gunicorn/workers" in f for f in frames):
            worker.append((frames, int(count)))
    total = sum(c for _, c in worker) or 1
    self_time, libs, areas = {}, {}, {}
    for frames, count in worker:
        leaf = frames[-1] if frames else "?"
        self_time[leaf] = self_time.get(leaf, 0) + count
        libs[library(leaf)] = libs.get(library(leaf), 0) + count
        joined = ";".join(frames)
        for area, needles in PROFILE_AREAS:
            if any(n in joined for n in needles):
                if area.startswith("Flask/") and "(app/" in joined:
                    continue  # the view's time is counted under app: areas
                areas[area] = areas.get(area, 0) + count

    def top(d, n):
        return [(k, round(100 * v / total, 1)) for k, v in
                sorted(d.items(), key=lambda kv: -kv[1])[:n]]

    return {"samples": total, "self_top": top(self_time, 15),
            "areas": [(a, round(100 * areas.get(a, 0) / total, 1)) for a, _ in PROFILE_AREAS],
            "self_by_library": top(libs, 10)}


def short(frame):
    """'func (/…/site-packages/pkg/mod.py:12)' -> 'func (pkg/mod.py)': one entry per function."""
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    func, where = m.groups()
    for marker in ("site-packages/", "/lib/python3.11/", "/lib/python3.12/", str(REPO) + "/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{func} ({where})"


def library(frame):
    m = re.match(r".* \((.*)\)$", frame)
    where = m.group(1) if m else frame
    if where.startswith("app/"):
        return "ollama-gw app/"
    top_name = where.split("/", 1)[0]
    if top_name.endswith(".py"):
        top_name = top_name[:-3]
    return top_name


# ---------------------------------------------------------------- report

def machine():
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    debian = Path("/etc/debian_version").read_text().strip() if Path(
        "/etc/debian_version").exists() else "?"
    versions = {}
    for name in ("gunicorn", "gevent", "flask", "requests", "urllib3", "peewee", "psycopg2"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version
            versions[name] = version(name if name != "psycopg2" else "psycopg2-binary")
    nginx = subprocess.run([nginx_binary() or "nginx", "-v"], capture_output=True,
                           text=True).stderr.strip() if nginx_binary() else "absent"
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem, 1),
            "os": f"Debian {debian}, Linux {platform.release()}",
            "python": platform.python_version(), "nginx": nginx.replace("nginx version: ", ""),
            "packages": versions}


def fmt(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


def render(r):
    out = []
    m = r["machine"]
    out.append(f"## ollama-gw benchmark ({r['started']}, `{r['command']}`)\n")
    out.append(f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, {m['os']}, "
               f"Python {m['python']}, nginx {m['nginx']}; "
               + ", ".join(f"{k} {v}" for k, v in m["packages"].items()) + ". "
               "Load generator, fake upstream, nginx and gateway all share these cores.\n")
    cal = r.get("calibration_ms") or []
    out.append("CPU speed check (a fixed pure-Python loop, best of 3; lower is faster): "
               + " → ".join(f"{c:.0f}" for c in cal) + " ms (start, before each group of "
               "non-streaming runs unless --quick, end); "
               f"other processes kept {r.get('background_load_pct', 0):.0f}% of the machine busy "
               "just before the start.\n")
    u = r["upstream_alone"]
    out.append(f"Fake upstream alone (wrk, 64 connections, /api/generate): **{u['rps']:.0f} "
               f"req/s**, p50 {u['p50_ms']:.2f} ms, {u['cpu_us_per_req']:.0f} µs CPU per "
               "request: far above anything the gateway reaches, so it is not the bottleneck.\n")
    rows = r["throughput"]
    by = {(x["path"], x["connections"], x["target"]): x for x in rows}
    out.append("### Non-streaming requests (wrk, `stream: false`, 32-token answers)\n")
    out.append("Targets: `direct` = straight to the fake upstream; `nginx` = nginx reverse "
               "proxy (2 workers, upstream keep-alive); `ref-flask` = gunicorn+gevent+Flask "
               "answering by itself (no upstream); `ref-relay` = the same plus a requests "
               "relay to the upstream (no key, no limit); `gw-sqlite`, `gw-postgres` = "
               "`ollama-gw serve --workers 2` with a key whose rate limit (100,000,000/minute) "
               "is counted in the database on every request. *added p50* = p50 minus direct's "
               "p50; *CPU µs/req* = CPU of the proxy's processes (and, for gw-postgres, of "
               "its PostgreSQL backends) per request, upstream excluded; *bg* = CPU used by "
               "processes outside the bench during the run (% of the machine).\n")
    out.append("| endpoint | conc. | target | req/s | p50 ms | p95 ms | p99 ms | errors | "
               "added p50 | × nginx req/s | CPU µs/req | bg |")
    out.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for x in rows:
        direct = by.get((x["path"], x["connections"], "direct"))
        nginx = by.get((x["path"], x["connections"], "nginx"))
        added = "" if x["target"] == "direct" or not direct else \
            f"{x['p50_ms'] - direct['p50_ms']:+.2f} ms"
        ratio = "" if x["target"] in ("direct", "nginx") or not nginx else \
            f"{x['rps'] / nginx['rps']:.2f}×"
        cpu = "" if x["target"] == "direct" or x["cpu_us_per_req"] is None else \
            f"{x['cpu_us_per_req']:.0f}"
        name = f"**{x['target']}**" if x["target"].startswith("gw-") else x["target"]
        out.append(f"| {x['path']} | {x['connections']} | {name} | {x['rps']:.0f} | "
                   f"{x['p50_ms']:.2f} | {x['p95_ms']:.2f} | {x['p99_ms']:.2f} | {x['errors']} "
                   f"| {added} | {ratio} | {cpu} | {x.get('foreign_cpu_pct', 0):.0f}% |")
    out.append("")
    s = r.get("streaming") or []
    if s:
        out.append(f"### Streaming (`/api/generate`, {TOKEN_RATE} tokens/s, one token per chunk)\n")
        out.append("TTFB: request sent → first token line received (the fake's first token "
                   f"comes {1000 / TOKEN_RATE:.0f} ms after the request). Chunk delay: each token "
                   "line's arrival minus when the fake upstream wrote it.\n")
        out.append("| conc. | streams × tokens | target | TTFB p50 | p95 | p99 | chunk delay "
                   "p50 | p95 | p99 | added TTFB p50 | added delay p50 / p99 | errors |")
        out.append("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        sby = {(x["concurrency"], x["target"]): x for x in s}
        for x in s:
            d = sby.get((x["concurrency"], "direct"))
            t, c = x["ttfb"], x["chunk_delay"]
            added_t = added_c = ""
            if d and x["target"] != "direct":
                added_t = f"{t['p50'] - d['ttfb']['p50']:+.2f} ms"
                added_c = (f"{c['p50'] - d['chunk_delay']['p50']:+.2f} / "
                           f"{c['p99'] - d['chunk_delay']['p99']:+.2f} ms")
            out.append(f"| {x['concurrency']} | {x['streams']} × {x['tokens']} | {x['target']} | "
                       f"{t['p50']:.2f} | {t['p95']:.2f} | {t['p99']:.2f} | {c['p50']:.2f} | "
                       f"{c['p95']:.2f} | {c['p99']:.2f} | {added_t} | {added_c} | "
                       f"{x['errors']} |")
        out.append("")
    sc = r.get("scale") or []
    if sc:
        out.append(f"### Scale: slow streams held by one gevent worker (SQLite, one token every "
                   f"{sc[0]['slow_interval']:g} s)\n")
        out.append("| streams | all open after | held at once | completed (`done: true`) | "
                   "errors | worker restarts | worker RSS before → open | RSS per stream | "
                   "worker CPU while holding (of one core) |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for x in sc:
            out.append(f"| {x['streams']} | {x['open_seconds']:.1f} s | {x['held_at_measure']} | "
                       f"{x['completed']} | {x['errors']} | {x['worker_restarts']} | "
                       f"{x['rss_before_kib'] / 1024:.0f} → {(x['rss_open_kib'] or 0) / 1024:.0f}"
                       f" MiB | {fmt(x['kib_per_stream'], 1)} KiB | "
                       f"{fmt((x['worker_cpu_while_holding'] or 0) * 100, 0)} % |")
        out.append("")
    p = r.get("profile")
    if p:
        u = p["under_load"]
        out.append("### Profile: py-spy on gw-sqlite's workers under wrk -c16 /api/generate\n")
        out.append(f"{p['samples']} samples at 200 Hz ({u['rps']:.0f} req/s while sampled); "
                   f"raw stacks in `{Path(p['raw']).name}` (open with speedscope.app or "
                   "flamegraph.pl).\n")
        out.append("| where the workers' time goes (inclusive) | % of samples |")
        out.append("|---|---:|")
        for k, v in p["areas"]:
            out.append(f"| {k} | {v} |")
        out.append("")
        out.append("| top self time (function) | % | | self time by package | % |")
        out.append("|---|---:|---|---|---:|")
        libs = p["self_by_library"]
        for i, (k, v) in enumerate(p["self_top"][:10]):
            lib = f"{libs[i][0]} | {libs[i][1]}" if i < len(libs) else " | "
            out.append(f"| `{k}` | {v} | | {lib} |")
        out.append("")
    out.append("### Targets\n")
    out.extend(target_lines(r))
    out.append("")
    if r["notes"]:
        out.append("### Notes\n")
        out.extend(f"- {n}" for n in r["notes"])
        out.append("")
    return "\n".join(out)


def target_lines(r):
    lines = []
    by = {(x["path"], x["connections"], x["target"]): x for x in r["throughput"]}
    gws = sorted({x["target"] for x in r["throughput"] if x["target"].startswith("gw-")})
    for path in BODIES:
        for gw in gws:
            d, g = by.get((path, 1, "direct")), by.get((path, 1, gw))
            if d and g:
                added = g["p50_ms"] - d["p50_ms"]
                lines.append(f"- added p50 latency at concurrency 1, {path}, {gw}: "
                             f"{added:.2f} ms (target < 1 ms: " + (
                                 "met)" if added < 1 else
                                 f"missed by {added - 1:.2f} ms, {added:.1f}× the target)"))
    for path in BODIES:
        for gw in gws:
            n, g = by.get((path, 16, "nginx")), by.get((path, 16, gw))
            if n and g:
                ratio = g["rps"] / n["rps"]
                lines.append(f"- throughput at concurrency 16, 2 workers, {path}, {gw}: "
                             f"{ratio:.2f}× nginx (target ≥ 0.25×: "
                             f"{'met' if ratio >= 0.25 else f'missed, {0.25 / ratio:.1f}× short'})")
    for x in r.get("scale") or []:
        ok = x["errors"] == 0 and x["completed"] == x["streams"] and x["worker_restarts"] == 0 \
            and x["held_at_measure"] == x["streams"]
        goal = " (target: 5,000)" if x["streams"] == 5000 else ""
        lines.append(f"- {x['streams']} concurrent slow streams held by one worker{goal}: "
                     f"{'met' if ok else 'missed'} ({x['held_at_measure']} held, "
                     f"{x['completed']} completed, {x['errors']} errors)")
    return lines


# ---------------------------------------------------------------- main

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a short version: 1 s per load run, no profile, 1,000 streams")
    parser.add_argument("--duration", type=int, help="seconds per wrk run [6; quick 1]")
    parser.add_argument("--workers", type=int, default=2,
                        help="gateway workers and nginx worker processes [2]")
    parser.add_argument("--upstream-processes", type=int, default=1,
                        help="fake upstream processes sharing its port [1]")
    parser.add_argument("--scale", type=lambda s: [int(x) for x in s.split(",") if x],
                        help="slow-stream counts for one worker [1000,5000; quick 1000]; "
                        "'' skips the scale test")
    parser.add_argument("--slow-interval", type=float, default=1.0,
                        help="seconds between tokens of a slow stream [1.0]")
    parser.add_argument("--hold-seconds", type=float, help="how long all streams stay open "
                        "[8; quick 2]")
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the reference apps (Flask alone, Flask + requests relay)")
    parser.add_argument("--baseline-src", metavar="DIR",
                        help="also run the gateway of another checkout (gw-*-base rows), to "
                        "compare before and after a change in the same run")
    parser.add_argument("--wait-idle", type=float, default=0,
                        help="seconds to wait for other work on the machine to finish [0]")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "OLLAMA_GW_BENCH_POSTGRES_URL", PG_ADMIN_DEFAULT),
        help="a PostgreSQL database to connect to while creating and dropping the bench's "
        f"own database [{PG_ADMIN_DEFAULT}]")
    parser.add_argument("--out", help="directory for results and logs [bench/out/<time>]")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 1 if args.quick else 6
    if args.scale is None:
        args.scale = [1000] if args.quick else [1000, 5000]
    if args.hold_seconds is None:
        args.hold_seconds = 2 if args.quick else 8
    if args.quick:
        args.no_profile = True
        args.no_reference = True
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    ensure_tools(need_profiler=not args.no_profile)
    # 5,000 streams are 10,000+ sockets in the gateway worker: raise the open-file limit
    # here; every process the bench starts inherits it.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(s for s in (args.scale or [0])) * 2 + 1000
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < wanted:
        log(f"open-file limit {hard} is below the {wanted} the scale test needs; "
            "expect errors (raise it with ulimit -Hn as root)")
    # Ctrl-C, a closed terminal or a kill stop everything the bench started (a shell that
    # runs us in the background may have left SIGINT ignored: take it back).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    bench = Bench(args)
    try:
        return bench.run()
    except KeyboardInterrupt:
        log("interrupted: stopping everything the bench started")
        return 130
    finally:
        bench.cleanup()


if __name__ == "__main__":
    sys.exit(main())
