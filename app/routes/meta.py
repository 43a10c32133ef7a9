"""What clients, load balancers and Prometheus probe: `/`, `/health`, `/metrics`; and the
icon browsers ask every site for (`/favicon.ico`)."""
import datetime
import functools
import importlib.metadata
from pathlib import Path

from flask import Blueprint, Response, current_app, jsonify, request, send_from_directory

from app import metrics
from app.proxy import auth, gateway

bp = Blueprint("meta", __name__)


@bp.route("/", methods=["GET", "HEAD"])
def root():
    """Ollama's `Ollama is running`; ollama-api-service's service info to JSON clients.

    Open WebUI and other tools probe `/` to detect an Ollama server, and curl and
    python-requests send `Accept: */*`: they get Ollama's text. Only a client that
    prefers JSON to text (`Accept: application/json`) gets the JSON.
    """
    accept = request.accept_mimetypes
    if accept.quality("application/json") > accept.quality("text/plain"):
        response = jsonify(service_info())
    else:
        response = Response("Ollama is running", mimetype="text/plain")
    response.vary.add("Accept")  # caches must not hand one client's form to the other
    return response


@bp.get("/favicon.ico")
def favicon():
    """The dashboard's and docs' tab icon (an SVG, which browsers take at this name too)."""
    return send_from_directory(Path(__file__).resolve().parent.parent / "static",
                               "favicon.svg", mimetype="image/svg+xml", max_age=86400)


@functools.cache
def service_info():
    try:
        version = importlib.metadata.version("ollama-gw")
    except importlib.metadata.PackageNotFoundError:  # run from a tree that is not installed
        version = "unknown"
    return {"service": "ollama-gw", "version": version, "status": "running",
            "documentation": "/docs", "health": "/health", "openapi": "/openapi.json",
            "redoc": "/redoc"}


@bp.route("/health", methods=["GET", "HEAD"])
def health():
    """Liveness plus the state of the database and Ollama; 503 when the database cannot write.

    With `?apikey=` (go-ollama-api's health check) it checks that key instead and answers
    that service's shape; a bad key is a 401 like anywhere else.
    """
    if "apikey" in request.args:
        gateway.current_key()
        return jsonify({"status": "API is healthy", "timestamp": datetime.datetime.now(
            datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
    ok, problem = current_app.extensions["database_health"].state()
    upstreams = current_app.extensions["upstreams"].health()
    states = {state for _, state in upstreams}
    # One word for Ollama, as ollama-api-service answered: every upstream's, if they agree.
    backend = states.pop() if len(states) == 1 else "degraded"
    body = {
        "status": ("healthy" if backend == "healthy" else "degraded") if ok else "unhealthy",
        "database": "ok" if ok else "unavailable",
        "ollama_backend": backend,
        "upstreams": [{"name": name, "status": state} for name, state in upstreams],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    if problem:
        body["database_problem"] = problem
    return jsonify(body), 200 if ok else 503


@bp.get("/metrics")
def prometheus_metrics():
    """Prometheus text format, summed over every worker; an admin key unless metrics_public."""
    if not current_app.config["SETTINGS"].metrics_public:
        auth.require_admin(gateway.current_key(), "/metrics")
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)
