"""A fast fake Ollama for benchmarks: one gevent process, raw sockets, HTTP/1.1 keep-alive.

tests/fake_ollama.py is the faithful test double (a thread per connection); this one
only has to speak enough of Ollama's wire format to be relayed, and be fast enough that
it is never what a benchmark measures (run.py measures it alone first).

    python bench/fake_upstream.py --port 11500 [--cap 4]

(run.py may start several on one port: each binds with SO_REUSEPORT.)

--cap N serves at most N non-streamed generate/chat answers at once, queueing the rest,
as Ollama does with OLLAMA_NUM_PARALLEL=N (one process only). Whatever the cap, it counts
how many such requests it had at once, queued ones included (`max_in_flight`: a gateway that
keeps the cap never sends more), and per slot, the idle time of each hand-off: from
the last byte of one answer to the arrival of the next request on the same slot.
GET /bench/stats reads them (`{"max_in_flight", "served", "idle_ms": [...]}`);
POST /bench/reset starts them anew (slots idle since count from the next answer).
--trace FILE writes when each of those requests arrived and was answered, with the
client's port (bench/handoff_trace.py).

Answers:
  GET  /, /api/version, /api/tags          small fixed answers
  POST /api/generate, /api/chat            `"stream": false` -> one JSON object at once;
                                           otherwise (Ollama's default) a chunked
                                           application/x-ndjson stream, one token per
                                           line and per HTTP chunk, ending with a
                                           `done: true` object carrying
                                           prompt_eval_count / eval_count.
Request fields it reads besides Ollama's (the gateway forwards bodies unchanged):
  options.num_predict   tokens to produce (default 32)
  bench_interval        seconds between streamed tokens (default 0: as fast as possible);
  bench_first           seconds before the first token (default: one interval, as a
                        model's prompt evaluation takes a moment)
  bench_service         seconds a non-streamed answer takes (default 0), in its slot
  bench_hold            true: keep streaming (one token per bench_interval, past
                        num_predict) until someone POSTs /bench/release, then end the
                        stream normally with `done: true` (the scale test's slow streams)
Every streamed token line carries `bench_t`, CLOCK_MONOTONIC when it was written, so a
client on the same machine can tell how long the line took to reach it.
"""
import argparse
import collections
import contextlib
import json
import os
import socket
import time

import gevent
import gevent.lock
import gevent.socket
from gevent.server import StreamServer

MODEL = "llama3.2:latest"
CREATED = "2025-01-01T00:00:00.000000Z"
_NOT_FOUND = b'{"error":"404 page not found"}'
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}


def _head(status, content_type, length=None):
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Error")),
             b"Content-Type: " + content_type]
    if length is None:
        lines.append(b"Transfer-Encoding: chunked")
    else:
        lines.append(b"Content-Length: %d" % length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _json_response(status, body):
    return _head(status, b"application/json; charset=utf-8", len(body)) + body


_ROOT = _head(200, b"text/plain; charset=utf-8", 17) + b"Ollama is running"
_VERSION = _json_response(200, b'{"version":"0.6.8"}')
_TAGS = _json_response(200, json.dumps({"models": [{
    "name": MODEL, "model": MODEL, "modified_at": CREATED, "size": 2019393189,
    "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
    "details": {"format": "gguf", "family": "llama", "parameter_size": "3.2B",
                "quantization_level": "Q4_K_M"}}]}, separators=(",", ":")).encode())
_STREAM_HEAD = _head(200, b"application/x-ndjson")
_TOKENS = [f"word{i} " for i in range(4096)]
_released = [0]  # bumped by POST /bench/release: every held stream then ends


class Slots:
    """The model's slots (--cap), and what the bench asks of them (GET /bench/stats)."""

    def __init__(self, cap=0):
        self.semaphore = gevent.lock.Semaphore(cap) if cap else None
        self.reset()

    def reset(self):
        self.in_flight = self.max_in_flight = self.served = self.running = 0
        self.free_since = collections.deque()  # when each slot freed, oldest first
        self.idle_ms = []

    def stats(self):
        return {"max_in_flight": self.max_in_flight, "served": self.served,
                "idle_ms": self.idle_ms}

    @contextlib.contextmanager
    def slot(self):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.semaphore is not None:
                self.semaphore.acquire()
            self.running += 1
            try:
                if self.free_since:  # a slot was free: how long since its last answer
                    self.idle_ms.append((time.monotonic() - self.free_since.popleft()) * 1000)
                elif self.semaphore is not None and self.served:
                    self.idle_ms.append(0.0)  # it waited here: handed on at once
                yield
            finally:
                self.running -= 1
                self.served += 1
                if self.in_flight - 1 <= self.running:  # no one queued here for the slot
                    self.free_since.append(time.monotonic())
                if self.semaphore is not None:
                    self.semaphore.release()
        finally:
            self.in_flight -= 1


SLOTS = Slots()


def _counts(n_tokens, prompt_tokens, started):
    total = int((time.monotonic() - started) * 1e9)
    return {"total_duration": total, "load_duration": 1000000,
            "prompt_eval_count": prompt_tokens, "prompt_eval_duration": 2000000,
            "eval_count": n_tokens, "eval_duration": max(total - 3000000, 1)}


def _prompt_tokens(payload):
    text = payload.get("prompt") or ""
    for message in payload.get("messages") or ():
        if isinstance(message, dict):
            text += " " + str(message.get("content", ""))
    return max(1, len(text.split()))


def _token_obj(chat, model, text, done):
    if chat:
        return {"model": model, "created_at": CREATED,
                "message": {"role": "assistant", "content": text}, "done": done}
    return {"model": model, "created_at": CREATED, "response": text, "done": done}


def _answer_once(chat, payload, started):
    n = _num_predict(payload)
    text = "".join(_TOKENS[i % len(_TOKENS)] for i in range(n))
    obj = _token_obj(chat, payload.get("model") or MODEL, text, True)
    obj["done_reason"] = "stop"
    obj.update(_counts(n, _prompt_tokens(payload), started))
    return _json_response(200, json.dumps(obj, separators=(",", ":")).encode())


def _num_predict(payload):
    options = payload.get("options")
    n = options.get("num_predict") if isinstance(options, dict) else None
    return int(n) if isinstance(n, int) and n >= 0 else 32


def _chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


def _stream(sock, chat, payload, started):
    """Write one token per HTTP chunk (OSError if the client goes away)."""
    model = payload.get("model") or MODEL
    n = _num_predict(payload)
    interval = float(payload.get("bench_interval") or 0)
    first = payload.get("bench_first")
    first = interval if first is None else float(first)
    hold = payload.get("bench_hold") is True
    generation = _released[0]
    sent_head = False
    produced = 0
    i = 0
    while _released[0] == generation if hold else i < n:
        delay = first if i == 0 else interval
        if delay:
            gevent.sleep(delay)
        if hold and _released[0] != generation:
            break
        obj = _token_obj(chat, model, _TOKENS[i % len(_TOKENS)], False)
        obj["bench_t"] = time.monotonic()
        data = _chunk(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        if not sent_head:
            data = _STREAM_HEAD + data  # Ollama's headers leave with the first token
            sent_head = True
        sock.sendall(data)
        produced += 1
        i += 1
        if hold and not interval:
            gevent.sleep(0.01)  # a held stream must never spin
    obj = _token_obj(chat, model, "", True)
    obj["done_reason"] = "stop"
    obj.update(_counts(produced, _prompt_tokens(payload), started))
    tail = _chunk(json.dumps(obj, separators=(",", ":")).encode() + b"\n") + b"0\r\n\r\n"
    sock.sendall(tail if sent_head else _STREAM_HEAD + tail)


TRACE = []  # --trace: the file


def _trace(step, sock):
    """A request arrived, or its answer's last byte was sent: `<monotonic ns> <pid> <step>
    <the client's port> 0` (bench/handoff_trace.py joins it with the gateway's steps)."""
    if TRACE:
        TRACE[0].write(f"{time.monotonic_ns()} {os.getpid()} {step} {sock.getpeername()[1]} 0\n")


def handle(sock, _address):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    try:
        while True:
            end = buf.find(b"\r\n\r\n")
            while end < 0:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
                end = buf.find(b"\r\n\r\n")
                if end < 0 and len(buf) > 65536:
                    return
            head = buf[:end].decode("latin-1")
            buf = buf[end + 4:]
            lines = head.split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
                elif name == "transfer-encoding":
                    sock.sendall(_json_response(400, b'{"error":"chunked bodies unsupported"}'))
                    return
            while len(buf) < length:
                data = sock.recv(max(65536, length - len(buf)))
                if not data:
                    return
                buf += data
            body, buf = buf[:length], buf[length:]
            path = target.split("?", 1)[0]
            started = time.monotonic()
            if method == "POST" and path in ("/api/generate", "/api/chat"):
                try:
                    payload = json.loads(body) if body.strip() else {}
                except ValueError:
                    payload = None
                if not isinstance(payload, dict):
                    sock.sendall(_json_response(400, b'{"error":"invalid request body"}'))
                elif payload.get("stream", True) is False:
                    _trace("arrive", sock)
                    with SLOTS.slot():
                        if payload.get("bench_service"):
                            gevent.sleep(float(payload["bench_service"]))
                        sock.sendall(_answer_once(path == "/api/chat", payload, started))
                        _trace("done", sock)
                else:
                    _stream(sock, path == "/api/chat", payload, started)
            elif path == "/bench/stats":
                sock.sendall(_json_response(200, json.dumps(SLOTS.stats()).encode()))
            elif method == "POST" and path == "/bench/reset":
                SLOTS.reset()
                sock.sendall(_json_response(200, b'{"reset":true}'))
            elif method == "POST" and path == "/bench/release":
                _released[0] += 1
                sock.sendall(_json_response(200, b'{"released":true}'))
            elif path == "/" and method in ("GET", "HEAD"):
                sock.sendall(_ROOT)
            elif path == "/api/version":
                sock.sendall(_VERSION)
            elif path == "/api/tags":
                sock.sendall(_TAGS)
            else:
                sock.sendall(_json_response(404, _NOT_FOUND))
            if close:
                return
    except (OSError, ValueError):
        return  # client went away or spoke nonsense: drop the connection
    finally:
        sock.close()


def listener(port):
    sock = gevent.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    return sock


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cap", type=int, default=0,
                        help="generate/chat answers served at once; the rest queue [no cap]")
    parser.add_argument("--trace", metavar="FILE",
                        help="write when each non-streamed request arrives and is answered")
    args = parser.parse_args(argv)
    SLOTS.__init__(args.cap)
    if args.trace:
        TRACE.append(open(args.trace, "a", buffering=1))
    server = StreamServer(listener(args.port), handle, spawn=20000)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
