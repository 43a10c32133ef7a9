"""The ollama-gw benchmark suite: one command, one table.

    bench/run            # the full suite (about 6 minutes on 2 cores)
    bench/run --quick    # a short version (under a minute)

Everything runs on this machine and talks to 127.0.0.1 only: a fast fake Ollama
(bench/fake_upstream.py), nginx as a plain reverse proxy (the floor), and ollama-gw
itself (`ollama-gw serve`) on SQLite and on PostgreSQL, each measured side by side with
going straight to the fake upstream, in the same run. See bench/README.md.

The pieces: processes.py (starting and stopping, machine readings), targets.py (the
servers compared), load.py (load generators and measurements), report.py (the tables).
"""
import argparse
import contextlib
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

from load import (  # noqa: F401  (also for bench scripts: `import run as bench`)
    BODIES,
    TOKEN_RATE,
    Measurements,
)
from processes import (  # noqa: F401  (also for bench scripts: `import run as bench`)
    background_load,
    calibrate,
    children,
    ensure_tools,
    free_port,
    http,
    log,
    machine,
    ollama_gw_command,
    py_spy_binary,
    rss_kib,
    wait_http,
)
from report import (  # noqa: F401  (also for bench scripts: `import run as bench`)
    render,
)
from targets import (  # noqa: F401  (also for bench scripts: `import run as bench`)
    PG_ADMIN_DEFAULT,
    Target,
)


class Bench(Measurements):
    """One run: start every target, measure them in turn, write results.json and results.md."""

    def run(self):
        a = self.args
        t0 = time.monotonic()
        self.results["machine"] = machine()
        self.results["command"] = "bench/run" + (" --quick" if a.quick else "")
        load = background_load(1 if a.quick else 2)
        deadline = time.monotonic() + a.wait_idle
        while load > 10 and time.monotonic() < deadline:
            log(f"machine {load}% busy before the bench started; waiting for it to settle")
            load = background_load(5)
        if load > 10:
            log(f"WARNING: the machine is {load}% busy with other work; figures will suffer")
            self.results["notes"].append(
                f"the machine was {load}% busy with other processes when the bench started")
        self.results["background_load_pct"] = load
        self.results["calibration_ms"] = [calibrate()]
        self.results["notes"].append(
            "the gw-* targets run with usage accounting on: a usage record, metrics and a "
            "JSON access-log line per request (gw-*-base rows: whatever --baseline-src has)")
        direct = self.start_upstream()
        self.measure_upstream_alone(direct)
        targets = [direct]
        if not a.no_nginx:
            targets.append(self.start_nginx())
        if not a.no_reference:
            targets.append(self.start_reference("ref-flask", "hello"))
            targets.append(self.start_reference("ref-relay", "relay"))
        sqlite_url = f"sqlite:///{self.work / 'gw.db'}"
        gw_sqlite, gw_sqlite_proc = self.start_gateway("gw-sqlite", sqlite_url, a.workers)
        targets.append(gw_sqlite)
        pg_url = None if a.no_postgres else self.setup_postgres()
        gw_pg = None
        if pg_url:
            gw_pg, gw_pg_proc = self.start_gateway("gw-postgres", pg_url, a.workers)
            targets.append(gw_pg)
        if a.baseline_src:
            src = str(Path(a.baseline_src).resolve())
            base_sqlite, _ = self.start_gateway(
                "gw-sqlite-base", f"sqlite:///{self.work / 'gw-base.db'}", a.workers, src=src)
            targets.append(base_sqlite)
            base_pg_url = self.setup_postgres("_base") if pg_url else None
            if base_pg_url:
                base_pg, _ = self.start_gateway("gw-postgres-base", base_pg_url, a.workers,
                                                src=src)
                targets.append(base_pg)
            self.results["baseline_src"] = src
        self.note_openai()
        log(f"targets ready ({', '.join(t.name for t in targets)}); non-streaming throughput, "
            f"{a.duration} s per run")
        self.measure_throughput(targets)
        log(f"streaming at {TOKEN_RATE} tokens/s")
        # ref-relay streams too (the floor for added time to first byte); ref-flask cannot.
        self.measure_streaming([t for t in targets if t.name != "ref-flask"])
        if not a.no_profile:
            for target, pid in [(gw_sqlite, gw_sqlite_proc.pid), *(
                    (t, t.pids()[0]) for t in targets if t.name == "ref-relay")]:
                log(f"profiling {target.name} with py-spy for {a.profile_seconds} s "
                    "under wrk -c16")
                self.profile(target, pid)
        if gw_pg is not None:
            self.procs.stop(gw_pg_proc)
        self.procs.stop(gw_sqlite_proc)
        if a.scale:
            log(f"scale: slow streams (one token every {a.slow_interval} s) held by ONE worker")
            self.measure_scale(sqlite_url, gw_sqlite.key)
        self.results["calibration_ms"].append(calibrate())
        self.results["seconds"] = time.monotonic() - t0
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))
        report = render(self.results)
        (self.out / "results.md").write_text(report)
        print(report)
        log(f"done in {self.results['seconds']:.0f} s; results and logs in {self.out}")
        return 0



# ---------------------------------------------------------------- main

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a short version: 1 s per load run, no profile, 1,000 streams")
    parser.add_argument("--duration", type=int, help="seconds per wrk run [6; quick 1]")
    parser.add_argument("--workers", type=int, default=2,
                        help="gateway workers and nginx worker processes [2]")
    parser.add_argument("--upstream-processes", type=int, default=1,
                        help="fake upstream processes sharing its port [1]")
    parser.add_argument("--scale", type=lambda s: [int(x) for x in s.split(",") if x],
                        help="slow-stream counts for one worker [1000,5000; quick 1000]; "
                        "'' skips the scale test")
    parser.add_argument("--slow-interval", type=float, default=1.0,
                        help="seconds between tokens of a slow stream [1.0]")
    parser.add_argument("--hold-seconds", type=float, help="how long all streams stay open "
                        "[8; quick 2]")
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the reference apps (Flask alone, Flask + requests relay)")
    parser.add_argument("--baseline-src", metavar="DIR",
                        help="also run the gateway of another checkout (gw-*-base rows), to "
                        "compare before and after a change in the same run")
    parser.add_argument("--wait-idle", type=float, default=0,
                        help="seconds to wait for other work on the machine to finish [0]")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "OLLAMA_GW_BENCH_POSTGRES_URL", PG_ADMIN_DEFAULT),
        help="a PostgreSQL database to connect to while creating and dropping the bench's "
        f"own database [{PG_ADMIN_DEFAULT}]")
    parser.add_argument("--out", help="directory for results and logs [bench/out/<time>]")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 1 if args.quick else 6
    if args.scale is None:
        args.scale = [1000] if args.quick else [1000, 5000]
    if args.hold_seconds is None:
        args.hold_seconds = 2 if args.quick else 8
    if args.quick:
        args.no_profile = True
        args.no_reference = True
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    ensure_tools(need_profiler=not args.no_profile)
    # 5,000 streams are 10,000+ sockets in the gateway worker: raise the open-file limit
    # here; every process the bench starts inherits it.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(s for s in (args.scale or [0])) * 2 + 1000
    if hard < wanted:
        with contextlib.suppress(ValueError, OSError):  # root may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            soft, hard = wanted, wanted
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < wanted:
        log(f"open-file limit {hard} is below the {wanted} the scale test needs; "
            "expect errors (raise it with ulimit -Hn as root)")
    # Ctrl-C, a closed terminal or a kill stop everything the bench started (a shell that
    # runs us in the background may have left SIGINT ignored: take it back).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    bench = Bench(args)
    try:
        return bench.run()
    except KeyboardInterrupt:
        log("interrupted: stopping everything the bench started")
        return 130
    finally:
        bench.cleanup()


if __name__ == "__main__":
    sys.exit(main())
