"""A busy GPU shared by a greedy key and two light ones (issue 11), and aborts that leak nothing.

One gateway (2 workers) in front of the fake Ollama with upstream_max_concurrent 2: each
answer streams 10 tokens 20 ms apart (a service time of about 0.2 s). A greedy key keeps
100 requests in flight for the whole run while two light keys each send one request a
second; the light keys' waits (the X-Queue-Wait header) are reported with fair
scheduling and with first come, first served (queue_fair = false), side by side. Then
`--aborts` requests are cut off at random points — waiting, running or streaming — and
the queue must be empty afterwards, with both slots free.

    bench/fair_queue.py [--seconds 20] [--aborts 10000] [--postgres]

All traffic stays on 127.0.0.1; every process started is stopped at the end.
"""
import argparse
import concurrent.futures
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the bench's process and gateway helpers)

BODY = {"model": "llama3.2", "prompt": "Why is the sky blue?", "bench_interval": 0.02,
        "options": {"num_predict": 10}}
GREEDY, LIGHT = 100, 2


def start_gateway(run, url, fair):
    env = {**run.gateway_env(url), "OLLAMA_GW_UPSTREAM_MAX_CONCURRENT": "2",
           "OLLAMA_GW_QUEUE_PER_KEY": "1000", "OLLAMA_GW_QUEUE_FAIR": "requests" if fair else "off"}
    keys = [json.loads(subprocess.run(
        [*bench.ollama_gw_command(), "keys", "add", "--name", name, "--rate-limit", "none",
         "--json"], env=env, capture_output=True, text=True, check=True, timeout=60).stdout)["key"]
        for name in ("greedy", "light-1", "light-2")]
    port = bench.free_port()
    name = "gw-fair" if fair else "gw-fifo"
    proc = run.procs.start(name, [*bench.ollama_gw_command(), "serve", "--bind",
                                  f"127.0.0.1:{port}", "--workers", "2"],
                           run.out / f"{name}.log", env=env)
    gateway = f"http://127.0.0.1:{port}"
    bench.wait_http(gateway + "/health", proc, "gateway", timeout=60)
    return gateway, keys, env, proc


def call(gateway, key, session):
    """One streamed request read to its end; its wait in the queue, in seconds."""
    with session.post(gateway + "/api/generate", json=BODY, stream=True, timeout=600,
                      headers={"Authorization": f"Bearer {key}"}) as answer:
        for _ in answer.iter_content(None):
            pass
        if answer.status_code != 200:
            raise RuntimeError(f"{answer.status_code}: {answer.text[:200]}")
        return float(answer.headers.get("X-Queue-Wait", 0))


def contend(gateway, keys, seconds):
    """The greedy key's 100 callers and the light keys' one a second; the light waits."""
    stop = threading.Event()
    waits, greedy_done = [], [0]

    def greedy():
        session = requests.Session()
        while not stop.is_set():
            call(gateway, keys[0], session)
            greedy_done[0] += 1

    def light(key):
        session = requests.Session()
        next_at = time.monotonic() + 2  # let the greedy key's backlog build first
        while not stop.is_set():
            stop.wait(max(0.0, next_at - time.monotonic()))
            if stop.is_set():
                break
            waits.append(call(gateway, key, session))
            next_at += 1.0

    with concurrent.futures.ThreadPoolExecutor(GREEDY + LIGHT) as pool:
        futures = [pool.submit(greedy) for _ in range(GREEDY)]
        futures += [pool.submit(light, key) for key in keys[1:]]
        time.sleep(seconds)
        stop.set()
        for future in futures:
            future.result()
    return waits, greedy_done[0]


def abort_many(gateway, key, count, env):
    """`count` requests cut off at random points; then the queue must be empty."""
    rng = random.Random(7)
    body = json.dumps({**BODY, "bench_interval": 0.005}).encode()
    head = (b"POST /api/generate HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n" % (key.encode(), len(body)))
    port = int(gateway.rsplit(":", 1)[1])

    def abort(_):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head + body)
            time.sleep(rng.uniform(0, 0.1))

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        list(pool.map(abort, range(count)))
    seconds = time.monotonic() - started
    deadline, left = time.monotonic() + 120, None
    while time.monotonic() < deadline:
        left = json.loads(subprocess.run([*bench.ollama_gw_command(), "queue", "--json"],
                                         env=env, capture_output=True, text=True,
                                         timeout=60).stdout)
        if not left:
            break
        time.sleep(0.5)
    session = requests.Session()
    free = [call(gateway, key, session) for _ in range(2)]
    return seconds, left, free


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--aborts", type=int, default=10000)
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL, not SQLite")
    args = parser.parse_args(argv)
    run = bench.Bench(bench.parse_args(["--quick"]))
    rows, aborted = [], None
    try:
        run.start_upstream()
        for fair in (True, False):
            url = (run.setup_postgres("_fair" if fair else "_fifo") if args.postgres else
                   f"sqlite:///{Path(tempfile.mkdtemp(prefix='bench-fair-')) / 'gw.db'}")
            gateway, keys, env, proc = start_gateway(run, url, fair)
            waits, greedy = contend(gateway, keys, args.seconds)
            rows.append(("fair (start-time fair queueing)" if fair else
                         "first come, first served", waits, greedy))
            if fair and args.aborts:
                aborted = abort_many(gateway, keys[0], args.aborts, env)
            run.procs.stop(proc)
    finally:
        run.procs.stop_all()
        run.cleanup()
    print(f"upstream_max_concurrent 2, service time about 0.2 s; greedy key: {GREEDY} "
          f"requests in flight; {LIGHT} light keys: one request a second each; "
          f"{args.seconds:g} s, {'PostgreSQL' if args.postgres else 'SQLite'}, 2 workers\n")
    print("| scheduling | light requests | light wait p50 s | p95 s | max s | greedy served |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, waits, greedy in rows:
        print(f"| {label} | {len(waits)} | {statistics.median(waits):.2f} | "
              f"{pct(waits, 0.95):.2f} | {max(waits):.2f} | {greedy} |")
    if aborted is not None:
        seconds, left, free = aborted
        print(f"\n{args.aborts} requests aborted at random points in {seconds:.0f} s: "
              f"{len(left or [])} queue entries left behind; the next two requests waited "
              f"{free[0]:.3f} s and {free[1]:.3f} s")


if __name__ == "__main__":
    main()
