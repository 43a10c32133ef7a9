"""How much of a busy GPU the fair queue keeps busy (issue 26): a capped upstream's
throughput straight and through the gateway, side by side.

The fake Ollama (bench/fake_upstream.py --cap 4) serves 4 requests at once, each in a
fixed service time (20 ms and 200 ms), and queues the rest as Ollama does with
OLLAMA_NUM_PARALLEL=4. Straight at it, 4 clients keep its 4 slots busy (`direct`, c =
cap); through the gateway (upstream_max_concurrent = 4), 16 clients on one key
(c = 4 x cap), so a request always waits in the fair queue and each freed slot must be
handed on. Gateways: one `ollama-gw serve --workers 2`, and two of them on one database
(the clients split between them), on SQLite and PostgreSQL. Each figure is the median
of `--rounds` runs, the targets alternating within each round. The fake also says how
long each slot sat idle per hand-off (the last byte of one answer to the arrival of
the next request), and the most requests it had at once, which must never pass 4.
The gateways' CPU per request is their processes' (workers' and master's) user and system
time during a run, from /proc, over the requests answered.

    bench/queue_handoff.py [--seconds 4] [--rounds 3] [--no-postgres] [--services 0.02,0.2]

About 4 minutes with the defaults. 127.0.0.1 only; every process started is stopped,
the bench's PostgreSQL database dropped.
"""
import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the bench's process and gateway helpers)
from processes import REPO, cpu_seconds, tree  # noqa: E402

CAP = 4
NAMES = ("2 workers", "2 instances x 2 workers")
BODY = {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": 1}}


def start_gateways(run, url, label, src=None):
    """Two `serve` instances of 2 workers on one database; [(url, proc)] and the key.

    `src`: the gateway of another checkout (--baseline-src), as bench/run.py runs it."""
    env = {**run.gateway_env(url), "OLLAMA_GW_UPSTREAM_MAX_CONCURRENT": str(CAP),
           "OLLAMA_GW_QUEUE_PER_KEY": "1000"}
    if src:
        env["PYTHONPATH"] = src
    command = bench.ollama_gw_command(src)
    key = json.loads(subprocess.run(
        [*command, "keys", "add", "--name", "handoff", "--rate-limit", "none", "--json"],
        env=env, cwd=src, capture_output=True, text=True, check=True, timeout=60).stdout)["key"]
    gateways = []
    for n in (1, 2):
        port = bench.free_port()
        proc = run.procs.start(f"gw-{label}-{n}", [
            *command, "serve", "--bind", f"127.0.0.1:{port}", "--workers", "2"],
            run.out / f"gw-{label}-{n}.log", env=env, cwd=src or REPO)
        gateways.append((f"http://127.0.0.1:{port}", proc))
    for gateway, proc in gateways:
        bench.wait_http(gateway + "/health", proc, "gateway", timeout=60)
    return gateways, key


def load(urls, clients, key, service, seconds):
    """`clients` closed-loop keep-alive clients spread over `urls` for `seconds`: req/s
    and the errors. Each client's rate is its answers from the end of its first to the
    last that ended within the run, over that time (no rounding to whole requests; no
    start-up, and no drain: every client is still sending when the run ends); the
    clients' rates add up."""
    body = json.dumps({**BODY, "bench_service": service}).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    stop_at = time.monotonic() + seconds
    rates, errors = [], []

    def client(url):
        host, port = url.rsplit("/", 1)[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        ends = []
        while time.monotonic() < stop_at:
            conn.request("POST", "/api/generate", body, headers)
            answer = conn.getresponse()
            answer.read()
            if answer.status != 200:
                errors.append(answer.status)
            ends.append(time.monotonic())
        conn.close()
        ends = [end for end in ends if end <= stop_at]
        if len(ends) > 1:
            rates.append((len(ends) - 1) / (ends[-1] - ends[0]))

    threads = [threading.Thread(target=client, args=(urls[i % len(urls)],))
               for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(rates), errors


def gateway_cpu(procs):
    """User and system CPU seconds so far of `procs` and their children (gunicorn's workers)."""
    return cpu_seconds([pid for proc in procs for pid in tree(proc.pid)])


def measure(upstream, name, urls, key, clients, service, seconds, procs=()):
    bench.http("POST", upstream + "/bench/reset")
    cpu_before, started = gateway_cpu(procs), time.monotonic()
    rate, errors = load(urls, clients, key, service, seconds)
    answered = rate * (time.monotonic() - started)
    cpu_ms = (gateway_cpu(procs) - cpu_before) * 1000 / answered if procs and answered else None
    stats = json.loads(bench.http("GET", upstream + "/bench/stats")[2])
    if stats["max_in_flight"] > CAP:
        raise SystemExit(f"{name}: the upstream had {stats['max_in_flight']} requests at once, "
                         f"over its cap of {CAP}")
    idle = stats["idle_ms"]
    bench.log(f"{name} service {service * 1000:g} ms: {rate:.1f} req/s, idle per hand-off "
              f"p50 {statistics.median(idle) if idle else float('nan'):.2f} ms, "
              f"max in flight {stats['max_in_flight']}, errors {len(errors)}")
    return {"rate": rate, "idle": idle, "max_in_flight": stats["max_in_flight"],
            "errors": len(errors), "cpu_ms": cpu_ms}


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4, help="per run [4]")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, alternating [3]")
    parser.add_argument("--services", default="0.02,0.2",
                        help="service times in seconds, comma-separated [0.02,0.2]")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--baseline-src", metavar="DIR",
                        help="also run the gateways of another checkout (`… (baseline)` rows)")
    args = parser.parse_args(argv)
    baseline = str(Path(args.baseline_src).resolve()) if args.baseline_src else None
    services = [float(s) for s in args.services.split(",")]
    run = bench.Bench(bench.parse_args(["--quick"]))
    results = {}  # (database, target, service) -> [run]
    try:
        port = bench.free_port()
        upstream = f"http://127.0.0.1:{port}"
        proc = run.procs.start("fake-upstream", [
            sys.executable, str(Path(__file__).resolve().parent / "fake_upstream.py"),
            "--port", str(port), "--cap", str(CAP)], run.out / "fake_upstream.log")
        bench.wait_http(upstream + "/api/version", proc, "fake upstream")
        run.upstream_url = upstream
        databases = [("SQLite", lambda suffix: f"sqlite:///{run.work / f'gw{suffix}.db'}")]
        if not args.no_postgres and run.setup_postgres("_probe"):
            databases.append(("PostgreSQL", lambda suffix: run.setup_postgres(f"_handoff{suffix}")))
        for label, make_url in databases:
            targets = [("direct", [upstream], "", CAP, [])]
            running = []
            for suffix, src in [("", None)] + ([("_base", baseline)] if baseline else []):
                gateways, key = start_gateways(run, make_url(suffix), label.lower() + suffix, src)
                running += gateways
                tag = " (baseline)" if src else ""
                targets += [(NAMES[0] + tag, [gateways[0][0]], key, 4 * CAP, [gateways[0][1]]),
                            (NAMES[1] + tag, [g for g, _ in gateways], key, 4 * CAP,
                             [proc for _, proc in gateways])]
            for service in services:
                for n in range(args.rounds):
                    order = targets if n % 2 == 0 else targets[::-1]
                    for name, urls, k, clients, procs in order:
                        results.setdefault((label, name, service), []).append(
                            measure(upstream, f"{label} {name}", urls, k, clients, service,
                                    args.seconds, procs))
            for _, proc in running:
                run.procs.stop(proc)
    finally:
        run.procs.stop_all()
        run.cleanup()
    print(f"\nupstream capped at {CAP} (fake Ollama, fixed service time); direct: {CAP} "
          f"clients; gateway: {4 * CAP} clients, one key; median of {args.rounds} "
          f"alternating runs of {args.seconds:g} s\n")
    print("| database | service | direct req/s | gateway | req/s | × direct | "
          "idle per hand-off p50 / p90 ms | gateway CPU per request | most at once |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for label, _ in databases:
        for service in services:
            direct = statistics.median(r["rate"] for r in results[(label, "direct", service)])
            for name in [t for n in NAMES for t in (n, n + " (baseline)")]:
                runs = results.get((label, name, service))
                if not runs:
                    continue
                rate = statistics.median(r["rate"] for r in runs)
                idle = [ms for r in runs for ms in r["idle"]]
                errors = sum(r["errors"] for r in runs)
                cpu = statistics.median(r["cpu_ms"] for r in runs)
                print(f"| {label} | {service * 1000:g} ms | {direct:.1f} | {name} | {rate:.1f} | "
                      f"{rate / direct:.3f} | {pct(idle, 0.5):.2f} / {pct(idle, 0.9):.2f} | "
                      f"{cpu:.2f} ms | "
                      f"{max(r['max_in_flight'] for r in runs)}"
                      + (f" ({errors} errors)" if errors else "") + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
