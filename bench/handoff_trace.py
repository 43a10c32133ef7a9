"""Where a fair-queue hand-off's time goes, step by step (issue 26).

The setting of bench/queue_handoff.py (the fake Ollama capped at 4, answering in 20 ms;
16 clients on one key through `ollama-gw serve --workers 2`, upstream_max_concurrent 4),
with timestamps along the path: the fake writes when each request arrived and when its
answer's last byte left (`--trace`), and the gateway's processes load
bench/handoff_hooks/sitecustomize.py, which wraps the functions a hand-off passes
through (nothing in app/ changes; that module lists the steps). Every hand-off is
followed from the answer that freed a slot to the arrival of the request granted it,
and the table gives each step's p50, p90 and mean, for hand-offs within one worker and
between two. The gateway's time also includes the hooks' own (a few µs a step).

    bench/handoff_trace.py [--seconds 6] [--service 0.02] [--instances 1]

Before that, the clients' turn-around straight at the fake, for comparison (`direct`:
the fake's idle time per hand-off with 4 clients and no gateway). 127.0.0.1 only; every
process started is stopped.
"""
import argparse
import collections
import os
import statistics
import sys
import tempfile
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import queue_handoff  # noqa: E402
import run as bench  # noqa: E402

HOOKS = Path(__file__).resolve().parent / "handoff_hooks"
STEPS = [("fake sent the answer → the worker read its status line", "done", "status"),
         ("→ requests built the response", "status", "head"),
         ("→ the relay frees the slot", "head", "rel"),
         ("→ the grant committed", "rel", "grant"),
         ("→ delivered to the waiting request's worker", "grant", "deliver"),
         ("→ the request runs again", "deliver", "woke"),
         ("→ Upstream.send() called", "woke", "send0"),
         ("→ its last byte written", "send0", "written"),
         ("→ the fake read it", "written", "arrive")]


def read(directory):
    """Events [(ns, pid, step, id, greenlet)], in time order."""
    events = []
    for path in Path(directory).glob("*.txt"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 5:
                events.append((int(parts[0]), int(parts[1]), parts[2], int(parts[3]),
                               int(parts[4])))
    return sorted(events)


def hand_offs(events):
    """{"same": [{step: ns}], "other": [...]}: each grant followed from the answer that
    freed its slot to the granted request's arrival at the fake."""
    by_greenlet = collections.defaultdict(list)
    fake = collections.defaultdict(list)  # (step, port) -> [ns]
    first = {}  # (step, entry id) -> event
    for event in events:
        ns, pid, step, ident, greenlet = event
        if step in ("arrive", "done"):
            fake[(step, ident)].append(ns)
        else:
            by_greenlet[(pid, greenlet)].append(event)
            first.setdefault((step, ident), event)

    def before(seq, ns, step):
        found = None
        for event in seq:
            if event[0] > ns:
                break
            if event[2] == step:
                found = event
        return found

    def after(seq, ns, step):
        return next((e for e in seq if e[0] >= ns and e[2] == step), None)

    found = {"same": [], "other": []}
    for grant in (e for e in events if e[2] == "grant"):
        ns, pid, _, entry_id, greenlet = grant
        releaser = by_greenlet[(pid, greenlet)]
        rel = before(releaser, ns, "rel")
        head = rel and before(releaser, rel[0], "head")
        status = head and before(releaser, head[0], "status")
        done = head and [t for t in fake[("done", head[3])] if t <= head[0]]
        deliver, woke = first.get(("deliver", entry_id)), first.get(("woke", entry_id))
        if not (rel and status and done and deliver and woke):
            continue
        waiter = by_greenlet[(woke[1], woke[4])]
        send0 = after(waiter, woke[0], "send0")
        written = send0 and after(waiter, send0[0], "written")
        its_head = written and after(waiter, written[0], "head")
        arrive = its_head and [t for t in fake[("arrive", its_head[3])]
                               if written[0] <= t <= its_head[0]]
        if not arrive:
            continue
        times = {"done": done[-1], "status": status[0], "head": head[0], "rel": rel[0],
                 "grant": ns, "deliver": deliver[0], "woke": woke[0], "send0": send0[0],
                 "written": written[0], "arrive": arrive[0]}
        found["same" if woke[1] == pid else "other"].append(times)
    return found


def row(values):
    values = sorted(values)
    if not values:
        return "| | |"
    return (f"{values[len(values) // 2]:.2f} / {values[int(0.9 * len(values))]:.2f} | "
            f"{statistics.mean(values):.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--service", type=float, default=0.02, help="seconds [0.02]")
    parser.add_argument("--instances", type=int, choices=(1, 2), default=1,
                        help="gateways of 2 workers on one SQLite database [1]")
    args = parser.parse_args(argv)
    run = bench.Bench(bench.parse_args(["--quick"]))
    traces = tempfile.mkdtemp(prefix="handoff-trace-")
    try:
        port = bench.free_port()
        upstream = f"http://127.0.0.1:{port}"
        proc = run.procs.start("fake-upstream", [
            sys.executable, str(Path(__file__).resolve().parent / "fake_upstream.py"),
            "--port", str(port), "--cap", str(queue_handoff.CAP),
            "--trace", os.path.join(traces, "fake.txt")], run.out / "fake_upstream.log")
        bench.wait_http(upstream + "/api/version", proc, "fake upstream")
        run.upstream_url = upstream
        hooked = {"PYTHONPATH": os.pathsep.join(
            filter(None, [str(HOOKS), os.environ.get("PYTHONPATH")])), "BENCH_TRACE_DIR": traces}
        with mock.patch.dict(os.environ, hooked):  # the gateways' environment comes from it
            gateways, key = queue_handoff.start_gateways(
                run, f"sqlite:///{run.work / 'gw.db'}", "trace")
        gateways = gateways[:args.instances]
        direct = queue_handoff.measure(upstream, "direct", [upstream], "", queue_handoff.CAP,
                                       args.service, args.seconds)
        for path in Path(traces).glob("*.txt"):  # direct's, and the start-up's
            path.write_text("")
        through = queue_handoff.measure(upstream, "gateway", [g for g, _ in gateways], key,
                                        4 * queue_handoff.CAP, args.service, args.seconds,
                                        [p for _, p in gateways])
        for _, gateway in gateways:
            run.procs.stop(gateway)  # its workers' files complete
        found = hand_offs(read(traces))
    finally:
        run.procs.stop_all()
        run.cleanup()
        for path in Path(traces).glob("*"):
            path.unlink()
        os.rmdir(traces)
    print(f"\n{args.instances} gateway(s) of 2 workers, SQLite; service "
          f"{args.service * 1000:g} ms; "
          f"direct {direct['rate']:.1f} req/s, through the gateway {through['rate']:.1f} "
          f"({through['rate'] / direct['rate']:.3f} × direct); the fake's idle per hand-off "
          f"p50: direct {statistics.median(direct['idle']):.2f} ms, through the gateway "
          f"{statistics.median(through['idle']):.2f} ms\n")
    print("| step (ms) | same worker p50 / p90 | mean | other worker p50 / p90 | mean |")
    print("|---|---:|---:|---:|---:|")
    for label, start, end in STEPS + [("whole hand-off", "done", "arrive")]:
        cells = [row([(h[end] - h[start]) / 1e6 for h in found[kind]])
                 for kind in ("same", "other")]
        print(f"| {label} | {cells[0]} | {cells[1]} |")
    print(f"| hand-offs followed | {len(found['same'])} | | {len(found['other'])} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
