"""One exception family, answered in the caller's dialect.

Native routes answer as Ollama does, ``{"error": "message"}``; ``/v1`` routes as OpenAI
does, ``{"error": {"message", "type", "code"}}``. A traceback never reaches a client.
"""
import logging

import peewee
from flask import jsonify, request
from playhouse.pool import MaxConnectionsExceeded
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class GatewayError(Exception):
    status = 500
    kind = "server_error"

    def __init__(self, message, status=None, headers=None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})


class BadRequest(GatewayError):
    status, kind = 400, "invalid_request_error"


class Unauthorized(GatewayError):
    status, kind = 401, "authentication_error"


class Forbidden(GatewayError):
    status, kind = 403, "permission_error"


class NotFound(GatewayError):
    status, kind = 404, "not_found_error"


class RateLimited(GatewayError):
    status, kind = 429, "rate_limit_error"


class UpstreamUnavailable(GatewayError):
    status, kind = 502, "upstream_error"


class DatabaseUnavailable(GatewayError):
    status, kind = 503, "service_unavailable"


class UpstreamTimeout(GatewayError):
    status, kind = 504, "upstream_timeout"


def error_body(status, message, kind="server_error", path=None):
    """The JSON body for an error on `path`, in that route family's dialect."""
    path = request.path if path is None else path
    if path.startswith("/v1/"):
        return {"error": {"message": message, "type": kind, "code": status}}
    return {"error": message}


def error_response(status, message, kind="server_error", headers=None):
    response = jsonify(error_body(status, message, kind))
    response.status_code = status
    response.headers.update(headers or {})
    return response


def init_app(app):
    @app.errorhandler(GatewayError)
    def _gateway_error(exc):
        return error_response(exc.status, exc.message, exc.kind, exc.headers)

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

    @app.errorhandler(peewee.OperationalError)
    @app.errorhandler(peewee.InterfaceError)
    @app.errorhandler(MaxConnectionsExceeded)
    def _database_error(exc):
        log.error("database error on %s %s: %s", request.method, request.path, exc)
        return error_response(
            503,
            "the gateway's database is unavailable; check DATABASE_URL and that the "
            "database server is running (`ollama-gw check` tests it)",
            DatabaseUnavailable.kind,
            {"Retry-After": "5"},
        )

    @app.errorhandler(Exception)
    def _unexpected(exc):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal gateway error; the gateway log has the details")
