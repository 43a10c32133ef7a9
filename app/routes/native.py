"""Ollama's own API under /api, relayed for any key with the right role and models."""
from flask import Blueprint, request

from app.accounting import request_record
from app.errors import MethodNotAllowed
from app.proxy import auth, cloud, doors, fanout, gateway
from app.proxy.request_body import upload_body

bp = Blueprint("native", __name__)

# Ollama's endpoints and the methods it serves them with (server/routes.go); a wrong
# method gets a 405 here instead of Ollama's plain-text 404. Other paths are relayed as
# they are, for admin keys only unless open_unknown_paths (app/proxy/doors.py).
ENDPOINT_METHODS = {
    "/api/status": ("GET",),
    **dict.fromkeys(["/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
                     "/api/show", "/api/pull", "/api/push", "/api/create", "/api/copy"],
                    ("POST",)),
    **dict.fromkeys(["/api/tags", "/api/version", "/api/ps"], ("GET", "HEAD")),
    "/api/delete": ("DELETE",),
    # Proxied to ollama.com: for keys the cloud setting allows (app/proxy/cloud.py).
    **dict.fromkeys(cloud.WEB_PATHS, ("POST",)),
}
BLOB_METHODS = ("HEAD", "POST")
# Endpoints that change what models exist on the server: admins only.
MODEL_MANAGEMENT = {"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"}
# Answers listing models, narrowed to a key's allow-list.
MODEL_LISTS = {"/api/tags", "/api/ps"}


@bp.route("/api/<path:subpath>", methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"])
def relay(subpath):
    path = gateway.canonical_path("/api/" + subpath)
    pending = request_record.begin("/api/blobs" if path.startswith("/api/blobs/") else path)
    is_blob = path.startswith("/api/blobs/")
    _require_method(path, BLOB_METHODS if is_blob else ENDPOINT_METHODS.get(path))
    if is_blob:
        pool = gateway.services()[2]
        query = gateway.query_without_key()
        key = gateway.current_key()
        auth.require_admin(key, "uploading model blobs")
        target = fanout.named_upstream(pool)
        if pool.single or target is not None:
            return gateway.forward(key, path, upload_body(), query, target=target)
        return fanout.upload_to_all(key, path, query, upload_body(), request.content_length or 0)

    return relay_json(path, pending)


@bp.route("/api/models", methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"])
def models():
    """ollama-api-service's model list: exactly what /api/tags answers this key."""
    pending = request_record.begin("/api/models")  # usage shows what the client called
    _require_method("/api/models", ENDPOINT_METHODS["/api/tags"])
    return relay_json("/api/tags", pending)


def relay_json(path, pending):
    """Relay a request with a JSON body (or none) to `path`, after every check that applies."""
    pool = gateway.services()[2]
    query = gateway.query_without_key()
    key, body = gateway.authenticated_body()
    doors.check(key, path, path in ENDPOINT_METHODS)
    payload = body.validated()
    pending.model = next(iter(body.models), None)
    request_record.keep_prompt(pending, payload)
    if path in MODEL_MANAGEMENT:
        auth.require_admin(key, path)
    for model in body.models:  # `model`, the older `name`, in any letter case
        auth.require_model(key, model)
    # Pulling or copying a cloud model's stub needs the permission but runs nothing there.
    kind = cloud.check(key, path, body, body.models)
    # Pulling a cloud model's stub or showing it runs nothing on ollama.com.
    cloud.mark(pending, None if path in MODEL_MANAGEMENT or path == "/api/show" else kind)
    raw = gateway.outgoing_body(body, key, path)  # never with a gateway key in it
    if path in MODEL_MANAGEMENT and not pool.single:
        target = fanout.named_upstream(pool)
        if target is None:
            return fanout.to_all(key, path, raw or None, query)
        return gateway.forward(key, path, raw or None, query, target=target)
    if path in MODEL_LISTS and not pool.single:
        return fanout.union(key, path, query, "models", "name")
    transform = None
    if path in MODEL_LISTS and cloud.narrows_lists(key):
        transform = lambda data: _only_allowed(data, key)  # noqa: E731
    return gateway.forward(key, path, raw or None, query, transform, model=pending.model)


def _require_method(path, allowed):
    if allowed is not None and request.method not in allowed:
        raise MethodNotAllowed(
            f"{request.method} is not allowed on {path}; use {' or '.join(allowed)}",
            headers={"Allow": ", ".join(allowed)},
        )


def _only_allowed(data, key):
    """The models the key may use (app/proxy/cloud.py)."""
    shown = cloud.shown(key)
    return {**data, "models": [m for m in data.get("models", [])
                               if shown(m.get("name") or m.get("model"), m)]}
