"""ollama-gw: an authenticating, rate-limiting gateway in front of Ollama."""


def create_app(settings=None):
    """Build the WSGI app: settings -> logging -> database -> errors -> services -> routes."""
    # Imported here, not at module level: gunicorn's master imports app.serving.gunicorn_conf, and
    # requests/ssl must not be loaded before gevent patches the worker after fork.
    from flask import Flask

    from app import errors, routes
    from app.accounting import request_record
    from app.admission import fair_queue, ratelimit
    from app.config import load_settings
    from app.proxy import auth, cors, request_body
    from app.redact import configure_logging
    from app.store import db, health
    from app.upstreams import pool as upstreams
    from app.webhooks import delivery as webhook_delivery

    settings = settings or load_settings()
    app = Flask(__name__, static_folder=None)
    # `/api//pull` must reach the relay's path check, not a redirect to `/api/pull`.
    app.url_map.merge_slashes = False
    app.config["SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    configure_logging(settings.log_level)

    db.init_app(app)
    errors.init_app(app, on_database_error=db.forget_idle_connections)
    cors.init_app(app)
    auth.init_app(app)
    ratelimit.init_app(app)
    fair_queue.init_app(app)
    request_body.init_app(app)
    request_record.init_app(app)
    upstreams.init_app(app)
    health.init_app(app)
    webhook_delivery.init_app(app)
    routes.init_app(app)
    return app
