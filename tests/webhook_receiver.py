"""A real webhook receiver on 127.0.0.1: records what arrives; answers 200, fails, hangs,
trickles its answer a byte at a time, or answers something that is not HTTP.

Use it as a context manager: leaving the block releases hanging requests and stops the
server, on every path.
"""
import dataclasses
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# A hanging request is released after this long even if nobody stops the receiver.
MAX_HANG_SECONDS = 120
# A trickled answer stops trickling after this long (and ends), so a sender with no
# overall deadline is seen taking this long instead of hanging its test forever.
MAX_TRICKLE_SECONDS = 20
# A trickled answer: a status line, then one header that never ends.
TRICKLE = b"HTTP/1.1 200 OK\r\nX-Trickle: "


@dataclasses.dataclass(frozen=True)
class Received:
    headers: dict
    body: bytes
    at: float
    status: int | None  # what the receiver answered; None: it hung

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def message_id(self):
        return self.headers.get("webhook-id")


class WebhookReceiver:
    def __init__(self):
        self.status = 200
        self.fail_first = 0  # answer 500 to this many requests, then `status`
        self.fail_each = 0  # answer 500 to the first this-many attempts of every message
        self.hang = False  # hold requests open until released or stopped
        self.trickle = 0.0  # > 0: send the answer one byte every this many seconds
        self.trickled = 0  # bytes trickled so far
        self.raw_answer = None  # bytes: answer these instead of HTTP, then close
        self.received = []
        self.hanging = 0
        self._released = threading.Event()
        self._changed = threading.Condition()
        self._server = None
        self._thread = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks"

    def start(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                receiver._handle(self)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(10)
            self._server = None

    def release(self):
        """Let hanging requests go (they are answered 200, to whoever still listens)."""
        self.hang = False
        self._released.set()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _handle(self, handler):
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        headers = {k.lower(): v for k, v in handler.headers.items()}
        with self._changed:
            seen_before = sum(1 for r in self.received if r.message_id == headers.get("webhook-id"))
            if self.hang:
                status = None
            elif len(self.received) < self.fail_first or seen_before < self.fail_each:
                status = 500
            else:
                status = self.status
            self.received.append(Received(headers, body, time.time(), status))
            self.hanging += status is None
            self._changed.notify_all()
        if self.raw_answer is not None:
            handler.wfile.write(self.raw_answer)
            handler.close_connection = True
            return
        if self.trickle:
            self._trickle(handler)
            return
        if status is None:
            self._released.wait(MAX_HANG_SECONDS)
            with self._changed:
                self.hanging -= 1
                self._changed.notify_all()
            status = 200
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "text/plain")
            handler.end_headers()
            if status not in (204, 304):  # answers that have no body
                handler.wfile.write(b"ok" if status < 300 else b"receiver says no")
        except OSError:
            pass  # the sender gave up waiting: that is what a hanging receiver tests

    def _trickle(self, handler):
        handler.close_connection = True
        ends = time.monotonic() + MAX_TRICKLE_SECONDS
        sent = 0
        try:
            while time.monotonic() < ends and not self._released.wait(self.trickle):
                handler.wfile.write(TRICKLE[sent:sent + 1] or b"a")
                sent += 1
                with self._changed:
                    self.trickled += 1
                    self._changed.notify_all()
            handler.wfile.write(b"\r\nContent-Length: 0\r\n\r\n")
        except OSError:
            pass  # the sender gave up: what a trickling receiver tests

    def wait(self, predicate, seconds):
        """True as soon as predicate(self) holds, False if it does not within `seconds`."""
        deadline = time.monotonic() + seconds
        with self._changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.5))
            return True

    def wait_for_count(self, count, seconds):
        return self.wait(lambda r: len(r.received) >= count, seconds)

    def events(self):
        with self._changed:
            return [r.json["type"] for r in self.received]
