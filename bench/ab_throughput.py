"""Throughput of this tree against another checkout, in alternating short runs.

One long run per target on a shared 2-core machine compares two different minutes; this
alternates many short wrk runs (concurrency 16, 2 workers, SQLite) between the two
gateways, so both see the same machine, and reports the median of the per-round ratios
of requests per second and of CPU per request (the steadier of the two figures).

    bench/ab_throughput.py --baseline-src /tmp/before            # 8 rounds of 5 s
    bench/ab_throughput.py --baseline-src /tmp/before --rounds 12 --postgres
    bench/ab_throughput.py --src /tmp/after --baseline-src /tmp/before   # two other trees
    bench/ab_throughput.py --ref-relay --rounds 12          # against the stack's floor

`--ref-relay` compares with bench/reference_app.py's relay (Flask and a requests
session, no key, limit or database; bench/README.md) instead of another checkout: how
far the gateway, doing all its work, is from the stack it is built on.

All traffic stays on 127.0.0.1; every process started is stopped at the end.
"""
import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the bench's process, gateway and wrk helpers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    baseline = parser.add_mutually_exclusive_group(required=True)
    baseline.add_argument("--baseline-src", help="the checkout to compare with")
    baseline.add_argument("--ref-relay", action="store_true",
                          help="compare with ref-relay, the plain Flask + requests relay")
    parser.add_argument("--src", help="the checkout to measure [this one]")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run [5]")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL, not SQLite")
    args = parser.parse_args(argv)
    bench.ensure_tools(need_profiler=False)  # wrk, on a fresh machine
    run = bench.Bench(bench.parse_args(["--quick"]))
    baseline = "ref-relay" if args.ref_relay else "baseline"
    rows = {"gateway": [], baseline: []}
    try:
        run.start_upstream()
        targets = []
        trees = [("gateway", args.src and os.path.abspath(args.src))]
        if args.baseline_src:
            trees.append(("baseline", os.path.abspath(args.baseline_src)))
        for name, src in trees:
            if args.postgres:
                url = run.setup_postgres("_" + name)
                if url is None:
                    raise SystemExit("PostgreSQL is not reachable")
            else:
                url = f"sqlite:///{Path(tempfile.mkdtemp(prefix='ab-')) / 'gw.db'}"
            targets.append(run.start_gateway(name, url, 2, src=src)[0])
        if args.ref_relay:
            targets.append(run.start_reference("ref-relay", "relay"))
        for target in targets:  # warm up: pools, caches, imports
            run.wrk(target, "/api/generate", args.connections, 1)
        for i in range(args.rounds):
            path = list(bench.BODIES)[i % len(bench.BODIES)]
            order = targets if i % 2 == 0 else targets[::-1]  # neither always goes first
            for target in order:
                row = run.wrk(target, path, args.connections, args.duration)
                rows[target.name].append(row)
                bench.log(f"round {i + 1} {path:<13} {target.name:<9} {row['rps']:7.0f} req/s"
                          f"  {row['cpu_us_per_req']:6.0f} µs CPU/req  errors {row['errors']}")
    finally:
        run.procs.stop_all()
        run.cleanup()
    failed = {name: sum(r["errors"] for r in rows[name]) for name in rows}
    if any(failed.values()):  # a refused request is cheap: its ratios would mean nothing
        print(f"ERRORS (non-2xx answers or failed connections): {failed}; the ratios below "
              "compare failures, not relayed requests")
    pairs = list(zip(rows["gateway"], rows[baseline], strict=True))
    rps = [g["rps"] / b["rps"] for g, b in pairs]
    cpu = [g["cpu_us_per_req"] / b["cpu_us_per_req"] for g, b in pairs]
    print(f"{'SQLite' if not args.postgres else 'PostgreSQL'}, concurrency "
          f"{args.connections}, {args.rounds} rounds of {args.duration} s")
    for name in rows:
        print(f"{name:<9} req/s median {statistics.median(r['rps'] for r in rows[name]):7.0f}"
              f"   CPU µs/req median "
              f"{statistics.median(r['cpu_us_per_req'] for r in rows[name]):6.0f}")
    print(f"throughput ratio (this / {baseline}): median {statistics.median(rps):.2f}, "
          f"range {min(rps):.2f}-{max(rps):.2f}")
    print(f"CPU per request ratio: median {statistics.median(cpu):.2f}, "
          f"range {min(cpu):.2f}-{max(cpu):.2f}")


if __name__ == "__main__":
    main()
