"""Streaming load generator for bench/run.py (gevent, raw sockets, 127.0.0.1 only).

Non-streaming throughput is measured with wrk; this measures what wrk cannot:

  stream  N streamed answers, C at a time. For each: time to first byte (request sent ->
          first token line) and, for every token line, its relay delay: arrival time
          minus the `bench_t` the fake upstream stamped when it wrote the line (both
          CLOCK_MONOTONIC, the same clock in every process on the machine).
  hold    open N slow streams and keep them open; print `ALL_OPEN` once every stream has
          received its first token, wait --hold seconds (run.py measures memory then),
          ask the fake upstream to end them (POST /bench/release) and check that each
          ends with a `done: true` line.

Prints progress lines on stdout and, last, `BENCH_RESULT {json}`.
"""
import argparse
import json
import math
import sys
import time
from urllib.parse import urlsplit

import gevent
import gevent.event
import gevent.pool
import gevent.socket
from gevent.lock import BoundedSemaphore


class StreamError(Exception):
    pass


def request_bytes(host, port, path, key, body):
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}",
            "Content-Type: application/json", f"Content-Length: {len(body)}",
            "Connection: close"]
    if key:
        head.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Stream:
    """One streamed request over its own connection; records when each line arrived."""

    def __init__(self, target, path, key, body, timeout):
        parts = urlsplit(target)
        self.addr = (parts.hostname, parts.port)
        self.request = request_bytes(parts.hostname, parts.port, path, key, body)
        self.timeout = timeout
        self.sent_at = None
        self.first_at = None
        self.lines = []  # (arrived_at, line bytes)
        self.done = False
        self.status = None
        self.on_first = None

    def run(self):
        sock = gevent.socket.create_connection(self.addr, timeout=self.timeout)
        try:
            sock.setsockopt(gevent.socket.IPPROTO_TCP, gevent.socket.TCP_NODELAY, 1)
            self.sent_at = time.monotonic()
            sock.sendall(self.request)
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    raise StreamError("connection closed before the response headers")
                buf += data
            arrived = time.monotonic()
            head, _, buf = buf.partition(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            self.status = int(status_line.split(" ", 2)[1])
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (h.partition(":") for h in header_lines)}
            if self.status != 200:
                raise StreamError(f"HTTP {self.status}")
            if headers.get("transfer-encoding", "").lower() != "chunked":
                raise StreamError("response is not chunked")
            pending = b""  # body bytes of an unfinished NDJSON line
            while True:
                # Decode every complete chunk in buf.
                while True:
                    eol = buf.find(b"\r\n")
                    if eol < 0:
                        break
                    size = int(buf[:eol].split(b";")[0], 16)
                    if size == 0:
                        self._lines(pending, arrived, final=True)
                        return
                    if len(buf) < eol + 2 + size + 2:
                        break
                    pending += buf[eol + 2:eol + 2 + size]
                    buf = buf[eol + 2 + size + 2:]
                    pending = self._lines(pending, arrived)
                data = sock.recv(65536)
                if not data:
                    raise StreamError("connection closed in the middle of the stream")
                arrived = time.monotonic()
                buf += data
        finally:
            sock.close()

    def _lines(self, pending, arrived, final=False):
        while b"\n" in pending:
            line, _, pending = pending.partition(b"\n")
            if self.first_at is None:
                self.first_at = arrived
                if self.on_first is not None:
                    self.on_first(self)
            self.lines.append((arrived, line))
            if b'"done":true' in line:
                self.done = True
        if final and pending.strip():
            raise StreamError("stream ended inside a line")
        return pending


def percentiles(values, points=(50, 95, 99)):
    if not values:
        return {f"p{p}": None for p in points}
    ordered = sorted(values)
    out = {}
    for p in points:
        index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
        out[f"p{p}"] = ordered[index]
    return out


def body_for(path, tokens, interval, hold=False):
    payload = {"model": "llama3.2", "options": {"num_predict": tokens},
               "bench_interval": interval, "bench_first": 0.05 if hold else interval}
    if path.endswith("/chat"):
        payload["messages"] = [{"role": "user", "content": "Why is the sky blue?"}]
    else:
        payload["prompt"] = "Why is the sky blue?"
    if hold:
        payload["bench_hold"] = True
    return json.dumps(payload).encode()


def cmd_stream(args):
    body = body_for(args.path, args.tokens, args.interval)
    streams = [Stream(args.url, args.path, args.key, body, args.timeout)
               for _ in range(args.streams)]
    errors = []

    def one(stream):
        try:
            stream.run()
            if not stream.done:
                errors.append("no done line")
        except (OSError, StreamError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    pool = gevent.pool.Pool(args.concurrency)
    started = time.monotonic()
    with gevent.Timeout(args.deadline, False):
        pool.map(one, streams)
    elapsed = time.monotonic() - started
    if pool.size - pool.free_count():
        errors.append(f"{pool.size - pool.free_count()} streams still open at the deadline")
        pool.kill(block=False)
    ttfb = [s.first_at - s.sent_at for s in streams if s.first_at is not None]
    delays = []
    for s in streams:
        for arrived, line in s.lines:
            if b'"bench_t"' in line:
                delays.append(arrived - json.loads(line)["bench_t"])
    result = {"streams": len(streams), "ok": sum(s.done for s in streams),
              "errors": len(errors), "error_samples": errors[:5], "seconds": elapsed,
              "lines": sum(len(s.lines) for s in streams),
              "ttfb": {k: v * 1000 for k, v in percentiles(ttfb).items() if v is not None},
              "chunk_delay": {k: v * 1000 for k, v in percentiles(delays).items()
                              if v is not None}}
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def cmd_hold(args):
    body = body_for(args.path, 1000000, args.interval, hold=True)
    streams = [Stream(args.url, args.path, args.key, body, args.timeout)
               for _ in range(args.streams)]
    errors = []
    opening = BoundedSemaphore(args.opening)
    opened = [0]
    all_open = gevent.event.Event()

    def first(_stream):
        opening.release()
        opened[0] += 1
        if opened[0] == len(streams):
            all_open.set()

    def one(stream):
        stream.on_first = first
        opening.acquire()
        try:
            stream.run()
            if not stream.done:
                errors.append("no done line")
        except (OSError, StreamError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            if stream.first_at is None:
                opening.release()
                all_open.set()  # cannot all be open now: stop waiting

    started = time.monotonic()
    greenlets = [gevent.spawn(one, s) for s in streams]
    all_open.wait(args.open_deadline)
    open_seconds = time.monotonic() - started
    held = sum(1 for s in streams if s.first_at is not None and not s.done)
    print(f"ALL_OPEN {held} {open_seconds:.2f}", flush=True)
    gevent.sleep(args.hold)
    still_open = sum(1 for s in streams if s.first_at is not None and not s.done)
    parts = urlsplit(args.release_url)
    with gevent.socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(b"POST /bench/release HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                     b"Connection: close\r\n\r\n")
        while sock.recv(65536):
            pass
    gevent.joinall(greenlets, timeout=args.close_deadline)
    unfinished = sum(1 for g in greenlets if not g.dead)
    gevent.killall(greenlets, block=False)
    if unfinished:
        errors.append(f"{unfinished} streams did not end within {args.close_deadline} s")
    result = {"streams": len(streams), "opened": opened[0], "held_at_measure": held,
              "still_open_after_hold": still_open, "open_seconds": open_seconds,
              "completed": sum(s.done for s in streams), "errors": len(errors),
              "error_samples": sorted(set(errors))[:5],
              "lines": sum(len(s.lines) for s in streams)}
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("stream", "hold"):
        p = sub.add_parser(name)
        p.add_argument("--url", required=True, help="http://127.0.0.1:PORT")
        p.add_argument("--path", default="/api/generate")
        p.add_argument("--key", default="")
        p.add_argument("--streams", type=int, required=True)
        p.add_argument("--interval", type=float, default=0.025, help="seconds between tokens")
        p.add_argument("--timeout", type=float, default=60.0, help="socket timeout")
    stream = sub.choices["stream"]
    stream.add_argument("--concurrency", type=int, default=1)
    stream.add_argument("--tokens", type=int, default=40)
    stream.add_argument("--deadline", type=float, default=120.0)
    hold = sub.choices["hold"]
    hold.add_argument("--release-url", required=True, help="the fake upstream")
    hold.add_argument("--hold", type=float, default=5.0, help="seconds to hold all streams")
    hold.add_argument("--opening", type=int, default=200,
                      help="streams being opened at once (waiting for their first token)")
    hold.add_argument("--open-deadline", type=float, default=120.0)
    hold.add_argument("--close-deadline", type=float, default=60.0)
    args = parser.parse_args(argv)
    for url in (args.url, getattr(args, "release_url", args.url)):
        if urlsplit(url).hostname not in ("127.0.0.1", "localhost"):
            sys.exit("loadgen only sends traffic to 127.0.0.1")
    {"stream": cmd_stream, "hold": cmd_hold}[args.cmd](args)


if __name__ == "__main__":
    main()
