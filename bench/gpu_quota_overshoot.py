"""A burst at a small GPU quota (issue 28): how far past `--gpu-quota` does a key get?

One gateway (2 workers, upstream_max_concurrent 4: a slot-second is 0.25 GPU s) in front
of the fast fake Ollama, whose total_duration is the time it really served a request. For
each case a new key with `--gpu-quota QUOTA/day` fires `--burst` streamed /api/generate
requests at once; once every request has ended and its reservation is settled, `ollama-gw
usage --key KEY --json` gives the GPU seconds charged. The overshoot is what was charged
past the quota; "one request" is the GPU time one admitted request was charged.

    bench/gpu_quota_overshoot.py [--quota 2] [--burst 40] [--postgres]

Cases: a new key (no history: each request reserves gpu_quota_estimate_seconds of a slot,
60 s / 4 = 15 GPU s, more than the quota, so requests are admitted one at a time); a key
that ran 5 requests like the burst's first (the estimate is the longest of them); and a key
whose 5 requests were 4x shorter than the burst's (the estimate is 4x too low: each
admitted request may run past it by its error). All traffic stays on 127.0.0.1; every
process started is stopped at the end.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the bench's process and gateway helpers)
from quota_overshoot import burst, charged, cli, one  # noqa: E402  (the same harness)

LONG = {"prompt": "Why is the sky blue?", "options": {"num_predict": 40}}  # 40 x 10 ms
SHORT = {"prompt": "Why is the sky blue?", "options": {"num_predict": 10}}
CASES = [("new key: the default estimate", None), ("warmed up by 5 like it", LONG),
         ("warmed up by 5 four times shorter", SHORT)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quota", type=int, default=2, help="GPU seconds a day")
    parser.add_argument("--burst", type=int, default=40)
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL, not SQLite")
    args = parser.parse_args(argv)
    run = bench.Bench(bench.parse_args(["--quick"]))
    results = []
    try:
        run.start_upstream()
        url = (run.setup_postgres("_gpu_quota") if args.postgres else
               f"sqlite:///{Path(tempfile.mkdtemp(prefix='bench-gpu-quota-')) / 'gw.db'}")
        env = {**run.gateway_env(url), "OLLAMA_GW_UPSTREAM_MAX_CONCURRENT": "4"}
        port = bench.free_port()
        proc = run.procs.start("gw-gpu-quota", [*bench.ollama_gw_command(), "serve",
                                                "--bind", f"127.0.0.1:{port}", "--workers",
                                                "2"], run.out / "gw-gpu-quota.log", env=env)
        gateway = f"http://127.0.0.1:{port}"
        bench.wait_http(gateway + "/health", proc, "gateway", timeout=60)
        for i, (label, warm) in enumerate(CASES):
            key = cli(env, "keys", "add", "--name", f"gpu-burst-{i}", "--rate-limit", "none",
                      "--gpu-quota", f"{args.quota * 100}s/day")
            before = 0.0
            if warm is not None:  # history to estimate from, then the quota it is judged by
                for _ in range(5):
                    one(gateway, key["key"], warm)
                before = charged(env, key["prefix"], "gpu_quota")["gpu_quota"]["used"]
            cli(env, "keys", "update", key["prefix"], "--gpu-quota", f"{args.quota}s/day")
            time.sleep(1.5)  # key_cache_seconds: every worker sees the new quota
            if before >= args.quota:
                raise SystemExit(f"warming up used {before} s, past the quota: raise --quota")
            statuses = burst(gateway, key["key"], LONG, args.burst)
            row = charged(env, key["prefix"], "gpu_quota")
            served = statuses.count(200)
            used = row["gpu_quota"]["used"]
            each = (used - before) / served if served else 0.0
            results.append((label, served, statuses.count(429), used, used - args.quota, each))
    finally:
        run.procs.stop_all()
        run.cleanup()
    print(f"GPU quota {args.quota}s/day, {args.burst} streamed requests at once (0.4 s each "
          f"on a 4-slot upstream), {'PostgreSQL' if args.postgres else 'SQLite'}, 2 workers\n")
    print("| case | served | refused | GPU s charged | overshoot | one request |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, served, refused, used, over, each in results:
        print(f"| {label} | {served} | {refused} | {used:.3f} | {over:+.3f} | {each:.3f} |")


if __name__ == "__main__":
    main()
