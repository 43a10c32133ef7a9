"""OpenAI's API under /v1, relayed to Ollama's own OpenAI-compatible endpoints.

The same keys, limits, allow-lists and model policy as /api; errors in OpenAI's shape
(app/errors.py), so the official `openai` client raises the right exception. Streams
are relayed as they arrive, with exact usage (app/proxy/sse.py). Anthropic's Messages API
(/v1/messages) likewise, with errors in Anthropic's shape; its token counter
(/v1/messages/count_tokens), which Ollama lacks, is answered here.
"""
from flask import Blueprint, jsonify, request

from app.accounting import request_record
from app.admission import estimate
from app.errors import BadRequest, MethodNotAllowed
from app.proxy import auth, cloud, doors, fanout, form, gateway, sse
from app.proxy.jsonbody import model_problem
from app.proxy.request_body import read_body

bp = Blueprint("openai", __name__)

GENERATING = {"/v1/chat/completions", "/v1/completions", "/v1/responses"}
# Ollama's other /v1 endpoints (Anthropic's Messages API, audio, images): relayed with the
# key's allow-list checked. Images and audio name their model or get a 400.
MEDIA = {"/v1/audio/transcriptions", "/v1/images/generations", "/v1/images/edits"}
RELAYED = {"/v1/messages", *MEDIA}
# Take a multipart form: transcriptions always, image edits as OpenAI's SDK sends them
# (Ollama took JSON with a base64 `image`: both are checked and relayed).
FORMS = {"/v1/audio/transcriptions", "/v1/images/edits"}
COUNT_TOKENS = "/v1/messages/count_tokens"  # answered by the gateway, never forwarded
POST_ENDPOINTS = GENERATING | RELAYED | {"/v1/embeddings", COUNT_TOKENS}
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
    if path in FORMS and (request.mimetype == "multipart/form-data"
                          or path == "/v1/audio/transcriptions"):
        return _form(path, pending)
    key, body = gateway.authenticated_body()
    doors.check(key, path, path in POST_ENDPOINTS)
    doors.require_counted(key, path)
    payload = body.validated()
    pending.model = next(iter(body.models), None)
    for model in body.models:
        auth.require_model(key, model)
    if path == COUNT_TOKENS:
        return _count_tokens(payload)
    if path in MEDIA and not any(body.models):
        raise BadRequest(f"'model' is required on {path}")
    cloud.mark(pending, cloud.check(key, path, body, body.models))
    request_record.keep_prompt(pending, payload)
    changes, rewrite = {}, None
    streams = body.values("stream")  # in any letter case, the last one: as Go decodes it
    if path in USAGE_ON_REQUEST and streams and streams[-1] is True:
        if (stream_options := sse.ask_for_usage(body)) is not None:
            changes["stream_options"] = stream_options
            rewrite = sse.UsageStripper()
    raw = gateway.outgoing_body(body, key, path, changes)
    return gateway.forward(key, path, raw or None, gateway.query_without_key(),
                           rewrite=rewrite, model=pending.model)


def _count_tokens(payload):
    """`{"input_tokens": N}`: the estimate a quota reserves for the same /v1/messages body.

    Claude Code asks before it sends; Ollama has no such endpoint. Nothing runs, so it is
    neither queued nor charged (its usage record has no tokens).
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), str) \
            or not payload["model"]:
        raise BadRequest("model: a model name is required")
    if not isinstance(payload.get("messages"), list):
        raise BadRequest("messages: a list of messages is required")
    return jsonify({"input_tokens": estimate.prompt_tokens(payload)})


def _form(path, pending):
    """A multipart body: every `model` it names (and the query's, which Go's FormValue
    reads first) checked, then relayed as it came."""
    key = gateway.current_key()
    doors.require_counted(key, path)
    if request.mimetype != "multipart/form-data":
        raise BadRequest(f"{path} takes a multipart/form-data body (model, file, …), as "
                         f"OpenAI's does; this one is {request.mimetype or 'untyped'}")
    raw = read_body(gateway.settings().max_body_bytes)
    named = form.field_values(raw, request.content_type)
    if not named or not named[0]:
        raise BadRequest(f"'model' is required on {path}: send it as a form field")
    for model in named + request.args.getlist("model"):
        if problem := model_problem("model", model):
            raise BadRequest(problem)
        auth.require_model(key, model)
    pending.model = named[0]  # the one Ollama takes
    cloud.mark(pending, cloud.check(key, path, models=named + request.args.getlist("model")))
    return gateway.forward(key, path, raw, gateway.query_without_key(), model=pending.model)


def _models(path):
    """GET /v1/models (only the key's models) and GET /v1/models/{model}."""
    request_record.begin("/v1/models" if path == "/v1/models" else "/v1/models/{model}")
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed(f"{request.method} is not allowed on {path}; use GET",
                               headers={"Allow": "GET, HEAD"})
    key = gateway.current_key()
    query = gateway.query_without_key()
    if path != "/v1/models":
        model = path[len("/v1/models/"):]
        auth.require_model(key, model)
        cloud.check(key, path, models=[model])  # refused if it may not; it runs nothing
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
