"""The request path shared by every relaying route: read, authenticate, admit, forward.

Views decide what is allowed for their endpoint; this module does the rest in the
order the product promises: a refused request never reaches Ollama and a request
that reaches Ollama always gives its concurrency slot back.
"""
import json
import time
from urllib.parse import urlencode

import requests
from flask import Response, current_app, request
from werkzeug.wsgi import get_input_stream

from app import auth
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


class JsonBody:
    """A request body read once: raw bytes for Ollama, parsed JSON for the gateway.

    A malformed body is not refused here but by validated(), after authentication,
    so that a caller without a valid key learns only that (401), never more.
    """

    def __init__(self, raw):
        self.raw = raw
        self.payload = None
        self.problem = None
        if not raw.strip():
            return
        try:
            parsed = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.problem = f"request body is not valid JSON: {exc}"
            return
        if not isinstance(parsed, dict):
            self.problem = "request body must be a JSON object"
            return
        self.payload = parsed
        for field in ("model", "name"):
            if field in parsed and not isinstance(parsed[field], str):
                self.problem = f"'{field}' must be a string"

    def validated(self):
        """The parsed object (or None for an empty body); 400 if it is malformed."""
        if self.problem:
            raise BadRequest(self.problem)
        return self.payload


def read_json_body():
    """The request body (413 past max_body_bytes), parsed but not yet judged."""
    return JsonBody(request.get_data(cache=True))


def current_key(payload=None):
    """Authenticate the request's key (header, or legacy body/query field)."""
    cache, _, _ = services()
    legacy = current_app.config["SETTINGS"].legacy_apikey
    secret = auth.credentials(request.headers, request.args, payload, legacy)
    return auth.authenticate(cache, secret)


def strip_legacy_key(raw, payload):
    """The body and query to send upstream, without any `apikey` the client put there."""
    query = request.query_string
    if "apikey" in request.args:
        query = urlencode(
            [(k, v) for k, v in request.args.items(multi=True) if k != "apikey"]
        ).encode()
    if payload is not None and "apikey" in payload:
        payload = {k: v for k, v in payload.items() if k != "apikey"}
        raw = json.dumps(payload).encode()
    return raw, query


def forward(key, path, body, query=b"", transform=None):
    """Admit the request for `key`, send it to Ollama and relay the answer.

    `transform(json) -> json`, when given, rewrites a small JSON answer (e.g. /api/tags
    filtered to the key's models) instead of streaming it through.
    """
    _, limiter, upstream = services()
    admission = limiter.admit(key)
    outcome = RelayOutcome(status=0, started=time.monotonic())
    watch = ClientWatch(request.environ).start()
    headers = forwardable_request_headers(request.headers)
    try:
        response = open_upstream(upstream, watch, request.method, path, query, headers, body)
    except ClientDisconnected:
        watch.stop()
        limiter.release(admission)
        return Response(status=499)  # nobody is listening; nginx's code for it
    except GatewayError as exc:
        watch.stop()
        limiter.release(admission)
        exc.headers.update(admission.headers())
        raise
    outcome.status = response.status_code

    if transform is not None and response.ok:
        watch.stop()
        try:
            return _rewritten(response, transform, admission)
        finally:
            response.close()
            limiter.release(admission)

    def finish(_outcome):
        limiter.release(admission)

    return Response(
        RelayBody(response, watch, outcome, finish),
        status=response.status_code,
        headers=response_headers(response, admission.headers()),
        direct_passthrough=True,
    )


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
