"""OpenAI's API under /v1, relayed to Ollama's own OpenAI-compatible endpoints.

The same keys, limits, allow-lists and model policy as /api; errors in OpenAI's shape
(app/errors.py), so the official `openai` client raises the right exception. Streams
are relayed as they arrive, with exact usage (app/proxy/sse.py).
"""
from flask import Blueprint, request

from app.accounting import request_record
from app.errors import MethodNotAllowed
from app.proxy import auth, cloud, doors, fanout, gateway, sse
from app.proxy.request_body import read_body

bp = Blueprint("openai", __name__)

GENERATING = {"/v1/chat/completions", "/v1/completions", "/v1/responses"}
# Ollama's other /v1 endpoints (Anthropic's Messages API, audio, images): relayed with the
# key's allow-list checked. Transcriptions (and OpenAI's image edits) take a form.
RELAYED = {"/v1/messages", "/v1/audio/transcriptions", "/v1/images/generations",
           "/v1/images/edits"}
POST_ENDPOINTS = GENERATING | RELAYED | {"/v1/embeddings"}
USAGE_ON_REQUEST = {"/v1/chat/completions", "/v1/completions"}  # /v1/responses always says


@bp.route("/v1/<path:subpath>", methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"])
def relay(subpath):
    path = gateway.canonical_path("/v1/" + subpath)
    if path == "/v1/models" or path.startswith("/v1/models/"):
        return _models(path)
    pending = request_record.begin(path)
    if path in POST_ENDPOINTS and request.method != "POST":
        raise MethodNotAllowed(f"{request.method} is not allowed on {path}; use POST",
                               headers={"Allow": "POST"})
    if path in RELAYED and request.mimetype == "multipart/form-data":
        return _form(path)
    key, body = gateway.authenticated_body()
    doors.check(key, path, path in POST_ENDPOINTS)
    doors.require_counted(key, path)
    payload = body.validated()
    pending.model = next(iter(body.models), None)
    for model in body.models:
        auth.require_model(key, model)
    pending.cloud = cloud.check(key, path, body, body.models)
    request_record.keep_prompt(pending, payload)
    changes, rewrite = {}, None
    if path in USAGE_ON_REQUEST and payload and payload.get("stream") is True:
        if (stream_options := sse.ask_for_usage(payload)) is not None:
            changes["stream_options"] = stream_options
            rewrite = sse.UsageStripper()
    raw = gateway.outgoing_body(body, key, path, changes)
    return gateway.forward(key, path, raw or None, gateway.query_without_key(),
                           rewrite=rewrite, model=pending.model)


def _form(path):
    """A multipart body, relayed as it is once the key may send one (app/proxy/doors.py)."""
    key = gateway.current_key()
    doors.require_counted(key, path)
    doors.require_checkable_form(key, path)
    raw = read_body(gateway.settings().max_body_bytes)
    return gateway.forward(key, path, raw or None, gateway.query_without_key())


def _models(path):
    """GET /v1/models (only the key's models) and GET /v1/models/{model}."""
    pending = request_record.begin("/v1/models" if path == "/v1/models" else "/v1/models/{model}")
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed(f"{request.method} is not allowed on {path}; use GET",
                               headers={"Allow": "GET, HEAD"})
    key = gateway.current_key()
    query = gateway.query_without_key()
    if path != "/v1/models":
        model = path[len("/v1/models/"):]
        auth.require_model(key, model)
        pending.cloud = cloud.check(key, path, models=[model])
        return gateway.forward(key, path, None, query, model=model)
    if not gateway.services()[2].single:
        return fanout.union(key, path, query, "data", "id")
    transform = None
    if cloud.narrows_lists(key):
        transform = lambda data: _only_allowed(data, key)  # noqa: E731
    return gateway.forward(key, path, None, query, transform)


def _only_allowed(data, key):
    """The models the key may use (app/proxy/cloud.py)."""
    shown = cloud.shown(key)
    return {**data, "data": [m for m in data.get("data") or [] if shown(m.get("id"), m)]}
