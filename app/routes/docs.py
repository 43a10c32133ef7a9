"""The API's own documentation: `/openapi.json`, Swagger UI at `/docs`, ReDoc at `/redoc`.

The viewers are vendored into the package (app/static/docs/VENDORED.md) and pages load
nothing from elsewhere: gateways often run where there is no internet. No key is
needed: the document describes the API and holds nothing secret.
"""
from pathlib import Path

from flask import Blueprint, jsonify, redirect, request, send_from_directory

from app.errors import NotFound
from app.routes import openapi

bp = Blueprint("docs", __name__)
ASSETS = Path(__file__).resolve().parent.parent / "static" / "docs"
SERVED = {"swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "swagger-init.js",
          "redoc-init.js"}


@bp.get("/openapi.json")
def spec():
    return jsonify(openapi.document())


@bp.get("/docs")
def swagger():
    return send_from_directory(ASSETS, "swagger.html", max_age=300)


@bp.get("/redoc")
def redoc():
    return send_from_directory(ASSETS, "redoc.html", max_age=300)


@bp.get("/docs/")
@bp.get("/redoc/")
def without_slash():
    """The pages' asset links are relative to `/docs`: `/docs/` would resolve them wrongly."""
    return redirect(request.path.rstrip("/"), 301)


@bp.get("/docs/assets/<name>")
def asset(name):
    if name not in SERVED:
        raise NotFound(f"/docs/assets/{name} is not a documentation asset")
    return send_from_directory(ASSETS, name, max_age=86400)
