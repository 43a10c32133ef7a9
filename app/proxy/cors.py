"""Browser clients, the way Ollama lets them in: listed origins only (`cors_origins`).

As in Ollama (gin-contrib/cors with wildcards): a request without an Origin header, or
from the gateway's own host, is not a cross-origin request and passes untouched; an
allowed origin gets the CORS headers and its preflight is answered without a key; any
other origin is refused with 403 before the request does anything.
"""
import fnmatch

from flask import request

from app.errors import Forbidden

# Browser JavaScript may read these on an answer (limits and when to retry).
EXPOSED = ("X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, X-Quota-Limit, "
           "X-Quota-Remaining, X-Quota-Reset, X-GPU-Quota-Limit, X-GPU-Quota-Remaining, "
           "X-GPU-Quota-Reset, Retry-After")
METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"


def origin_allowed(origin, patterns):
    origin = origin.lower()
    return any(p == "*" or fnmatch.fnmatchcase(origin, p.lower()) for p in patterns)


def _cross_origin():
    """The request's Origin if it is a cross-origin request, else None."""
    origin = request.headers.get("Origin")
    if not origin or origin in (f"http://{request.host}", f"https://{request.host}"):
        return None
    return origin


def init_app(app):
    patterns = app.config["SETTINGS"].cors_origins

    @app.before_request
    def _refuse_or_answer_preflight():
        origin = _cross_origin()
        if origin is None:
            return None
        if not origin_allowed(origin, patterns):
            raise Forbidden(f"origin {origin} is not allowed to call this gateway; an admin "
                            "can add it to cors_origins")
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response = app.response_class(status=204)
            response.headers["Access-Control-Allow-Methods"] = METHODS
            response.headers["Access-Control-Allow-Headers"] = request.headers.get(
                "Access-Control-Request-Headers", "Authorization, Content-Type")
            response.headers["Access-Control-Max-Age"] = "43200"
            return response
        return None

    @app.after_request
    def _allow_origin(response):
        origin = _cross_origin()
        if origin is not None and origin_allowed(origin, patterns):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED
            response.headers.add("Vary", "Origin")
        return response
