"""Ollama's own API under /api, relayed for any key with the right role and models."""
from flask import Blueprint

from app import auth, gateway

bp = Blueprint("native", __name__)

# Endpoints that change what models exist on the server: admins only.
MODEL_MANAGEMENT = {"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"}
# Answers listing models, narrowed to a key's allow-list.
MODEL_LISTS = {"/api/tags", "/api/ps"}


@bp.route("/api/<path:subpath>", methods=["GET", "HEAD", "POST", "PUT", "DELETE"])
def relay(subpath):
    path = gateway.canonical_path("/api/" + subpath)
    if path.startswith("/api/blobs/"):
        key = gateway.current_key()
        auth.require_admin(key, "uploading model blobs")
        _, query = gateway.strip_legacy_key(None, None)  # a legacy ?apikey= must not reach Ollama
        return gateway.forward(key, path, gateway.request_body_for_upload(), query)

    body = gateway.read_json_body()
    key = gateway.current_key(body.payload)
    payload = body.validated()
    if path in MODEL_MANAGEMENT:
        auth.require_admin(key, path)
    for model in body.models:  # `model`, the older `name`, in any letter case
        auth.require_model(key, model)
    raw, query = gateway.strip_legacy_key(body.raw, payload)
    transform = None
    if path in MODEL_LISTS and key.models:
        transform = lambda data: _only_allowed(data, key)  # noqa: E731
    return gateway.forward(key, path, raw or None, query, transform)


def _only_allowed(data, key):
    models = [
        m for m in data.get("models", []) if key.allows_model(m.get("name") or m.get("model"))
    ]
    return {**data, "models": models}
