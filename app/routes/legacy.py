"""go-ollama-api's own route, so its clients keep working unchanged: `POST /generate`.

It is Ollama's `/api/generate` with the key in the body (`apikey`) or a header, and
goes through exactly the same checks, limits, accounting and relay. Unlike its
predecessor, every Ollama field (options, system, format, keep_alive, …) reaches Ollama.
"""
from flask import Blueprint

from app.accounting import request_record
from app.routes.native import relay_json

bp = Blueprint("legacy", __name__)


@bp.post("/generate")
def generate():
    return relay_json("/api/generate", request_record.begin("/api/generate"))
