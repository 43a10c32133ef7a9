"""The request path shared by every relaying route: read, authenticate, admit, forward.

Views decide what is allowed for their endpoint; this module does the rest in the
order the product promises: a refused request never reaches Ollama and a request
that reaches Ollama always gives its concurrency slot back.
"""
import json
import posixpath
import time
from urllib.parse import urlencode

import requests
from flask import Response, current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wsgi import get_input_stream

from app import auth
from app.db import db
from app.errors import BadRequest, GatewayError, UpstreamUnavailable
from app.relay import (
    ClientDisconnected,
    ClientWatch,
    RelayBody,
    RelayOutcome,
    open_upstream,
    response_headers,
    streamed_body,
)
from app.upstream import forwardable_request_headers


def services():
    ext = current_app.extensions
    return ext["key_cache"], ext["limiter"], ext["upstream"]


def canonical_path(path):
    """`path` if it names exactly one endpoint; 400 for spellings that could dodge a check.

    Werkzeug decodes %2F, %3F and %23, and the HTTP client later collapses `.` and `..`:
    `/api/./pull` or `/api/x%2F..%2Fpull` would be checked as one path and reach
    Ollama as another.
    """
    if (posixpath.normpath(path) != path or "//" in path
            or any(c in path for c in "?#\\") or any(ord(c) < 0x20 for c in path)):
        raise BadRequest(f"malformed path {path!r}: no empty, '.' or '..' segments, "
                         "encoded '?', '#' or '/', or trailing slash")
    return path


# Field names are compared case-insensitively because Ollama (Go's encoding/json) does.
MODEL_FIELDS = ("model", "name")


class JsonBody:
    """A request body read once: raw bytes for Ollama, parsed JSON for the gateway.

    A malformed body is not refused here but by validated(), after authentication,
    so that a caller without a valid key learns only that (401), never more.
    """

    def __init__(self, raw):
        self.raw = raw
        self.payload = None
        self.models = []
        self.problem = None
        if not raw.strip():
            return
        try:
            parsed = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            self.problem = f"request body is not valid JSON: {str(exc)[:200]}"
            return
        if not isinstance(parsed, dict):
            self.problem = "request body must be a JSON object"
            return
        self.payload = parsed
        for field, value in parsed.items():
            if field.lower() in MODEL_FIELDS:
                if not isinstance(value, str):
                    self.problem = f"'{field}' must be a string"
                self.models.append(value)

    def validated(self):
        """The parsed object (or None for an empty body); 400 if it is malformed."""
        if self.problem:
            raise BadRequest(self.problem)
        return self.payload


def read_body(limit):
    """The whole request body: 413 past `limit` bytes, 400 if it arrives malformed."""
    if request.content_length is not None and request.content_length > limit:
        raise RequestEntityTooLarge()
    # Read past the limit ourselves: a chunked body has no length to check up front.
    stream = get_input_stream(request.environ, max_content_length=None)
    chunks, size = [], 0
    try:
        while chunk := stream.read(min(65536, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise RequestEntityTooLarge()
    except RequestEntityTooLarge:
        raise
    except Exception as exc:  # the server's own errors: bad chunk sizes, early EOF
        raise BadRequest(f"request body could not be read ({type(exc).__name__}); "
                         "send it whole, with a correct length or chunked encoding") from None
    return b"".join(chunks)


def read_json_body():
    """The request body (413 past max_body_bytes), parsed but not yet judged."""
    return JsonBody(read_body(current_app.config["SETTINGS"].max_body_bytes))


def current_key(payload=None):
    """Authenticate the request's key (header, or legacy body/query field)."""
    cache, _, _ = services()
    legacy = current_app.config["SETTINGS"].legacy_apikey
    secret = auth.credentials(request.headers, request.args, payload, legacy)
    g.key = auth.authenticate(cache, secret)
    return g.key


def strip_legacy_key(raw, payload):
    """The body and query to send upstream, without any `apikey` the client put there."""
    query = request.query_string
    if any(k.lower() == "apikey" for k in request.args):
        query = urlencode(
            [(k, v) for k, v in request.args.items(multi=True) if k.lower() != "apikey"]
        ).encode()
    if payload is not None and any(k.lower() == "apikey" for k in payload):
        payload = {k: v for k, v in payload.items() if k.lower() != "apikey"}
        raw = json.dumps(payload).encode()
    return raw, query


def forward(key, path, body, query=b"", transform=None):
    """Admit the request for `key`, send it to Ollama and relay the answer.

    `transform(json) -> json`, when given, rewrites a small JSON answer (e.g. /api/tags
    filtered to the key's models) instead of streaming it through.
    """
    _, limiter, upstream = services()
    admission = limiter.admit(key)
    db.close()  # the wait on Ollama may take minutes: give the connection back now
    outcome = RelayOutcome(status=0, started=time.monotonic())
    watch = ClientWatch(request.environ).start()

    def finish(_outcome=None):
        watch.stop()
        limiter.release(admission)

    headers = forwardable_request_headers(request.headers)
    try:
        response = open_upstream(upstream, watch, request.method, path, query, headers, body)
    except ClientDisconnected:
        finish()
        return Response(status=499)  # nobody is listening; nginx's code for it
    except GatewayError as exc:
        finish()
        exc.headers.update(admission.headers())
        raise
    except BaseException:
        finish()
        raise
    outcome.status = response.status_code

    try:
        if transform is not None and response.ok and request.method == "GET":
            watch.stop()
            try:
                return _rewritten(response, transform, admission)
            finally:
                response.close()
                finish()
        # From here the body owns the cleanup: the WSGI server calls its close().
        return Response(
            RelayBody(response, watch, outcome, finish),
            status=response.status_code,
            headers=response_headers(response, admission.headers()),
            direct_passthrough=True,
        )
    except BaseException:
        response.close()
        finish()
        raise


def _rewritten(response, transform, admission):
    """A small JSON answer passed through transform(); 502 if it cannot be read."""
    try:
        data = transform(response.json())
    except (ValueError, TypeError, AttributeError, requests.RequestException) as exc:
        raise UpstreamUnavailable(
            "Ollama's answer could not be read (malformed JSON or a broken connection); "
            "check the Ollama server's log", headers=admission.headers(),
        ) from exc
    return current_app.response_class(
        json.dumps(data), status=response.status_code,
        headers=admission.headers(), mimetype="application/json",
    )


def request_body_for_upload():
    """The raw request stream, unbuffered and exempt from max_body_bytes (blob uploads)."""
    # Not request.stream: Flask treats a per-request limit of None as "use MAX_CONTENT_LENGTH".
    stream = get_input_stream(request.environ, max_content_length=None)
    return streamed_body(stream, request.content_length)
