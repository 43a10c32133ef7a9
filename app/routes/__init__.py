"""Blueprints by API family, registered in one place."""
from app.routes import admin, docs, legacy, meta, native, openai, stats, ui
from app.store.ids import IdConverter


def init_app(app):
    app.url_map.converters["id"] = IdConverter  # `<id:…>`: ASCII digits in range, else 404
    app.register_blueprint(meta.bp)
    app.register_blueprint(docs.bp)
    app.register_blueprint(stats.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(ui.bp)
    app.register_blueprint(native.bp)
    app.register_blueprint(openai.bp)
    app.register_blueprint(legacy.bp)
