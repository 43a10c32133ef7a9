"""The web dashboard at /ui/: usage to look at, keys to manage; off unless `ui = true`.

Pages are rendered here from templates and change things only through plain form
posts, each checked for this session's CSRF token and refused when it comes from
another site. Keys are changed by app/keys/registry.py, as the CLI and the admin API change
them, so the audit log and webhooks see one kind of change whatever made it. The only
scripts are the package's own files (charts, the copy button, local times): the
Content-Security-Policy allows nothing inline.
"""
import datetime
from pathlib import Path

from flask import (
    Blueprint,
    current_app,
    flash,
    g,
    make_response,
    redirect,
    render_template,
    request,
    send_from_directory,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface

from app.accounting import gpu, histogram, stats
from app.errors import (
    Forbidden,
    GatewayError,
    NotFound,
    RateLimited,
    Unauthorized,
    error_response,
)
from app.keys import registry as keystore
from app.keys.registry import KeyInfo
from app.proxy import auth
from app.proxy.request_body import read_form
from app.store import audit
from app.store.client_address import client_address
from app.store.models import ApiKey
from app.ui import charts, status, throttle
from app.ui.session import COOKIE, Sessions, cookie_secret, cross_site, csrf_ok
from app.webhooks import delivery as webhook_delivery
from app.webhooks import outbox as hooks

bp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="../templates")
ASSETS = Path(__file__).resolve().parent.parent / "static" / "ui"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
OPEN = {"ui.signin", "ui.asset"}  # the pages reached without a session
KEY_FIELDS = ("role", "rate_limit", "max_concurrent", "token_quota", "gpu_quota", "max_ctx",
              "max_predict", "keep_alive", "cloud", "priority", "models", "expires")


class _FlashSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie session, opened under /ui/ only: elsewhere it would cost every
    relayed request a signer (some 40 µs) for nothing."""

    def open_session(self, app, request):
        if not request.path.startswith(bp.url_prefix + "/"):
            return None  # Flask makes a null session, never saved
        return super().open_session(app, request)


@bp.record_once
def _flash_messages(state):
    """Flask's session, for flash messages only: what a page says after a form post.

    Not a query parameter, which anyone could fill with a message of their own and send
    an admin a link to. Signed with the dashboard's secret, kept to /ui/.
    """
    conf = state.app.config["SETTINGS"]
    if conf.ui:
        state.app.secret_key = cookie_secret(conf)
        state.app.session_interface = _FlashSessions()
        state.app.config.update(SESSION_COOKIE_NAME="ollama_gw_flash",
                                SESSION_COOKIE_PATH="/ui/", SESSION_COOKIE_HTTPONLY=True,
                                SESSION_COOKIE_SAMESITE="Strict")


def _sessions():
    ext = current_app.extensions
    if "ui_sessions" not in ext:
        conf = current_app.config["SETTINGS"]
        ext["ui_sessions"] = Sessions(cookie_secret(conf), conf.ui_session_hours)
    return ext["ui_sessions"]


@bp.before_request
def _signed_in():
    """404 when the dashboard is off; else the session's key, or a way to sign in."""
    if not current_app.config["SETTINGS"].ui:
        raise NotFound("the web dashboard is off: set ui = true (OLLAMA_GW_UI=true) to serve it")
    if request.endpoint == "ui.asset":
        return None
    if request.method == "POST" and cross_site():
        raise Forbidden("a form posted from another site is refused")
    if request.method == "POST":
        read_form()
    found = _sessions().read(request.cookies.get(COOKIE))
    if found is None:
        if request.endpoint in OPEN:
            return None
        response = redirect(url_for("ui.signin"))
        if COOKIE in request.cookies:
            _forget_cookie(response)
        return response
    row, g.csrf = found
    g.key = KeyInfo.from_row(row)
    if request.method == "POST" and not csrf_ok(g.csrf):
        raise Forbidden("the form's CSRF token is missing or stale: reload the page and retry")
    return None


@bp.after_request
def _headers(response):
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    # same-origin, not no-referrer: with no-referrer Chrome sends `Origin: null` on form posts.
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "ui.asset":
        response.headers["Cache-Control"] = "no-store"  # pages hold usage, some a secret
    return response


@bp.errorhandler(GatewayError)
def _error(exc):
    if not current_app.config["SETTINGS"].ui:  # off: /ui/ is like any unknown path
        return error_response(exc.status, exc.message, exc.kind, exc.headers)
    response = make_response(render_template("ui/error.html", message=exc.message),
                             exc.status)
    response.headers.update(exc.headers)
    return response


def _admin():
    auth.require_admin(g.key, request.path)


def _dashboard_actor():
    """Audit entries made from the dashboard say so (via `ui`), with the signed-in key."""
    return audit.Actor(f"{g.key.prefix} ({g.key.name})", "ui", client_address())


@bp.app_template_filter("iso")
def _iso(value):
    """A time as ISO 8601 UTC, for <time datetime=…>: the browser shows it in its own zone."""
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        value = datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
    elif value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


@bp.app_template_filter("thousands")
def _thousands(value):
    """12,345,678: big counts people can read at a glance."""
    return "-" if value is None else f"{value:,}"


@bp.app_template_filter("gpu_time")
def _gpu_time(value):
    return gpu.shown(value or 0.0)


@bp.app_template_filter("percentile")
def _percentile(row, field, unit=False):
    """A row's percentile as the CLI prints it: 252, < 1 ms, > 10 min, ≈375 (approximate)."""
    return histogram.shown(row, field, unit)


@bp.get("/assets/<path:name>")
def asset(name):
    if name not in _asset_names():
        raise NotFound(f"/ui/assets/{name} is not a dashboard asset")
    return send_from_directory(ASSETS, name, max_age=3600)


def _asset_names():
    ext = current_app.extensions
    if "ui_assets" not in ext:
        ext["ui_assets"] = {str(p.relative_to(ASSETS)) for p in ASSETS.rglob("*")
                            if p.is_file() and p.suffix in (".js", ".css")}
    return ext["ui_assets"]


@bp.route("/signin", methods=["GET", "POST"])
def signin():
    if g.get("key") is not None:
        return redirect(url_for("ui.index"))
    if request.method == "GET":
        return render_template("ui/signin.html")
    sessions = _sessions()
    try:  # the key first: a valid one always signs in, whatever failed before it
        info = auth.authenticate(current_app.extensions["key_cache"],
                                 request.form.get("key", "").strip())
    except Unauthorized as exc:
        wait = throttle.failed(client_address())
        if wait:
            raise RateLimited(f"too many failed sign-ins from this address: wait {wait} s",
                              headers={"Retry-After": str(wait)}) from None
        return render_template("ui/signin.html", error=exc.message), 401
    response = redirect(url_for("ui.index"))
    response.set_cookie(COOKIE, sessions.issue(ApiKey.get_by_id(info.id)),
                        max_age=sessions.max_age, path="/ui/", httponly=True,
                        secure=request.is_secure, samesite="Strict")
    return response


@bp.post("/signout")
def signout():
    _sessions().end(request.cookies.get(COOKIE))
    return _forget_cookie(redirect(url_for("ui.signin")))


def _forget_cookie(response):
    response.delete_cookie(COOKIE, path="/ui/", httponly=True, secure=request.is_secure,
                           samesite="Strict")
    return response


def _range():
    return charts.range_name(request.args.get("range"))


@bp.get("/")
def index():
    if not g.key.is_admin:
        return redirect(url_for("ui.key", key_id=g.key.id))
    span = _range()
    conf = current_app.config["SETTINGS"]
    return render_template("ui/overview.html", range=span, data=charts.series(span),
                           upstreams=status.upstreams(conf), by_key=charts.by_key(span, limit=20),
                           gpu_by_upstream=charts.by_upstream(span),
                           streams=status.streams_in_flight(), cloud=stats.cloud_usage())


@bp.get("/keys")
def keys():
    _admin()
    return render_template("ui/keys.html", keys=[keystore.key_summary(row) for row in
                                                 keystore.list_keys()])


def _key_values():
    """The key settings a form filled in (empty fields leave a setting as it is)."""
    values = {name: request.form.get(name, "").strip() for name in KEY_FIELDS}
    return {name: value for name, value in values.items() if value}


@bp.post("/keys")
def create_key():
    _admin()
    conf = current_app.config["SETTINGS"]
    defaults = {"user": conf.default_rate_limit_user, "admin": conf.default_rate_limit_admin}
    values = _key_values()
    try:
        with audit.acting_as(_dashboard_actor()):
            row, secret = keystore.create_key(request.form.get("name"),
                                              values.pop("role", "user"),
                                              default_rate_limits=defaults, **values)
    except keystore.KeyOpError as exc:
        return render_template("ui/keys.html", error=str(exc), form=request.form, keys=[
            keystore.key_summary(r) for r in keystore.list_keys()]), 400
    return render_template("ui/secret.html", key=keystore.key_summary(row), secret=secret,
                           what="created"), 201


def _row(key_id):
    row = ApiKey.get_or_none(ApiKey.id == key_id)
    if row is None:
        raise NotFound(f"no key with id {key_id}")
    return row


@bp.get("/keys/<id:key_id>")
def key(key_id):
    if not g.key.is_admin and key_id != g.key.id:
        raise Forbidden("a user key sees only its own page")
    return _key_page(_row(key_id))


def _key_page(row, error=None, code=200):
    span = _range()
    info = KeyInfo.from_row(row)
    return render_template(
        "ui/key.html", key=keystore.key_summary(row), range=span, error=error,
        data=charts.series(span, row.id),
        limits=status.limits(info, current_app.extensions["limiter"]),
        recent=status.recent_requests(row.id, answered_only=True),
        refusals=status.recent_requests(row.id, refused_only=True, limit=20),
        cloud=stats.cloud_usage(row.id)), code


@bp.post("/keys/<id:key_id>")
def update_key(key_id):
    _admin()
    row = _row(key_id)
    values = _key_values()
    name = request.form.get("name", "").strip() or None
    try:
        with audit.acting_as(_dashboard_actor()):
            keystore.update_key(row.id, name=name, **values)
    except keystore.KeyOpError as exc:
        return _key_page(row, str(exc), 400)
    return redirect(url_for("ui.key", key_id=row.id))


@bp.route("/keys/<id:key_id>/<any(revoke, rotate):action>", methods=["GET", "POST"])
def confirm_key(key_id, action):
    """Revoke or rotate: a page that asks first, then the change itself on its form post."""
    _admin()
    row = _row(key_id)
    if request.method == "GET":
        return render_template("ui/confirm.html", key=keystore.key_summary(row), action=action)
    try:
        with audit.acting_as(_dashboard_actor()):
            if action == "revoke":
                keystore.revoke_key(row.id)
                return redirect(url_for("ui.key", key_id=row.id))
            rotated, secret = keystore.rotate_key(row.id)
    except keystore.KeyOpError as exc:
        return _key_page(row, str(exc), 400)
    return render_template("ui/secret.html", key=keystore.key_summary(rotated), secret=secret,
                           what="rotated")


@bp.get("/webhooks")
def webhooks():
    _admin()
    counts = hooks.delivery_counts()
    return render_template(
        "ui/webhooks.html",
        webhooks=[hooks.webhook_summary(row, counts.get(row.id)) for row in
                  hooks.list_webhooks()],
        deliveries=status.deliveries(request.args.get("state") or None))


@bp.post("/webhooks/<id:webhook_id>/test")
def test_webhook(webhook_id):
    _admin()
    try:
        outcome = status.send_test(current_app.config["SETTINGS"], webhook_id)
    except hooks.WebhookOpError as exc:
        raise NotFound(str(exc)) from None
    flash(f"webhook {webhook_id} test {outcome.describe()}")
    return redirect(url_for("ui.webhooks"))


@bp.post("/webhooks/deliveries/<id:delivery_id>/retry")
def retry_delivery(delivery_id):
    _admin()
    try:
        webhook_delivery.retry_delivery(delivery_id)
    except hooks.WebhookOpError as exc:
        raise NotFound(str(exc)) from None
    flash(f"delivery {delivery_id} will be sent again")
    return redirect(url_for("ui.webhooks"))


@bp.get("/audit")
def audit_log():
    _admin()
    action = request.args.get("action") or None
    entries = [{**e, "changes": audit.change_text(e["details"])}
               for e in audit.entries(None, action, 200)]
    return render_template("ui/audit.html", entries=entries,
                           action=action or "", actions=audit.ACTIONS)
