"""What the client sends: read whole within limits, or streamed through; never waited on forever.

Every read from the client is bounded by `client_body_timeout` (a client that stops
sending gets 408), and a body the gateway refused without reading is not read later
either: the connection closes after the refusal (app/serving/worker.py says why that is needed).
"""
import sys

from flask import current_app, g, request
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import get_input_stream

from app.cooperative import close_after_response, deadline, pause
from app.errors import BadRequest, GatewayError, RequestTimeout
from app.proxy import content_encoding
from app.proxy.relay import CHUNK_SIZE, ClientDisconnected
from app.upstreams.client import forwardable_request_headers

LARGE_STEP = 1024 * 1024  # read size for bodies larger than this


class BodyTooLarge(GatewayError):
    status, kind = 413, "invalid_request_error"
    refusal = "invalid"


class ClientStalled(ClientDisconnected):
    """The client stopped sending its body for longer than client_body_timeout."""


def _timeout():
    return current_app.config["SETTINGS"].client_body_timeout


def stall_error():
    """The 408 for a body that stopped arriving (the relay raises it for a stalled upload)."""
    return RequestTimeout(f"the request body stopped arriving for {_timeout():g} s "
                          "(client_body_timeout); send it whole and without pauses")


def has_body():
    return bool(request.content_length) or "chunked" in request.headers.get(
        "Transfer-Encoding", "").lower()


def read_body(limit, too_large=None):
    """The whole request body, decompressed; 413 past `limit` bytes, 408 if it stalls,
    400 if malformed, 415 for a Content-Encoding other than zstd or gzip.

    Reads yield to other greenlets, so a large body arriving at loopback speed does not
    hold up the streams of everyone else on this worker. A compressed body is bounded
    twice: as sent and as inflated, where inflating stops one byte past `limit`
    (app/proxy/content_encoding.py); upstream_headers() then drops its Content-Encoding.
    """
    too_large = too_large or (lambda: BodyTooLarge(
        f"request body is larger than the gateway's limit of {limit} bytes (max_body_bytes)"
        + (", decompressed" if g.get("body_coding") else "")))
    length = request.content_length
    if length is not None and length > limit:
        raise too_large()
    g.body_coding = content_encoding.coding(request.headers)  # 415 before a byte is read
    try:
        chunks = _chunks(limit, too_large)
        body = (b"".join(chunks) if g.body_coding is None
                else _inflated(chunks, g.body_coding, limit, too_large))
    except GatewayError:
        raise
    except ClientStalled:
        raise stall_error() from None
    except Exception as exc:  # the server's own errors: bad chunk sizes, early EOF
        raise _unreadable(exc) from None
    g.body_consumed = True
    return body


def _chunks(limit, too_large):
    """The client's bytes as they arrive, at most `limit` of them.

    A large body is read in 1 MiB steps: gunicorn's reader reads ahead and copies what it
    holds on every read, so 64 KiB steps would copy a 60 MiB body's buffer a thousand
    times (bench/big_bodies.py).
    """
    length = request.content_length
    step = LARGE_STEP if (length or 0) > LARGE_STEP else CHUNK_SIZE
    # Not request.stream: Flask treats a per-request limit of None as MAX_CONTENT_LENGTH.
    stream = get_input_stream(request.environ, max_content_length=None)
    size, timeout = 0, _timeout()
    while True:
        with deadline(timeout, ClientStalled):
            chunk = stream.read(min(step, limit + 1 - size))
        if not chunk:
            return
        size += len(chunk)
        if size > limit:
            raise too_large()
        yield chunk
        pause()


def _inflated(chunks, coding, limit, too_large):
    """The decompressed body: 413 (`too_large`) as soon as it passes `limit`."""
    pieces, room = [], [limit + 1]  # what may still come: inflating stops one byte past
    for piece in content_encoding.inflate(chunks, coding, lambda: room[0]):
        room[0] -= len(piece)
        if room[0] <= 0:
            raise too_large()
        pieces.append(piece)
        pause()
    return b"".join(pieces)


def upstream_headers():
    """The request's headers for Ollama: a decompressed body loses its Content-Encoding."""
    headers = forwardable_request_headers(request.headers)
    if g.get("body_coding"):
        headers = {k: v for k, v in headers.items() if k.lower() != "content-encoding"}
    return headers


def read_form():
    """Parse a posted form now, so that a body the server cannot read is a 400, not a 500.

    Werkzeug's form parser lets the server's own errors (a bad chunk size) through.
    """
    try:
        with deadline(_timeout(), ClientStalled):
            request.form  # noqa: B018 (parsed and kept by werkzeug)
    except ClientStalled:
        raise stall_error() from None
    except HTTPException:  # werkzeug's 413 past MAX_CONTENT_LENGTH
        raise
    except Exception as exc:  # the server's own errors: bad chunk sizes, early EOF
        raise _unreadable(exc) from None
    g.body_consumed = True


def _unreadable(exc):
    return BadRequest(f"request body could not be read ({type(exc).__name__}); "
                      "send it whole, with a correct length or chunked encoding")


def _read_from_client(stream, size, timeout):
    """Read the client's body; a broken, abandoned or stalled upload raises ClientDisconnected.

    Raised inside requests' send, it is not mistaken for an Ollama failure (502), and
    the connection to Ollama is closed so it stops waiting for the rest.
    """
    try:
        with deadline(timeout, ClientStalled):
            chunk = stream.read(size)
    except ClientStalled:
        raise
    except Exception as exc:  # early EOF, bad chunk sizes: the server's own exceptions
        raise ClientDisconnected() from exc
    if not chunk:
        g.body_consumed = True
    return chunk


class Upload:
    """A request body streamed to Ollama without buffering (blob uploads may be gigabytes)."""

    def __init__(self, stream, length, timeout):
        self._stream = stream
        self._length = length
        self._left = length
        self._timeout = timeout

    def read(self, size=CHUNK_SIZE):
        size = size if size and size > 0 else CHUNK_SIZE
        if not self._left:
            g.body_consumed = True
            return b""
        chunk = _read_from_client(self._stream, min(size, self._left), self._timeout)
        if not chunk:
            raise ClientDisconnected()  # the client promised more bytes than it sent
        self._left -= len(chunk)
        return chunk

    def __iter__(self):
        return iter(lambda: self.read(CHUNK_SIZE), b"")

    def __len__(self):
        return self._length


def upload_body():
    """The raw request stream, unbuffered and exempt from max_body_bytes (blob uploads)."""
    stream = get_input_stream(request.environ, max_content_length=None)
    timeout = _timeout()
    if (request.content_length or 0) > sys.maxsize:  # no file is; len() could not say it
        raise BodyTooLarge(f"Content-Length {request.content_length} is larger than any "
                           "upload can be")
    if request.content_length is not None:
        return Upload(stream, request.content_length, timeout)
    return iter(lambda: _read_from_client(stream, CHUNK_SIZE, timeout), b"")


def init_app(app):
    @app.after_request
    def _close_if_body_unread(response):
        """A refusal sent before the body was read ends the connection instead of reading it."""
        if response.status_code >= 400 and has_body() and not g.get("body_consumed"):
            close_after_response(request.environ)
        return response
