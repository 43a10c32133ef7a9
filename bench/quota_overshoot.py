"""A burst at a small token quota (issue 22): how far past the quota does a key get?

One gateway (2 workers) in front of the fast fake Ollama. For each case a new key with
`--token-quota QUOTA/day` fires `--burst` streamed /api/generate requests at once (the
fake writes one token every 10 ms, so they overlap); once every request has ended and
its reservation is settled, `ollama-gw usage --key KEY --json` gives the tokens charged.
The overshoot is what was charged past the quota; "one request" is what one admitted
request was charged (the bound the README promises, when the estimate is not below what
Ollama counts).

    bench/quota_overshoot.py [--quota 1010] [--burst 50] [--postgres]

Cases: an answer cap (num_predict 20); no cap (the gateway caps the answer at what is
left); and a prompt of one-letter words, twice what four characters a token would make
of it (app/admission/estimate.py counts a token a word at least). An estimate below what Ollama
counts lets each admitted request run past by its error: before words were counted,
the last case charged 1,560 tokens of 1,010. All traffic stays on 127.0.0.1; every
process started is stopped at the end.
"""
import argparse
import concurrent.futures
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the bench's process and gateway helpers)

PROMPT = "Why is the sky blue?"  # 20 characters, 5 tokens estimated; 5 words counted
CASES = [
    ("answer cap num_predict 20", {"prompt": PROMPT, "options": {"num_predict": 20}}),
    ("no cap (capped at what is left)", {"prompt": PROMPT}),
    ("one-letter words, cap 20", {"prompt": "a " * 40, "options": {"num_predict": 20}}),
]


def cli(env, *args):
    return json.loads(subprocess.run([*bench.ollama_gw_command(), *args, "--json"], env=env,
                                     capture_output=True, text=True, check=True,
                                     timeout=120).stdout)


def one(gateway, key, body):
    """One streamed /api/generate read to its end; its status."""
    with requests.post(gateway + "/api/generate", stream=True, timeout=300,
                       json={"model": "llama3.2", "bench_interval": 0.01, **body},
                       headers={"Authorization": f"Bearer {key}"}) as answer:
        for _ in answer.iter_content(None):
            pass
        return answer.status_code


def burst(gateway, key, body, count):
    """`count` streamed requests at once; their statuses."""
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: one(gateway, key, body), range(count)))


def charged(env, prefix, quota="token_quota"):
    """The key's usage row once nothing of `quota` is reserved any more (every request
    settled): token_quota, or gpu_quota (bench/gpu_quota_overshoot.py)."""
    deadline = time.monotonic() + 120
    while True:
        rows = cli(env, "usage", "--key", prefix, "--since", "1d")
        if rows and rows[0][quota]["reserved"] == 0 or time.monotonic() > deadline:
            return rows[0]
        time.sleep(0.5)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quota", type=int, default=1010)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL, not SQLite")
    args = parser.parse_args(argv)
    run = bench.Bench(bench.parse_args(["--quick"]))
    results = []
    try:
        run.start_upstream()
        url = (run.setup_postgres("_quota") if args.postgres else
               f"sqlite:///{Path(tempfile.mkdtemp(prefix='bench-quota-')) / 'gw.db'}")
        env = run.gateway_env(url)
        port = bench.free_port()
        proc = run.procs.start("gw-quota", [*bench.ollama_gw_command(), "serve", "--bind",
                                            f"127.0.0.1:{port}", "--workers", "2"],
                               run.out / "gw-quota.log", env=env)
        gateway = f"http://127.0.0.1:{port}"
        bench.wait_http(gateway + "/health", proc, "gateway", timeout=60)
        for i, (label, body) in enumerate(CASES):
            key = cli(env, "keys", "add", "--name", f"burst-{i}", "--rate-limit", "none",
                      "--token-quota", f"{args.quota}/day")
            statuses = burst(gateway, key["key"], body, args.burst)
            row = charged(env, key["prefix"])
            served = statuses.count(200)
            used = row["token_quota"]["used"]
            results.append((label, served, statuses.count(429), used,
                            used - args.quota, used // served if served else 0))
    finally:
        run.procs.stop_all()
        run.cleanup()
    print(f"token quota {args.quota}/day, {args.burst} streamed requests at once, "
          f"{'PostgreSQL' if args.postgres else 'SQLite'}, 2 workers\n")
    print("| case | served | refused | tokens charged | overshoot | one request |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, served, refused, used, over, each in results:
        print(f"| {label} | {served} | {refused} | {used} | {over:+d} | {each} |")


if __name__ == "__main__":
    main()
