"""One exception family, answered in the caller's dialect.

Native routes answer as Ollama does, ``{"error": "message"}``; ``/v1`` routes as OpenAI
does, ``{"error": {"message", "type", "code"}}``; Anthropic's Messages API (``/v1/messages``
and below) as Anthropic does, ``{"type": "error", "error": {"type", "message"}}``, so each
official client raises its matching exception. A traceback never reaches a client.
"""
import logging
import sqlite3

import peewee
import psycopg2
from flask import g, jsonify, request
from playhouse.pool import MaxConnectionsExceeded
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class GatewayError(Exception):
    status = 500
    kind = "server_error"
    # Why the gateway turned the request away, for usage records; None: not a refusal.
    refusal = None

    def __init__(self, message, status=None, headers=None, refusal=None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if refusal is not None:
            self.refusal = refusal
        self.headers = dict(headers or {})


class BadRequest(GatewayError):
    status, kind = 400, "invalid_request_error"
    refusal = "invalid"


class Unauthorized(GatewayError):
    status, kind = 401, "authentication_error"
    refusal = "auth"


class Forbidden(GatewayError):
    status, kind = 403, "permission_error"
    refusal = "forbidden"


class NotFound(GatewayError):
    status, kind = 404, "not_found_error"


class MethodNotAllowed(GatewayError):
    status, kind = 405, "invalid_request_error"
    refusal = "invalid"


class RequestTimeout(GatewayError):
    status, kind = 408, "invalid_request_error"
    refusal = "invalid"


class RateLimited(GatewayError):
    status, kind = 429, "rate_limit_error"
    refusal = "rate"


class UpstreamUnavailable(GatewayError):
    status, kind = 502, "upstream_error"


class DatabaseUnavailable(GatewayError):
    status, kind = 503, "service_unavailable"

    def __init__(self, cause):
        super().__init__(database_problem(cause))
        self.cause = cause


class UpstreamTimeout(GatewayError):
    status, kind = 504, "upstream_timeout"


# Failures of the database itself, whether peewee wrapped them or they escaped it raw
# (sqlite3 raises some only when a row is fetched, outside peewee's wrapper).
DATABASE_ERRORS = (
    peewee.OperationalError, peewee.InterfaceError, MaxConnectionsExceeded,
    sqlite3.OperationalError, sqlite3.InterfaceError,
    psycopg2.OperationalError, psycopg2.InterfaceError,
)


def database_problem(exc):
    """What to check, in words, for a database failure."""
    text = str(exc).lower()
    if "disk is full" in text or "no space" in text:
        return ("the gateway's database cannot be written: the disk holding it is full; "
                "free space there")
    if "readonly" in text or "read-only" in text:
        return ("the gateway's database cannot be written: the file or its directory is "
                "read-only for the gateway's user; check its permissions")
    if "database is locked" in text or "maximum connections" in text:
        return "the gateway's database is too busy to answer in time; retry shortly"
    return ("the gateway's database is unavailable; check DATABASE_URL and that the "
            "database server is running (`ollama-gw check` tests it)")


# OpenAI's machine-readable `code` for what the gateway refuses on /v1.
OPENAI_CODES = {"auth": "invalid_api_key", "forbidden": "model_not_allowed",
                "rate": "rate_limit_exceeded", "concurrency": "rate_limit_exceeded",
                "quota": "insufficient_quota", "queue_full": "rate_limit_exceeded"}


# Anthropic's error types by status (its API's, as Ollama's anthropic package maps them);
# any other status is an `api_error`.
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                   403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                   408: "invalid_request_error", 413: "request_too_large",
                   429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def is_anthropic(path):
    """Whether `path` is Anthropic's Messages API (errors in its shape)."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def anthropic_error(status, message):
    return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"),
                                       "message": message}}


def error_body(status, message, kind="server_error", path=None, refusal=None):
    """The JSON body for an error on `path`, in that route family's dialect."""
    path = request.path if path is None else path
    if is_anthropic(path):
        return anthropic_error(status, message)
    if path.startswith("/v1/"):
        return {"error": {"message": message, "type": kind, "param": None,
                          "code": OPENAI_CODES.get(refusal)}}
    return {"error": message}


def error_response(status, message, kind="server_error", headers=None, refusal=None):
    response = jsonify(error_body(status, message, kind, refusal=refusal))
    response.status_code = status
    response.headers.update(headers or {})
    return response


def init_app(app, on_database_error=lambda: None):
    """Answer every error in the gateway's shape.

    `on_database_error` runs after a database error is logged: create_app passes
    app/store/db.py's forget_idle_connections, which this module, below the store, cannot
    import.
    """
    @app.errorhandler(GatewayError)
    def _gateway_error(exc):
        g.refusal = exc.refusal  # for the usage record (app/accounting/request_record.py)
        return error_response(exc.status, exc.message, exc.kind, exc.headers, exc.refusal)

    @app.errorhandler(HTTPException)
    def _http_error(exc):
        messages = {
            404: f"{request.path} is not an endpoint of this gateway",
            405: f"{request.method} is not allowed on {request.path}",
            413: f"request body is larger than the gateway's limit of "
            f"{app.config['SETTINGS'].max_body_bytes} bytes (max_body_bytes)",
        }
        message = messages.get(exc.code, exc.description or exc.name)
        headers = [(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"]
        return error_response(exc.code, message, "invalid_request_error", headers)

    @app.errorhandler(DatabaseUnavailable)
    def _database_error(exc):
        log.error("database error on %s %s: %s", request.method, request.path, exc.cause)
        on_database_error()
        return error_response(503, exc.message, DatabaseUnavailable.kind, {"Retry-After": "5"})

    @app.errorhandler(Exception)
    def _unexpected(exc):
        if isinstance(exc, DATABASE_ERRORS):
            return _database_error(DatabaseUnavailable(exc))
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal gateway error; the gateway log has the details")
