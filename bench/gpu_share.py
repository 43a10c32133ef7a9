"""Two greedy keys share a busy GPU: by request count, or by GPU time (issue 28).

One gateway (2 workers) in front of the fast fake Ollama with upstream_max_concurrent 2.
Key "long" sends requests ten times as long as key "short"'s (19 tokens against 1, one
every 40 ms after a first wait of 40 ms: 0.8 s and 0.08 s); each keeps 8 requests in
flight for the whole run.
For queue_fair = "gpu_time" and "requests", side by side: each key's requests served and
its share of the GPU's time (the time its requests held a slot: answer time less the
X-Queue-Wait the gateway reports, summed).

    bench/gpu_share.py [--seconds 60] [--postgres]

All traffic stays on 127.0.0.1; every process started is stopped at the end.
"""
import argparse
import concurrent.futures
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the bench's process and gateway helpers)

INTERVAL, CALLERS = 0.04, 8
TOKENS = {"long": 19, "short": 1}


def start_gateway(run, url, mode):
    env = {**run.gateway_env(url), "OLLAMA_GW_UPSTREAM_MAX_CONCURRENT": "2",
           "OLLAMA_GW_QUEUE_PER_KEY": "1000", "OLLAMA_GW_QUEUE_FAIR": mode}
    keys = {name: json.loads(subprocess.run(
        [*bench.ollama_gw_command(), "keys", "add", "--name", name, "--rate-limit", "none",
         "--json"], env=env, capture_output=True, text=True, check=True, timeout=60).stdout)["key"]
        for name in TOKENS}
    port = bench.free_port()
    proc = run.procs.start(f"gw-{mode}", [*bench.ollama_gw_command(), "serve", "--bind",
                                          f"127.0.0.1:{port}", "--workers", "2"],
                           run.out / f"gw-{mode}.log", env=env)
    gateway = f"http://127.0.0.1:{port}"
    bench.wait_http(gateway + "/health", proc, "gateway", timeout=60)
    return gateway, keys, proc


def contend(gateway, keys, seconds):
    """Both keys' callers until `seconds` pass: {name: (requests, seconds holding a slot)}."""
    stop = threading.Event()
    served = {name: [0, 0.0] for name in keys}
    lock = threading.Lock()

    def greedy(name):
        session = requests.Session()
        body = {"model": "llama3.2", "prompt": "x", "bench_interval": INTERVAL,
                "options": {"num_predict": TOKENS[name]}}
        headers = {"Authorization": f"Bearer {keys[name]}"}
        while not stop.is_set():
            started = time.monotonic()
            with session.post(gateway + "/api/generate", json=body, headers=headers,
                              stream=True, timeout=600) as answer:
                for _ in answer.iter_content(None):
                    pass
                if answer.status_code != 200:
                    raise RuntimeError(f"{answer.status_code}: {answer.text[:200]}")
                held = time.monotonic() - started - float(answer.headers.get("X-Queue-Wait", 0))
            if stop.is_set():
                break  # it ended after the run: not counted
            with lock:
                served[name][0] += 1
                served[name][1] += held

    with concurrent.futures.ThreadPoolExecutor(CALLERS * len(keys)) as pool:
        futures = [pool.submit(greedy, name) for name in keys for _ in range(CALLERS)]
        time.sleep(seconds)
        stop.set()
        for future in futures:
            future.result()
    return served


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL, not SQLite")
    args = parser.parse_args(argv)
    run = bench.Bench(bench.parse_args(["--quick"]))
    rows = []
    try:
        run.start_upstream()
        for mode in ("gpu_time", "requests"):
            url = (run.setup_postgres("_" + mode) if args.postgres else
                   f"sqlite:///{Path(tempfile.mkdtemp(prefix='bench-share-')) / 'gw.db'}")
            gateway, keys, proc = start_gateway(run, url, mode)
            rows.append((mode, contend(gateway, keys, args.seconds)))
            run.procs.stop(proc)
    finally:
        run.procs.stop_all()
        run.cleanup()
    print(f"upstream_max_concurrent 2; key long: {TOKENS['long']} tokens, key short: "
          f"{TOKENS['short']}, one per {INTERVAL * 1000:.0f} ms; {CALLERS} requests in flight "
          f"each; {args.seconds:g} s, {'PostgreSQL' if args.postgres else 'SQLite'}, "
          "2 workers\n")
    print("| queue_fair | long: requests | short: requests | long: share of requests "
          "| long: share of GPU time | short: share of GPU time |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, served in rows:
        total_n = sum(n for n, _ in served.values()) or 1
        total_t = sum(t for _, t in served.values()) or 1
        print(f"| `{mode}` | {served['long'][0]} | {served['short'][0]} | "
              f"{served['long'][0] / total_n:.0%} | {served['long'][1] / total_t:.0%} | "
              f"{served['short'][1] / total_t:.0%} |")


if __name__ == "__main__":
    main()
