"""Processes the bench starts and what it reads off the machine.

Starting and stopping servers, the open-file and CPU readings that say how far a
run can be trusted, the tools it installs when missing (wrk, nginx, py-spy).
"""
import contextlib
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
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


