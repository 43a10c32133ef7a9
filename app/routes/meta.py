"""What clients and load balancers probe without a key: `/` and `/health`."""
import datetime

import peewee
from flask import Blueprint, Response, current_app, jsonify

from app.db import db

bp = Blueprint("meta", __name__)


@bp.route("/", methods=["GET", "HEAD"])
def root():
    # Ollama's own answer: Open WebUI and other tools probe it to detect a server.
    return Response("Ollama is running", mimetype="text/plain")


@bp.route("/health", methods=["GET", "HEAD"])
def health():
    """Liveness plus the state of the database and Ollama; 503 when the database is down."""
    try:
        db.execute_sql("SELECT 1")
        database = "ok"
    except peewee.DatabaseError:
        database = "unavailable"
    backend = current_app.extensions["upstream"].health()
    ok = database == "ok"
    body = {
        "status": ("healthy" if backend == "healthy" else "degraded") if ok else "unhealthy",
        "database": database,
        "ollama_backend": backend,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    return jsonify(body), 200 if ok else 503
