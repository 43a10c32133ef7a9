"""Do SQLite writes stall streams? 64 new streams at once, ten times (issue 7, item 3).

Each of 64 streams opened together is admitted with a SQLite write (its key's rate
limit is counted) and, when it ends, recorded by the usage writer. With SQLite's own
busy wait a worker waiting for the write lock froze all its streams; the gateway now
waits cooperatively. Prints the per-chunk delay p99 and time-to-first-byte p99 of each
run, for this tree and optionally another checkout.

    bench/sqlite_streams.py                            # this tree, 10 runs
    bench/sqlite_streams.py --baseline-src /tmp/old    # and another checkout, interleaved

All traffic stays on 127.0.0.1; every process started is stopped at the end.
"""
import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the bench's process and gateway helpers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--baseline-src", help="another checkout to measure beside this one")
    args = parser.parse_args(argv)
    run = bench.Bench(bench.parse_args(["--quick"]))
    results = {}
    try:
        run.start_upstream()
        targets = []
        for name, src in [("gateway", None), ("baseline", args.baseline_src)]:
            if name == "baseline" and not src:
                continue
            db = Path(tempfile.mkdtemp(prefix="sqlite-streams-")) / "gw.db"
            target, _ = run.start_gateway(name, f"sqlite:///{db}", 2,
                                          src=os.path.abspath(src) if src else None)
            targets.append(target)
            results[name] = []
        for i in range(args.runs):
            for target in targets:  # interleaved: both see the same machine
                data = run.loadgen("stream", "--url", target.url, "--path", "/api/generate",
                                   "--key", target.key, "--streams", str(args.streams),
                                   "--concurrency", str(args.streams),
                                   "--tokens", str(args.tokens),
                                   "--interval", f"{1 / bench.TOKEN_RATE:.6f}")
                results[target.name].append(data)
                bench.log(f"run {i + 1}: {target.name:<9} chunk delay p99 "
                          f"{data['chunk_delay'].get('p99', 0):6.2f} ms  ttfb p99 "
                          f"{data['ttfb'].get('p99', 0):7.2f} ms  errors {data['errors']}")
    finally:
        run.procs.stop_all()
        run.cleanup()
    names = list(results)
    print(f"| run | {' | '.join(f'{n} chunk p99 ms | {n} ttfb p99 ms' for n in names)} |")
    print("|---:|" + "---:|" * (2 * len(names)))
    for i in range(args.runs):
        cells = [f"{results[n][i]['chunk_delay'].get('p99', 0):.2f} | "
                 f"{results[n][i]['ttfb'].get('p99', 0):.1f}" for n in names]
        print(f"| {i + 1} | {' | '.join(cells)} |")
    for n in names:
        p99s = [r["chunk_delay"].get("p99", 0) for r in results[n]]
        print(f"{n}: chunk delay p99 median {statistics.median(p99s):.2f} ms, "
              f"worst {max(p99s):.2f} ms over {args.runs} runs; errors "
              f"{sum(r['errors'] for r in results[n])}")


if __name__ == "__main__":
    main()
