"""The OpenAPI 3.1 document of every route the gateway serves (`/openapi.json`).

Written by hand beside the views rather than generated from them: the relay's routes
are one catch-all in Flask but a dozen endpoints to a reader, and their bodies are
Ollama's. tests/routes/test_openapi.py checks that every Flask rule is described here and runs
schemathesis against the document, so the two cannot drift apart unnoticed.
Schemas list the fields people use and allow more: Ollama adds fields over time and
the gateway relays them untouched.
"""
import functools
import importlib.metadata

from app.keys.registry import CLOUD

NDJSON, SSE, JSON = "application/x-ndjson", "text/event-stream", "application/json"
SECURITY = [{"bearer": []}, {"apiKeyHeader": []}, {"apiKeyQuery": []}]
OPEN = {"type": "object", "additionalProperties": True}


def _ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required=(), **properties):
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": True}


def _str(description=None, **extra):
    return {"type": "string", **({"description": description} if description else {}),
            **extra}


def _nullable(schema):
    return {"anyOf": [schema, {"type": "null"}]}


INT, NUM, BOOL = {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
ANY_BODY = {JSON: {"schema": OPEN}}


def _json_response(description, schema=OPEN, headers=None):
    response = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _errors(*codes, openai=False, anthropic=False):
    """The error responses `codes` of a route, in its family's error shape."""
    texts = {
        400: "Malformed JSON, a body that is not an object, a bad field or a bad path",
        401: "Missing, unknown, revoked or expired key",
        403: "An admin route with a user key, or a model outside the key's allow-list",
        404: "No such key, model or endpoint",
        405: "Wrong method for a known endpoint (`Allow` says which)",
        408: "The request body stopped arriving",
        409: "The identifier matches several keys, or the name is another live key's",
        413: "The body is larger than max_body_bytes (a compressed one: as sent or inflated)",
        415: "A Content-Encoding other than zstd or gzip",
        429: "Rate limit, concurrency limit or token quota reached",
        502: "Ollama refused the connection or broke off",
        503: "The gateway's database is unavailable",
        504: "Ollama did not answer in time",
    }
    schema = _ref("AnthropicError" if anthropic else "OpenAIError" if openai else "Error")
    out = {}
    for code in codes:
        headers = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}} \
            if code in (429, 503) else None
        out[str(code)] = _json_response(texts[code], schema, headers)
    return out


RATE_HEADERS = {name: {"$ref": f"#/components/headers/{name}"}
                for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
                             "X-Quota-Limit", "X-Quota-Remaining", "X-Quota-Reset",
                             "X-GPU-Quota-Limit", "X-GPU-Quota-Remaining", "X-GPU-Quota-Reset")}
KEYED = (400, 401, 403, 404, 405, 408, 413, 415, 429, 502, 503, 504)


def _relayed(summary, request=None, stream=False, errors=KEYED, openai=False,
             admin=False, ok=OPEN, tag="Ollama API", empty=False, anthropic=False):
    """An operation relayed to Ollama: its answer, streamed or not, and what can go wrong.

    `empty`: Ollama answers success with an empty body (copy, delete).
    """
    content = {JSON: {"schema": ok}}
    if stream:
        content[SSE if openai else NDJSON] = {"schema": _str(
            "One JSON object per line (NDJSON), or `data:` events ending with `data: [DONE]` "
            "on /v1")}
    success = {"description": "Ollama's answer, relayed as it arrives", "headers": RATE_HEADERS}
    if not empty:
        success["content"] = content
    operation = {
        "tags": [tag], "summary": summary, "security": SECURITY,
        "responses": {"200": success,
                      **_errors(*errors, openai=openai, anthropic=anthropic),
                      "default": {"description": "Any other status Ollama answers, passed "
                                                 "through", "content": {"*/*": {}}}},
    }
    if "404" in operation["responses"]:  # Ollama answers an unknown path in plain text
        operation["responses"]["404"]["content"]["text/plain"] = {"schema": _str()}
    if admin:
        operation["description"] = "Admin keys only."
    if request is not None:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": request}}}
    return operation


def _gateway(summary, ok, ok_schema=OPEN, errors=(401, 503), request=None, params=None,
             tag="Gateway", security=True, status="200", description=None):
    """An operation the gateway answers itself."""
    operation = {"tags": [tag], "summary": summary,
                 "responses": {status: _json_response(ok, ok_schema), **_errors(*errors)}}
    if security:
        operation["security"] = SECURITY
    if description:
        operation["description"] = description
    if request is not None:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": request}}}
    if params:
        operation["parameters"] = params
    return operation


def _query(name, description, schema=None):
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or _str()}


def _path_param(name, description):
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": _str()}


SINCE = _query("since", "How far back: 24h, 7d, 30d, … or `all` (default 30d)")
KEY_IDENT = _path_param("ident", "The key's id, its prefix (6+ characters) or its name")

# --- Ollama's native API, as relayed -------------------------------------------------------

OPTIONS = {"type": "object", "description": "Model options: temperature, num_ctx, "
           "num_predict, top_p, seed, stop, …", "additionalProperties": True}
COMPAT = {"temperature": NUM, "max_tokens": INT, "top_p": NUM, "top_k": INT, "seed": INT}
GENERATE = _obj(["model"], model=_str("Model name, e.g. llama3.2"), prompt=_str(),
                suffix=_str(), system=_str(), template=_str(), context={"type": "array"},
                images={"type": "array", "items": _str("base64")}, format={},
                options=OPTIONS, stream=BOOL, raw=BOOL, keep_alive={}, think={}, **COMPAT)
MESSAGE = _obj(["role"], role=_str(), content=_str(),
               images={"type": "array", "items": _str()}, tool_calls={"type": "array"})
CHAT = _obj(["model"], model=_str(), messages={"type": "array", "items": MESSAGE},
            tools={"type": "array"}, format={}, options=OPTIONS, stream=BOOL,
            keep_alive={}, think={}, **COMPAT)
EMBED = _obj(["model"], model=_str(), input={}, truncate=BOOL, options=OPTIONS,
             keep_alive={}, dimensions=INT)
EMBEDDINGS = _obj(["model"], model=_str(), prompt=_str(), options=OPTIONS, keep_alive={})
NAMED = _obj(["model"], model=_str(), name=_str("The older spelling of `model`"))
PULL = _obj([], model=_str(), name=_str(), insecure=BOOL, stream=BOOL)
CREATE = _obj(["model"], model=_str(), **{"from": _str()}, files=OPEN, adapters=OPEN,
              template=_str(), system=_str(), parameters=OPEN, quantize=_str(), stream=BOOL)
COPY = _obj(["source", "destination"], source=_str(), destination=_str())
MODEL_LIST = _obj(["models"], models={"type": "array", "items": _obj(
    ["name"], name=_str(), model=_str(), size=INT, digest=_str(), details=OPEN)})


def _native_paths():
    post = {
        "/api/generate": ("Generate a completion (streams unless `stream` is false)",
                          GENERATE, True, False),
        "/api/chat": ("Chat completion (streams unless `stream` is false)", CHAT, True, False),
        "/api/embed": ("Embeddings for one or more inputs", EMBED, False, False),
        "/api/embeddings": ("Embedding of one prompt (older API)", EMBEDDINGS, False, False),
        "/api/show": ("A model's details", NAMED, False, False),
        "/api/pull": ("Download a model", PULL, True, True),
        "/api/push": ("Upload a model to a registry", PULL, True, True),
        "/api/create": ("Create a model", CREATE, True, True),
    }
    paths = {path: {"post": _relayed(summary, body, stream, admin=admin)}
             for path, (summary, body, stream, admin) in post.items()}
    paths["/api/copy"] = {"post": _relayed("Copy a model", COPY, admin=True, empty=True)}
    paths["/api/delete"] = {"delete": _relayed("Delete a model", NAMED, admin=True, empty=True)}
    for path, summary, ok in (
            ("/api/tags", "Models available (the key's allowed ones)", MODEL_LIST),
            ("/api/ps", "Models loaded in memory (the key's allowed ones)", MODEL_LIST),
            ("/api/version", "Ollama's version", _obj(["version"], version=_str()))):
        paths[path] = {"get": _relayed(summary, ok=ok, errors=(401, 405, 429, 502, 503, 504))}
    for path, summary, body in (
            ("/api/experimental/web_search", "A web search on ollama.com (the server owner's "
             "plan): keys the cloud setting allows", _obj(["query"], query=_str(),
                                                          max_results=INT)),
            ("/api/experimental/web_fetch", "A web page fetched by ollama.com (the server "
             "owner's plan): keys the cloud setting allows", _obj(["url"], url=_str()))):
        paths[path] = {"post": _relayed(summary, body)}
    blob = {"parameters": [_path_param("digest", "sha256:…")]}
    paths["/api/blobs/{digest}"] = {
        **blob,
        "head": _relayed("Whether Ollama has a blob", admin=True,
                         errors=(400, 401, 403, 404, 429, 502, 503, 504)),
        "post": {**_relayed("Upload a blob (streamed, not buffered)", admin=True),
                 "requestBody": {"required": True, "content": {
                     "application/octet-stream": {"schema": _str(format="binary")}}}},
    }
    paths["/api/{path}"] = {
        "parameters": [_path_param("path", "Any other Ollama endpoint")],
        **{method: {**_relayed(f"Any other Ollama endpoint ({method.upper()}), relayed as "
                               "it is", request=OPEN if method != "get" else None),
                    "requestBody": {"required": False, "content": ANY_BODY}}
           if method != "get" else _relayed("Any other Ollama endpoint (GET), relayed as it is")
           for method in ("get", "post", "put", "patch", "delete")},
    }
    _unknown_paths(paths["/api/{path}"])
    paths["/api/models"] = {"get": _relayed(
        "The models the calling key may use (ollama-api-service's route; /api/tags' answer)",
        ok=MODEL_LIST, errors=(401, 405, 429, 502, 503, 504), tag="Compatibility")}
    paths["/generate"] = {"post": {**_relayed(
        "go-ollama-api's route: Ollama's /api/generate, the key in the body as `apikey`",
        _obj(["model"], apikey=_str("The gateway key (or send it in a header)"),
             **GENERATE["properties"]), stream=True, tag="Compatibility")}}
    return paths


# --- OpenAI's API, as Ollama serves it -----------------------------------------------------

def _openai_paths():
    v1 = {
        "/v1/chat/completions": ("Chat completion", _obj(
            ["model", "messages"], model=_str(), messages={"type": "array", "items": OPEN},
            stream=BOOL, stream_options=OPEN, max_tokens=INT, max_completion_tokens=INT,
            temperature=NUM), True),
        "/v1/completions": ("Text completion", _obj(
            ["model"], model=_str(), prompt={}, stream=BOOL, max_tokens=INT), True),
        "/v1/embeddings": ("Embeddings", _obj(["model", "input"], model=_str(), input={}),
                           False),
        "/v1/responses": ("Responses API", _obj(
            ["model"], model=_str(), input={}, stream=BOOL, max_output_tokens=INT), True),
    }
    paths = {path: {"post": _relayed(summary, body, stream, openai=True, tag="OpenAI API")}
             for path, (summary, body, stream) in v1.items()}
    messages = _obj(["model", "messages"], model=_str(), messages={"type": "array",
                                                                    "items": OPEN},
                    system={}, tools={"type": "array", "items": OPEN}, max_tokens=INT,
                    stream=BOOL, thinking=OPEN)
    paths["/v1/messages"] = {"post": _relayed(
        "Anthropic's Messages API (Claude Code); errors in Anthropic's shape", messages,
        True, openai=True, anthropic=True, tag="OpenAI API")}
    count = _obj(["input_tokens"], input_tokens=INT)
    paths["/v1/messages/count_tokens"] = {"post": {
        **_relayed("Anthropic's token count: the estimate a token quota reserves for the "
                   "same /v1/messages body; answered by the gateway, never relayed",
                   messages, ok=count, errors=(400, 401, 403, 405, 408, 413, 503),
                   anthropic=True, tag="OpenAI API"),
        "description": "Not rate limited, queued or charged."}}
    paths["/v1/messages/count_tokens"]["post"]["responses"]["200"]["description"] = (
        "`{\"input_tokens\": N}`, from the gateway")
    model_list = _obj(["data"], object=_str(), data={"type": "array", "items": _obj(
        ["id"], id=_str(), object=_str(), owned_by=_str())})
    paths["/v1/models"] = {"get": _relayed("Models (the key's allowed ones)", ok=model_list,
                                           errors=(401, 405, 429, 502, 503, 504),
                                           openai=True, tag="OpenAI API")}
    paths["/v1/models/{model}"] = {"parameters": [_path_param("model", "A model name")],
                                   "get": _relayed("One model", openai=True, tag="OpenAI API",
                                                   errors=(400, 401, 403, 404, 405, 429, 502,
                                                           503, 504))}
    paths["/v1/{path}"] = {
        "parameters": [_path_param("path", "Any other /v1 endpoint Ollama serves")],
        "post": {**_relayed("Any other /v1 endpoint, relayed as it is", OPEN, openai=True,
                            tag="OpenAI API"),
                 "requestBody": {"required": False, "content": ANY_BODY}},
        "get": _relayed("Any other /v1 endpoint, relayed as it is", openai=True,
                        tag="OpenAI API"),
    }
    _unknown_paths(paths["/v1/{path}"])
    return paths


def _unknown_paths(item):
    """Who may call a path the gateway does not know (app/proxy/doors.py)."""
    for method in ("get", "post", "put", "patch", "delete"):
        if method in item:
            item[method]["description"] = (
                "Admin keys only, unless the setting open_unknown_paths is on; Ollama's "
                "account endpoints (/api/me, /api/signout, /api/user/…) are for admin keys "
                "either way.")


# --- the gateway's own routes --------------------------------------------------------------

KEY = _obj(["id", "prefix", "name", "role", "status"], id=INT, prefix=_str(),
           key_preview=_str("The prefix, as ollama-api-service named it"), name=_str(),
           role={"enum": ["user", "admin"]}, rate_limit=_str("e.g. 60/minute, unlimited"),
           max_concurrent=_nullable(INT), token_quota=_nullable(_str()),
           gpu_quota=_str("e.g. 2h/day, or none"),
           max_ctx=_nullable(INT), max_predict=_nullable(INT),
           keep_alive={"enum": ["allow", "deny"]}, models={"type": "array", "items": _str()},
           cloud={"enum": list(CLOUD), "description": "Cloud models and web search; default: "
                  "the setting cloud_default"},
           priority={**INT, "description": "Share of a busy upstream's slots (1-100)"},
           status={"enum": ["active", "revoked", "expired"]}, is_active=BOOL,
           created_at=_nullable(_str()), last_used_at=_nullable(_str()),
           expires_at=_nullable(_str()), revoked_at=_nullable(_str()))
SETTINGS = {"role": {"enum": ["user", "admin"]},
            "rate_limit": {"anyOf": [_str("N/second|minute|hour|day, or none"),
                                     {"type": "integer", "description": "Per hour"}]},
            "max_concurrent": INT, "token_quota": _str("N/day or N/month, or none"),
            "gpu_quota": _str("GPU time per day or month: 90s/day, 30m/day, 2h/month, or none"),
            "max_ctx": INT, "max_predict": INT, "keep_alive": {"enum": ["allow", "deny"]},
            "cloud": {"enum": list(CLOUD)},
            "priority": {"type": "integer", "minimum": 1, "maximum": 100},
            "models": {"anyOf": [{"type": "array", "items": _str()}, _str()]},
            "expires": _str("A lifetime like 30d, or never")}
NEW_KEY = {"allOf": [KEY, _obj(["key"], key=_str("The secret: shown only now"),
                                api_key=_str("The same secret (ollama-api-service's name)"))]}
CLOUD_WINDOW = _obj(["requests", "tokens"], requests=INT, prompt_tokens=INT,
                    completion_tokens=INT, tokens=INT)
STATS = _obj(["total_requests"], key=OPEN, total_requests=INT, requests_by_model=OPEN,
             cloud=_obj(["last_5h", "last_7d"], last_5h=CLOUD_WINDOW, last_7d=CLOUD_WINDOW,
                        since=CLOUD_WINDOW),
             requests_by_endpoint=OPEN, average_response_time=_nullable(NUM),
             last_24h_requests=INT, by_model={"type": "array"}, by_day={"type": "array"},
             gpu_seconds={**NUM, "description": "GPU time: seconds of a slot / the "
                          "upstream's slots x its gpu_cost"},
             gpu_seconds_by_model=OPEN, gpu_seconds_by_upstream=OPEN,
             gpu_quota=_nullable(OPEN))
AUDIT = _obj(["entries", "total"], total=INT, entries={"type": "array", "items": _obj(
    ["id", "at", "actor", "via", "action"], id=INT, at=_str(), actor=_str(),
    via={"enum": ["http", "cli", "shell"]}, source=_str(), action=_str(),
    target=_nullable(_str()), details=OPEN)})
HEALTH = _obj(["status"], status=_str(), database=_str(), ollama_backend=_str(),
              upstreams={"type": "array"}, timestamp=_str(), database_problem=_str())
ADMIN = (401, 403, 503)


def _key_body(required=()):
    return _obj(required, name=_str(), **SETTINGS)


def _gateway_paths():
    key_ops = {
        "/api/keys": {
            "post": _gateway("Create a key (admin)", "The key, with its secret shown once",
                             NEW_KEY, (400, 409, *ADMIN), _key_body(["name"]), tag="Admin",
                             status="201"),
            "get": _gateway("List keys (admin), never a secret", "Every key",
                            _obj(["api_keys", "total"], api_keys={"type": "array",
                                                                  "items": KEY}, total=INT),
                            ADMIN, params=[_query("active", "true: hide revoked keys")],
                            tag="Admin"),
        },
        "/api/keys/{ident}": {
            "parameters": [KEY_IDENT],
            "get": _gateway("One key (admin)", "The key", KEY, (400, 404, 409, *ADMIN),
                            tag="Admin"),
            "patch": _gateway("Change a key's settings (admin)", "The key and what changed",
                              {"allOf": [KEY, _obj(["changed"], changed={"type": "array"})]},
                              (400, 404, 409, *ADMIN), _key_body(), tag="Admin"),
            "delete": _gateway("Revoke a key (admin)", "The revoked key",
                               {"allOf": [KEY, _obj(["message"], message=_str())]},
                               (400, 404, 409, *ADMIN), tag="Admin"),
        },
        "/api/keys/{ident}/rotate": {
            "parameters": [KEY_IDENT],
            "post": _gateway("Give a key a new secret (admin)", "The key with its new secret",
                             {"allOf": [NEW_KEY, _obj(["previous_prefix"],
                                                      previous_prefix=_str())]},
                             (400, 404, 409, *ADMIN), tag="Admin"),
        },
        "/api/admin/audit": {"get": _gateway(
            "The audit log (admin): who changed which key or webhook, when, from where",
            "Entries, newest first", AUDIT, (400, *ADMIN), tag="Admin", params=[
                SINCE, _query("action", "An action (key.created) or family (key)"),
                _query("limit", "At most this many entries (1-10000, default 1000)")])},
        "/api/admin/stats": {"get": _gateway("Everyone's usage (admin)", "Usage per key",
                                             STATS, (400, *ADMIN), params=[SINCE],
                                             tag="Usage")},
        "/api/stats": {"get": _gateway("The calling key's own usage", "Its usage", STATS,
                                       (400, 401, 503), params=[SINCE], tag="Usage")},
        "/api/stats/detailed": {"get": _gateway(
            "The calling key's usage in detail (ollama-api-service's route)", "Its usage",
            OPEN, (400, 401, 503), params=[SINCE], tag="Usage")},
    }
    meta = {
        "/": {"get": {
            "tags": ["Service"], "summary": "Ollama's `Ollama is running`, or service "
            "information as JSON when Accept prefers application/json",
            "responses": {"200": {"description": "Running", "content": {
                "text/plain": {"schema": _str()},
                JSON: {"schema": _obj([], service=_str(), version=_str(), status=_str(),
                                      documentation=_str(), health=_str())}}}}}},
        "/health": {"get": {
            "tags": ["Service"],
            "summary": "Health for load balancers; with `apikey`, go-ollama-api's key check",
            "parameters": [_query("apikey", "A key to check (go-ollama-api's form)")],
            "responses": {
                "200": _json_response("Healthy or degraded; with apikey: `{status: \"API is "
                                      "healthy\", timestamp}`", HEALTH),
                **_errors(401),
                "503": _json_response("The database cannot take a write", HEALTH)}}},
        "/metrics": {"get": {
            "tags": ["Service"], "summary": "Prometheus metrics (admin key unless "
            "metrics_public)", "security": SECURITY,
            "responses": {"200": {"description": "Prometheus text format",
                                  "content": {"text/plain": {"schema": _str()}}},
                          **_errors(401, 403, 503)}}},
        "/openapi.json": {"get": {"tags": ["Service"], "summary": "This document",
                                  "responses": {"200": _json_response("OpenAPI 3.1")}}},
        "/docs": {"get": _page("Swagger UI")},
        "/redoc": {"get": _page("ReDoc")},
        "/docs/": {"get": _moved("/docs")},
        "/redoc/": {"get": _moved("/redoc")},
        "/favicon.ico": {"get": {"tags": ["Service"], "summary": "The tab icon (SVG)",
                                 "responses": {"200": {"description": "The icon", "content": {
                                     "image/svg+xml": {"schema": _str()}}}}}},
        "/docs/assets/{name}": {"get": {
            "tags": ["Service"], "summary": "The documentation pages' scripts and styles",
            "parameters": [_path_param("name", "A file name")],
            "responses": {"200": {"description": "The file", "content": {"*/*": {}}},
                          **_errors(404)}}},
    }
    return {**meta, **key_ops}


def _moved(to):
    return {"tags": ["Service"], "summary": f"Redirects to {to}",
            "responses": {"301": {"description": f"Location: {to}"}}}


def _page(name):
    return {"tags": ["Service"], "summary": f"The API documentation in {name} (offline)",
            "responses": {"200": {"description": "HTML", "content": {
                "text/html": {"schema": _str()}}}}}


@functools.cache
def document():
    try:
        version = importlib.metadata.version("ollama-gw")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ollama-gw", "version": version,
            "description": "A gateway in front of Ollama: the same API with a key, rate "
            "limits, quotas, usage accounting and an admin API. Keys go in "
            "`Authorization: Bearer`, `X-API-Key`, or (legacy) an `apikey` query "
            "parameter or body field.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": [{"name": n} for n in ("Ollama API", "OpenAI API", "Compatibility", "Usage",
                                       "Admin", "Gateway", "Service")],
        "paths": {**_native_paths(), **_openai_paths(), **_gateway_paths()},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "apiKeyQuery": {"type": "apiKey", "in": "query", "name": "apikey"},
            },
            "schemas": {
                "Error": _obj(["error"], error=_str("What went wrong, and what to check")),
                "OpenAIError": _obj(["error"], error=_obj(
                    ["message", "type"], message=_str(), type=_str(),
                    param=_nullable(_str()), code=_nullable(_str()))),
                "AnthropicError": _obj(["type", "error"], type={"const": "error"},
                                       error=_obj(["type", "message"], type=_str(),
                                                  message=_str())),
            },
            "headers": {
                "X-RateLimit-Limit": {"description": "Requests allowed in the window",
                                      "schema": INT},
                "X-RateLimit-Remaining": {"description": "Requests left in the window",
                                          "schema": INT},
                "X-RateLimit-Reset": {"description": "Unix time the window ends",
                                      "schema": INT},
                "X-Quota-Limit": {"description": "The key's token quota for the period",
                                  "schema": INT},
                "X-Quota-Remaining": {"description": "Tokens neither charged nor reserved by "
                                      "requests running now", "schema": INT},
                "X-Quota-Reset": {"description": "Unix time the quota period ends",
                                  "schema": INT},
                "X-GPU-Quota-Limit": {"description": "The key's GPU quota for the period, "
                                      "in seconds", "schema": INT},
                "X-GPU-Quota-Remaining": {"description": "GPU seconds neither charged nor "
                                          "reserved by requests running now", "schema": NUM},
                "X-GPU-Quota-Reset": {"description": "Unix time the GPU quota period ends",
                                      "schema": INT},
                "Retry-After": {"description": "Seconds to wait before retrying",
                                "schema": INT},
            },
        },
    }
