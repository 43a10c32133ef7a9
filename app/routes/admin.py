"""The admin HTTP API: keys and the audit log, for admin keys only.

The views translate JSON to the calls `ollama-gw keys …` makes (app/keys/registry.py does the
work and writes the audit log for both), and answer ollama-api-service's field names
(`api_key`, `key_preview`, `is_active`, `api_keys`/`total`) beside ollama-gw's own.
"""
import json

from flask import Blueprint, current_app, jsonify, request

from app.errors import BadRequest, GatewayError, NotFound
from app.keys import registry as keystore
from app.proxy import auth, gateway
from app.proxy.request_body import read_body
from app.routes.stats import since_arg
from app.store import audit
from app.store.ids import whole_number

bp = Blueprint("admin", __name__)

SETTINGS = ("role", "rate_limit", "max_concurrent", "token_quota", "gpu_quota", "max_ctx",
            "max_predict", "keep_alive", "cloud", "priority", "models", "expires")
TEXT = {"name", "role", "rate_limit", "token_quota", "gpu_quota", "keep_alive", "cloud",
        "expires"}


class Conflict(GatewayError):
    status, kind = 409, "invalid_request_error"


@bp.before_request
def _admins_only():
    auth.require_admin(gateway.current_key(), request.path)


def _public(row, **extra):
    summary = keystore.key_summary(row)
    return {**extra, **summary, "key_preview": summary["prefix"],
            "is_active": summary["status"] == "active"}


def _settings_from_body(allowed):
    try:  # the relay's reader: a body that cannot be read is a 400, not a server error
        body = json.loads(read_body(current_app.config["SETTINGS"].max_body_bytes) or b"null")
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object, e.g. "
                         '{"name": "ci", "role": "user", "rate_limit": "60/minute"}')
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}; a key has "
                         f"{', '.join(allowed)}")
    for field, value in body.items():
        if value is None:
            continue
        if field == "models":
            if not (isinstance(value, str) or (isinstance(value, list)
                                               and all(isinstance(m, str) for m in value))):
                raise BadRequest("models must be a list of model names or a comma-separated "
                                 "string")
        elif field in TEXT and not isinstance(value, str) and not (
                field == "rate_limit" and type(value) is int):
            raise BadRequest(f"{field} must be a string")
        elif field not in TEXT and (type(value) is not int):
            raise BadRequest(f"{field} must be a whole number")
    return {k: v for k, v in body.items() if v is not None}


def _find(ident):
    try:
        return keystore.find_key(ident)
    except keystore.KeyOpError as exc:
        raise _http_error(exc) from None


def _http_error(exc):
    if isinstance(exc, keystore.KeyNotFound):
        return NotFound(str(exc))
    if isinstance(exc, (keystore.AmbiguousKey, keystore.KeyNameTaken)):
        return Conflict(str(exc))
    return BadRequest(str(exc))


@bp.post("/api/keys")
def create():
    values = _settings_from_body(("name",) + SETTINGS)
    conf = current_app.config["SETTINGS"]
    defaults = {"user": conf.default_rate_limit_user, "admin": conf.default_rate_limit_admin}
    try:
        row, secret = keystore.create_key(values.pop("name", None), values.pop("role", "user"),
                                          default_rate_limits=defaults, **values)
    except keystore.KeyOpError as exc:
        raise _http_error(exc) from None
    return jsonify(_public(row, key=secret, api_key=secret)), 201


@bp.get("/api/keys")
def list_():
    active_only = request.args.get("active", "").lower() in ("1", "true", "yes")
    rows = keystore.list_keys(include_revoked=not active_only)
    return jsonify({"api_keys": [_public(row) for row in rows], "total": len(rows)})


@bp.get("/api/keys/<ident>")
def show(ident):
    return jsonify(_public(_find(ident)))


@bp.patch("/api/keys/<ident>")
def update(ident):
    values = _settings_from_body(("name",) + SETTINGS)
    row = _find(ident)
    try:
        row, changed = keystore.update_key(row.id, **values)
    except keystore.KeyOpError as exc:
        raise _http_error(exc) from None
    return jsonify({**_public(row), "changed": changed})


@bp.delete("/api/keys/<ident>")
def revoke(ident):
    row = keystore.revoke_key(_find(ident).id)
    return jsonify(_public(row, message=f"{keystore.key_target(row)} revoked"))


@bp.post("/api/keys/<ident>/rotate")
def rotate(ident):
    row = _find(ident)
    try:
        rotated, secret = keystore.rotate_key(row.id)
    except keystore.KeyOpError as exc:
        raise _http_error(exc) from None
    return jsonify(_public(rotated, key=secret, api_key=secret, previous_prefix=row.prefix))


@bp.get("/api/admin/audit")
def audit_log():
    since = since_arg()
    limit = whole_number(request.args.get("limit", "1000"), maximum=10000)
    if not limit:
        raise BadRequest("limit must be a whole number from 1 to 10000")
    rows = audit.entries(since, request.args.get("action") or None, limit)
    return jsonify({"entries": rows, "total": len(rows)})
