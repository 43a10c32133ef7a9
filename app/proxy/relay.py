"""Relay Ollama's answer to the client as it arrives, and stop Ollama when the client leaves.

Status and headers are decided before the first byte. Chunks pass through untouched
(no decoding, no re-framing), so NDJSON stays NDJSON. Under gunicorn's gevent worker a
watcher greenlet notices a client that hangs up, even while Ollama is silent (loading a
model), and interrupts the wait: the upstream connection is closed at once, which is
how Ollama learns to stop generating. A client that keeps its connection open but stops
reading is treated the same way once a chunk has waited `client_send_timeout` for it.
"""
import contextlib
import dataclasses
import itertools
import json
import logging
import socket
import time

import requests
import urllib3

from app.cooperative import gevent_active
from app.proxy import sse
from app.upstreams.client import forwardable_response_headers

log = logging.getLogger(__name__)

CHUNK_SIZE = 64 * 1024
# What reading Ollama's answer raises when the connection breaks.
_UPSTREAM_ERRORS = (urllib3.exceptions.HTTPError, requests.RequestException, OSError)
# What is kept of an answer while it streams: its end carries the token counts (Ollama's
# final NDJSON object; the usage event and `data: [DONE]` of a /v1 stream, blank lines
# included). Every open stream holds it, so only its last lines, and at most TAIL bytes:
# an NDJSON stream's counts are all in its last line (two are kept, so that a stray
# blank line after it cannot push it out); SSE's six lines would cost NDJSON streams
# 0.4 KiB more each (tracemalloc, bench/RESULTS.md).
TAIL_LINES = 6
NDJSON_TAIL_LINES = 2
TAIL = 8192
STREAM_TYPES = ("application/x-ndjson", "text/event-stream")


class ClientDisconnected(Exception):
    """The client closed its connection while the gateway waited on Ollama."""


@dataclasses.dataclass
class RelayOutcome:
    """What happened on the wire; handed to the on_finish callback."""

    status: int
    started: float
    first_byte_at: float | None = None
    bytes: int = 0
    lines: int = 0  # NDJSON lines relayed: tokens, for a stream cut short
    complete: bool = False  # Ollama's answer was relayed to its end
    client_aborted: bool = False
    upstream_error: str | None = None
    tail: bytes = b""  # the last bytes relayed: the final NDJSON line carries token counts
    sent_at: float | None = None  # when the request left for the upstream that answered it
    last_byte_at: float | None = None  # when the upstream's last byte arrived


class ClientWatch:
    """Interrupts waits on Ollama when the client's socket reaches EOF; bounds sends to it."""

    def __init__(self, environ, send_timeout=None):
        self.sock = environ.get("gunicorn.socket") if gevent_active() else None
        self.send_timeout = send_timeout
        self.gone = False
        self.stalled = False
        self._waiter = None
        self._readable = None  # the hub's read watcher on the client's socket
        self._greenlet = None
        self._send_timer = None

    def start(self):
        if self.sock is not None:
            import gevent

            # A watcher on the hub, not a greenlet per request: the socket turns readable
            # only when the client hangs up (or pipelines its next request), and only
            # then is a greenlet worth starting.
            self._readable = gevent.get_hub().loop.io(self.sock.fileno(), 1)  # 1: read
            self._readable.start(self._on_readable)
        return self

    def stop(self):
        self._waiter = None
        self._stop_watching()
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        if self._send_timer is not None:
            self._send_timer.close()
            self._send_timer = None

    def _stop_watching(self):
        if self._readable is not None:
            self._readable.close()
            self._readable = None

    def sending(self):
        """Mark a chunk on its way to the client: past send_timeout, drop the connection."""
        if self.sock is None or not self.send_timeout:
            return _NOTHING
        return _Sending(self)

    def _start_send_timer(self):
        if self._send_timer is None:
            import gevent

            self._send_timer = gevent.get_hub().loop.timer(self.send_timeout)
        self._send_timer.start(self._drop_stalled_client)

    def _stop_send_timer(self):
        if self._send_timer is not None:  # None once stop() closed it meanwhile
            self._send_timer.stop()

    def _drop_stalled_client(self):
        """The client left a chunk unread for send_timeout seconds: hang up on it.

        Shutting the socket down fails the pending send with EPIPE, which gunicorn takes
        quietly; it then closes the body, and that closes Ollama's connection and frees
        the concurrency slot.
        """
        self.stalled = True
        log.info("client stopped reading for %g s (client_send_timeout): closing its "
                 "connection", self.send_timeout)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def waiting(self):
        """Mark a wait on Ollama that a hang-up may interrupt with ClientDisconnected."""
        return _Waiting(self)

    def _begin_wait(self):
        if self.gone:
            raise ClientDisconnected()
        import greenlet

        self._waiter = greenlet.getcurrent()

    def _end_wait(self):
        self._waiter = None

    def _on_readable(self):
        """In the hub: something arrived, or the client hung up; find out in a greenlet."""
        import gevent

        self._stop_watching()
        self._greenlet = gevent.spawn(self._check_hang_up)

    def _check_hang_up(self):
        try:
            eof = self.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            eof = True
        if not eof:
            return  # the client sent more (a pipelined request): not a hang-up
        self.gone = True
        if self._waiter is not None:
            import gevent

            # Throw from the hub, and only if the request is still inside a wait then.
            gevent.get_hub().loop.run_callback(self._interrupt)

    def _interrupt(self):
        waiter = self._waiter
        if waiter is not None:
            waiter.throw(ClientDisconnected())


# ClientWatch's `with` blocks run once per chunk, and every open stream sits in one while
# it waits on Ollama: plain objects, not @contextmanager generators, which cost about
# 0.7 KiB a stream while held (tracemalloc, bench/RESULTS.md) and more CPU per chunk.
_NOTHING = contextlib.nullcontext()


class _Waiting:
    __slots__ = ("_watch",)  # one reference, not two bound methods: 0.15 KiB a held stream

    def __init__(self, watch):
        self._watch = watch

    def __enter__(self):
        self._watch._begin_wait()

    def __exit__(self, *exc):
        self._watch._end_wait()


class _Sending:
    __slots__ = ("_watch",)

    def __init__(self, watch):
        self._watch = watch

    def __enter__(self):
        self._watch._start_send_timer()

    def __exit__(self, *exc):
        self._watch._stop_send_timer()


def open_upstream(upstream, watch, *args, **kwargs):
    """upstream.send() that a client hang-up interrupts (before any byte of the answer)."""
    with watch.waiting():
        return upstream.send(*args, **kwargs)


class RelayBody:
    """The WSGI body: Ollama's chunks as they arrive, then cleanup exactly once.

    Cleanup lives in close(), which the WSGI server calls whether the body was read to
    the end, abandoned by a client that hung up, or never iterated at all (HEAD).
    """

    def __init__(self, response, watch, outcome, on_finish, path="", rewrite=None,
                 on_upstream_done=None):
        self._response = response
        self._watch = watch
        self._outcome = outcome
        self._on_finish = on_finish
        # Called once Ollama has sent its whole answer (known before the last chunk is
        # relayed when it said its length): its slot is free for the next request.
        self._on_upstream_done = on_upstream_done
        self._path = path
        self._rewrite = rewrite  # e.g. app.proxy.sse.UsageStripper: takes back what only we asked
        self._complete = False
        self._closed = False
        self._then = ()  # call_on_close()'s callbacks
        self._ahead = None  # read_ahead()'s: the answer's chunks, and when they came

    def read_ahead(self):
        """Read now an answer whose whole length Ollama gave, if it fits in one chunk.

        Ollama sends such an answer (not streamed) once it has finished with the
        request, so its slot is free: read here, before Flask and the WSGI server
        turn to the body, it is handed on 0.4 ms sooner (py-spy and a trace,
        bench/queue_handoff.py). What happens on the way (a hang-up, a broken
        connection) is met by __iter__, as it would have been.
        """
        remaining = getattr(self._response.raw, "length_remaining", None)
        if remaining is None or remaining > CHUNK_SIZE:
            return
        chunks = self._response.raw.stream(CHUNK_SIZE, decode_content=False)
        try:
            with self._watch.waiting():
                chunk = next(chunks, None)
        except (ClientDisconnected, *_UPSTREAM_ERRORS) as exc:
            self._ahead = (_raising(exc), None)
            return
        at = time.monotonic()
        self._upstream_done_if_read()
        self._ahead = (itertools.chain(() if chunk is None else (chunk,), chunks), at)

    def _upstream_done_if_read(self):
        """Once Ollama's whole answer of a known length is read, its slot goes (once)."""
        if (self._on_upstream_done is not None
                and getattr(self._response.raw, "length_remaining", None) == 0):
            self._on_upstream_done()
            self._on_upstream_done = None

    def call_on_close(self, callback):
        """Run `callback` once this body is closed, after its own cleanup.

        What werkzeug's ClosingIterator would do (app/accounting/request_record.py), without a
        wrapper that every chunk passes through and every open stream keeps.
        """
        self._then += (callback,)

    def __iter__(self):
        outcome = self._outcome
        content_type = self._response.headers.get("Content-Type", "")
        # A stream's unit: NDJSON lines, or SSE events (each ends with a blank line).
        separator = {STREAM_TYPES[0]: b"\n", STREAM_TYPES[1]: b"\n\n"}.get(
            content_type.split(";")[0].strip())
        keep = NDJSON_TAIL_LINES if separator == b"\n" else TAIL_LINES
        chunks, read_at = self._ahead or (
            self._response.raw.stream(CHUNK_SIZE, decode_content=False), None)
        while True:
            try:
                with self._watch.waiting():
                    chunk = next(chunks, None)
            except ClientDisconnected:
                return
            except _UPSTREAM_ERRORS as exc:
                self._complete = True
                outcome.upstream_error = f"{type(exc).__name__}: {exc}"
                log.warning("upstream failed mid-answer after %d bytes: %s", outcome.bytes, exc)
                if separator:
                    yield self._failure_notice()
                return
            if chunk is None:
                self._complete = outcome.complete = True
                if self._rewrite is not None and (rest := self._rewrite.finish()):
                    yield rest
                return
            if not chunk:
                continue
            outcome.last_byte_at = read_at or time.monotonic()  # GPU time ends here, on /v1
            read_at = None
            if outcome.first_byte_at is None:
                outcome.first_byte_at = outcome.last_byte_at
            self._upstream_done_if_read()
            if separator:
                outcome.lines += chunk.count(separator)
            outcome.tail = last_lines(outcome.tail + chunk, keep)  # Ollama's own: its counts
            if self._rewrite is not None and not (chunk := self._rewrite.feed(chunk)):
                continue
            outcome.bytes += len(chunk)
            with self._watch.sending():
                yield chunk

    def _failure_notice(self):
        """The stream's last unit when Ollama broke off: what its clients look for."""
        message = "the Ollama server stopped answering in the middle of the stream"
        if self._path.startswith("/v1/"):
            return sse.error_event(self._path, message)
        return (json.dumps({"error": message}) + "\n").encode()

    def close(self):
        if self._closed:
            return
        self._closed = True
        # An answer whose last event was relayed is finished, even if the client hung up
        # before Ollama's terminating chunk (the openai client stops at `data: [DONE]`).
        if not self._complete and answer_finished(self._outcome.tail):
            self._complete = self._outcome.complete = True
        # Not read to the end (and Ollama did not fail): the client left or never read.
        self._outcome.client_aborted = not self._complete
        try:
            self._watch.stop()
            self._response.close()
            self._on_finish(self._outcome)
        finally:
            for callback in self._then:
                callback()


def _raising(exc):
    """An iterator whose first next() raises `exc`."""
    raise exc
    yield  # noqa: B901 (a generator, so that the raise waits for next())


def last_lines(data, lines=TAIL_LINES, limit=TAIL):
    """The last `lines` lines of `data` (a trailing newline ends the last), at most `limit`
    bytes of them."""
    end = len(data) - 1
    for _ in range(lines):
        end = data.rfind(b"\n", 0, end)
        if end < 0:
            return data[-limit:]
    return data[end + 1:][-limit:]


# How each kind of answer ends: the final NDJSON object, the end of an SSE stream.
_FINAL_MARKS = (b'"done":true', b"data: [DONE]", b'"type":"response.completed"',
                b'"type":"message_stop"')


def answer_finished(tail):
    """Whether the last bytes relayed end an answer (its counts are then in them too)."""
    return any(mark in tail for mark in _FINAL_MARKS)


def response_headers(response, extra):
    headers = forwardable_response_headers(response.headers)
    content_type = response.headers.get("Content-Type", "")
    if content_type.startswith(STREAM_TYPES):
        headers.append(("X-Accel-Buffering", "no"))  # tell nginx in front not to buffer
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
    headers.extend(extra.items())
    return headers
