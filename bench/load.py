"""Load generators and what they measure: throughput, streaming delays, held streams, profile."""
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time

from processes import (
    BENCH,
    REPO,
    CpuWatch,
    calibrate,
    children,
    cpu_seconds,
    http,
    log,
    py_spy_binary,
    rss_kib,
)
from targets import BODIES, Targets

WRK_SCRIPT = BENCH / "wrk_report.lua"
TOKEN_RATE = 40  # tokens per second for the streaming tests (a typical local model)


class Measurements(Targets):
    """The load runs: wrk for throughput, bench/loadgen.py for streams, py-spy for a profile."""

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

    def profile(self, target, pid):
        """py-spy on a target's workers while wrk drives /api/generate at 16 connections.

        Run for gw-sqlite and for ref-relay: side by side, the CPU each spends per request
        in each area names what the gateway does that the bare relay does not
        (results["profiles"]).
        """
        seconds = self.args.profile_seconds
        raw = self.out / f"profile-{target.name}.txt"
        spy = subprocess.Popen(
            [py_spy_binary(), "record", "--pid", str(pid), "--subprocesses", "--rate",
             str(PROFILE_RATE), "--duration", str(seconds + 2), "--format", "raw", "--output",
             str(raw), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        time.sleep(1)
        row = self.wrk(target, "/api/generate", 16, seconds)
        try:
            _, err = spy.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        if spy.returncode != 0 or not raw.exists():
            self.results["notes"].append(f"py-spy failed on {target.name}: {err.strip()[-300:]}")
            return
        self.results.setdefault("profiles", {})[target.name] = {
            "raw": str(raw), "under_load": row,
            **summarize_profile(raw.read_text(), row["cpu_us_per_req"])}

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


# ---------------------------------------------------------------- profile summary

PROFILE_RATE = 200  # py-spy samples per second
GUNICORN_AREA = "gunicorn: read the request, write the response"  # and a request's rest
# Areas of the request path, each sample counted in the first whose names its stack has:
# the gateway's own steps first, then what ref-relay does too (bench/reference_app.py
# is matched as well), then Flask; what is left of a request is gunicorn's.
PROFILE_AREAS = [
    ("app: fair queue: enter and leave an upstream's queue", ("FairQueue.",)),
    ("app: rate limit (database write)", ("Limiter.admit (app/",)),
    ("app: authenticate (key cache)", ("_authenticate (app/",)),
    ("app: usage record, metrics, access log", ("(app/accounting/request_record.py", "UsageWriter.",
                                                "Tally.")),
    ("app: client-hang-up watcher", ("ClientWatch",)),
    ("Flask teardown: return DB connection to pool", ("do_teardown_appcontext",)),
    ("app: read and parse the JSON body", ("read_body (app/", "JsonBody.")),
    ("send to upstream (requests/urllib3/http.client)", ("open_upstream (app/",
                                                         "Session.request (requests/")),
    ("relay the answer body", ("RelayBody", "relay_answer.<locals>.body")),
    (GUNICORN_AREA, ("gunicorn/http/",)),
    ("Flask/werkzeug's own work (routing, hooks, request/response objects)",
     ("Flask.__call__",)),
]
OUTSIDE_AREA = "outside requests: the event loop, usage writer, keepers"


def summarize_profile(raw_text, cpu_us_per_req=None):
    """Shares of the workers' samples in request handling, by function (self) and by area.

    With `cpu_us_per_req` (the processes' CPU per request while sampled, from /proc),
    each area's share of it in µs: the CPU is split in proportion to all samples, those
    outside request handling (the hub, the usage writer, keepers) included. Samples alone
    cannot give time: a process waiting for one of the two cores still looks busy.
    """
    worker, outside = [], 0
    for line in raw_text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [short(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        # Request handling in the workers; the rest is their background work.
        if any("gunicorn/workers" in f for f in frames):
            worker.append((frames, int(count)))
        else:
            outside += int(count)
    total = sum(c for _, c in worker) or 1
    self_time, libs, areas = {}, {}, {}
    for frames, count in worker:
        leaf = frames[-1] if frames else "?"
        self_time[leaf] = self_time.get(leaf, 0) + count
        libs[library(leaf)] = libs.get(library(leaf), 0) + count
        joined = ";".join(frames)
        area = next((area for area, needles in PROFILE_AREAS
                     if any(n in joined for n in needles)), GUNICORN_AREA)
        areas[area] = areas.get(area, 0) + count

    def top(d, n):
        return [(k, round(100 * v / total, 1)) for k, v in
                sorted(d.items(), key=lambda kv: -kv[1])[:n]]

    us = (cpu_us_per_req or 0) / (total + outside)  # CPU per request, per sample
    areas[OUTSIDE_AREA] = outside
    return {"samples": total, "self_top": top(self_time, 15),
            "areas": [(a, round(100 * areas.get(a, 0) / total, 1)) for a, _ in PROFILE_AREAS],
            "us_per_request": {a: round(areas.get(a, 0) * us)
                               for a in [*(a for a, _ in PROFILE_AREAS), OUTSIDE_AREA]},
            "cpu_us_per_request": round(cpu_us_per_req or 0),
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


