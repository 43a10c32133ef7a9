"""Does a large request body stall the other streams of a worker? (issue 6, item 4)

One gevent worker relays a slow stream (a token every 10 ms) while four 60 MiB bodies
arrive at once: without a key, with a wrong key in a header, then with a valid key. For
each phase it prints the stream's per-chunk delay (the time from the upstream writing a
token to the client reading it) and the worker's RSS afterwards.

    bench/big_bodies.py                              # this tree
    bench/big_bodies.py --baseline-src /tmp/old      # and another checkout beside it

All traffic stays on 127.0.0.1; every process started is stopped at the end.
"""
import argparse
import base64
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the bench's process and gateway helpers)

BODY_MIB = 60
SENDERS = 4


def big_body(key=None):
    image = base64.b64encode(os.urandom(BODY_MIB * 1024 * 1024 * 3 // 4)).decode()
    fields = {"model": "llama3.2", "prompt": "describe", "images": [image], "stream": False}
    if key:
        fields["apikey"] = key
    return json.dumps(fields).encode()


class StreamWatch(threading.Thread):
    """Reads one slow stream and records (read at, delay since the upstream wrote it)."""

    def __init__(self, url, key):
        super().__init__(daemon=True)
        self.url, self.key = url, key
        self.samples = []
        self.done = threading.Event()

    def run(self):
        host, port = self.url.split("//")[1].split(":")
        body = json.dumps({"model": "llama3.2", "prompt": "x", "bench_interval": 0.01,
                           "options": {"num_predict": 100_000}}).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer "
                         + self.key.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
                         + body)
            reader = sock.makefile("rb")
            while not self.done.is_set():
                line = reader.readline()
                if not line:
                    return
                if b"bench_t" in line:
                    self.samples.append((time.monotonic(),
                                         time.monotonic() - json.loads(line)["bench_t"]))


def send_bodies(url, body, headers=b""):
    """Send SENDERS copies of `body` at once; return their status codes."""
    host, port = url.split("//")[1].split(":")
    statuses = [None] * SENDERS

    def one(i):
        try:
            with socket.create_connection((host, int(port)), timeout=120) as sock:
                sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: b\r\n" + headers
                             + b"Content-Length: %d\r\n\r\n" % len(body))
                try:
                    sock.sendall(body)
                except OSError:
                    pass  # refused early: the gateway closed without reading it all
                statuses[i] = int(sock.recv(64).split()[1])
        except (OSError, IndexError, ValueError):
            statuses[i] = "error"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(SENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def measure(run, name, src, args):
    db = Path(tempfile.mkdtemp(prefix="bigbody-")) / "gw.db"
    target, proc = run.start_gateway(name, f"sqlite:///{db}", 1, src=src)
    worker = bench.children(proc.pid)[0]
    watch = StreamWatch(target.url, target.key)
    watch.start()
    time.sleep(2)  # the stream settles
    rows = []
    phases = [("idle (no body)", None, b""),
              ("4 x 60 MiB, no key", big_body(), b""),
              ("4 x 60 MiB, wrong key header", big_body(),
               b"Authorization: Bearer ogw_" + b"x" * 43 + b"\r\n"),
              ("4 x 60 MiB, valid key", big_body(),
               b"Authorization: Bearer " + target.key.encode() + b"\r\n")]
    for label, body, headers in phases:
        started = time.monotonic()
        statuses = send_bodies(target.url, body, headers) if body else []
        time.sleep(1)
        ended = time.monotonic()
        delays = [d * 1000 for t, d in watch.samples if started <= t <= ended]
        rows.append({"gateway": name, "phase": label, "statuses": statuses,
                     "seconds": round(ended - started - 1, 2),
                     "chunks": len(delays),
                     "p50_ms": round(statistics.median(delays), 2) if delays else None,
                     "max_ms": round(max(delays), 1) if delays else None,
                     "worker_rss_mib": round(bench.rss_kib(worker) / 1024)})
    watch.done.set()
    run.procs.stop(proc)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", help="another checkout to measure beside this one")
    args = parser.parse_args(argv)
    run = bench.Bench(bench.parse_args(["--quick"]))
    try:
        run.start_upstream()
        rows = measure(run, "gateway", None, args)
        if args.baseline_src:
            rows += measure(run, "baseline", os.path.abspath(args.baseline_src), args)
    finally:
        run.procs.stop_all()
        run.cleanup()
    print("| gateway | phase | answers | phase s | chunks | per-chunk delay p50 ms | max ms "
          "| worker RSS MiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        answers = ",".join(str(s) for s in r["statuses"]) or "-"
        print(f"| {r['gateway']} | {r['phase']} | {answers} | {r['seconds']} | {r['chunks']} "
              f"| {r['p50_ms']} | {r['max_ms']} | {r['worker_rss_mib']} |")


if __name__ == "__main__":
    main()
