"""The web dashboard through Flask's test client: sign-in, who may see and do what, CSRF,
cross-site posts, sessions that end with their key, and no secret where it must not be.
"""
import dataclasses
import hashlib
import json
import logging
import re
import time

import itsdangerous
import pytest

from app import create_app
from app.keys import registry as keystore
from app.limits import quota_period
from app.store.models import (
    ApiKey,
    AuditEntry,
    QuotaReservation,
    SigninFailure,
    TokenUsage,
    UiSession,
    WebhookDelivery,
)
from app.ui import session as ui_session
from app.ui import throttle
from app.webhooks import outbox as hooks
from tests.conftest import auth_header

GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}
ADMIN_PAGES = ("/ui/keys", "/ui/webhooks", "/ui/audit")


@pytest.fixture
def ui_app(settings, migrated):
    app = create_app(dataclasses.replace(settings, ui=True))
    app.config["TESTING"] = True
    return app


@pytest.fixture
def browser(ui_app):
    """A test client that signs in as a browser would: form posts from the same origin."""
    client = ui_app.test_client()
    client.environ_base["HTTP_SEC_FETCH_SITE"] = "same-origin"
    return client


def sign_in(client, secret):
    answer = client.post("/ui/signin", data={"key": secret})
    assert answer.status_code == 302, answer.data
    return answer


def csrf(client, path="/ui/keys"):
    html = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


@pytest.fixture
def admin(make_key):
    return make_key("ops", role="admin")


@pytest.fixture
def user(make_key):
    return make_key("alice", role="user")


def test_the_dashboard_is_off_unless_configured(client, admin):
    assert client.get("/ui/").status_code == 404
    assert client.post("/ui/signin", data={"key": admin[0]}).status_code == 404
    assert "ui = true" in client.get("/ui/signin").get_json()["error"]


def test_signing_in_sets_a_strict_http_only_cookie_that_does_not_hold_the_key(browser, admin):
    assert browser.get("/ui/").headers["Location"] == "/ui/signin"
    cookie = sign_in(browser, admin[0]).headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui/" in cookie
    assert "Max-Age=43200" in cookie and "Secure" not in cookie  # plain HTTP here
    assert admin[0] not in cookie and admin[1].key_hash not in cookie
    assert browser.get("/ui/").status_code == 200


def test_the_cookie_is_secure_over_tls(browser, admin):
    answer = browser.post("/ui/signin", data={"key": admin[0]}, base_url="https://gw.example")
    assert "Secure" in answer.headers["Set-Cookie"]


def test_a_key_in_the_url_signs_nobody_in(browser, admin):
    answer = browser.get(f"/ui/signin?key={admin[0]}")
    assert answer.status_code == 200 and "Set-Cookie" not in answer.headers
    assert browser.get("/ui/").status_code == 302


def test_wrong_keys_are_refused_and_repeated_failures_must_wait(browser, admin):
    for _ in range(throttle.FAILURES_ALLOWED):
        answer = browser.post("/ui/signin", data={"key": "ogw_" + "x" * 43})
        assert answer.status_code == 401 and "invalid API key" in answer.get_data(as_text=True)
    answer = browser.post("/ui/signin", data={"key": "ogw_" + "x" * 43})
    assert answer.status_code == 429 and 1 <= int(answer.headers["Retry-After"]) <= 60
    assert SigninFailure.select().count() == throttle.FAILURES_ALLOWED  # not the refused one
    sign_in(browser, admin[0])  # the right key is never throttled


def test_failures_older_than_the_window_no_longer_count(migrated):
    start = 1_000_000.0
    for n in range(throttle.FAILURES_ALLOWED):
        assert throttle.failed("192.0.2.1", now=start + n) == 0
    assert throttle.failed("192.0.2.1", now=start + 30) == 30  # the first leaves at start+60
    assert throttle.failed("192.0.2.2", now=start + 30) == 0  # another address
    assert throttle.failed("192.0.2.1", now=start + throttle.WINDOW_SECONDS + 0.5) == 0


@pytest.mark.parametrize("path", ["/ui/", "/ui/?range=1h", "/ui/?range=7d", "/ui/?range=30d",
                                  "/ui/keys", "/ui/keys/1", "/ui/webhooks",
                                  "/ui/webhooks?state=failed", "/ui/audit",
                                  "/ui/audit?action=key", "/ui/keys/1/rotate"])
def test_pages_allow_no_inline_script(browser, admin, path):
    sign_in(browser, admin[0])
    answer = browser.get(path)
    assert answer.status_code == 200
    policy = answer.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert answer.headers["Cache-Control"] == "no-store"
    html = answer.get_data(as_text=True)
    for tag in re.findall(r"<script[^>]*>", html):
        assert "src=" in tag or 'type="application/json"' in tag, tag
    assert " on" not in " ".join(re.findall(r"<[^>]+>", html)).replace(" one", "")


def test_a_quota_keys_page_shows_its_tokens_used_reserved_and_left(browser, admin, make_key):
    _, row = make_key("metered", token_quota="100/day")
    now = time.time()
    start, _ = quota_period("day", now)
    TokenUsage.create(key_id=row.id, period_start=start, tokens=30)
    for key_id, tokens in ((row.id, 25), (admin[1].id, 40)):  # its own, and another key's
        QuotaReservation.create(key_id=key_id, period_start=start, tokens=tokens,
                                holder="host:1", expires_at=now + 60)
    sign_in(browser, admin[0])
    page = browser.get(f"/ui/keys/{row.id}").get_data(as_text=True)
    assert ('<td>30 <span class="quota-reserved">+ 25 reserved, 45 left</span></td>'
            '<td>100</td>') in page


def test_assets_are_served_from_the_package(browser):
    for name in ("ui.js", "ui.css", "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css"):
        assert browser.get(f"/ui/assets/{name}").status_code == 200
    assert browser.get("/ui/assets/../routes/ui.py").status_code == 404
    assert browser.get("/ui/assets/VENDORED.md").status_code == 404


def test_a_user_key_sees_its_own_page_and_nothing_else(browser, admin, user):
    sign_in(browser, user[0])
    assert browser.get("/ui/").headers["Location"] == f"/ui/keys/{user[1].id}"
    page = browser.get(f"/ui/keys/{user[1].id}").get_data(as_text=True)
    assert "requests this window" in page and 'id="edit-key"' not in page
    assert browser.get(f"/ui/keys/{admin[1].id}").status_code == 403
    for path in ADMIN_PAGES + (f"/ui/keys/{user[1].id}/revoke",):
        assert browser.get(path).status_code == 403, path


def test_a_user_key_cannot_change_anything(browser, admin, user):
    sign_in(browser, user[0])
    token = csrf(browser, f"/ui/keys/{user[1].id}")
    own, other = user[1].id, admin[1].id
    for path, form in [("/ui/keys", {"name": "mine", "role": "admin"}),
                       (f"/ui/keys/{own}", {"rate_limit": "1000000/second"}),
                       (f"/ui/keys/{own}", {"role": "admin"}),
                       (f"/ui/keys/{other}/revoke", {}), (f"/ui/keys/{other}/rotate", {}),
                       (f"/ui/keys/{own}/rotate", {}), ("/ui/webhooks/1/test", {}),
                       ("/ui/webhooks/deliveries/1/retry", {})]:
        assert browser.post(path, data={"csrf": token, **form}).status_code == 403, path
    assert ApiKey.select().count() == 2
    assert ApiKey.get_by_id(own).role == "user" and ApiKey.get_by_id(other).revoked_at is None


@pytest.mark.parametrize("headers", [{"Origin": "https://evil.example"},
                                     {"Sec-Fetch-Site": "cross-site"},
                                     {"Sec-Fetch-Site": "same-site"},
                                     {"Origin": "null"}])
def test_a_cross_site_form_post_is_refused(ui_app, browser, admin, user, headers):
    sign_in(browser, admin[0])
    token = csrf(browser)
    cross = ui_app.test_client()
    cross.set_cookie(ui_session.COOKIE, browser.get_cookie(ui_session.COOKIE, path="/ui/").value,
                     path="/ui/")
    answer = cross.post(f"/ui/keys/{user[1].id}/revoke", data={"csrf": token}, headers=headers)
    assert answer.status_code == 403
    assert ApiKey.get_by_id(user[1].id).revoked_at is None


def test_a_post_without_the_session_csrf_token_is_refused(browser, admin, user):
    sign_in(browser, admin[0])
    for form in ({}, {"csrf": "guess"}):
        answer = browser.post(f"/ui/keys/{user[1].id}/revoke", data=form)
        assert answer.status_code == 403 and "CSRF" in answer.get_data(as_text=True)
    assert ApiKey.get_by_id(user[1].id).revoked_at is None


@pytest.mark.parametrize("change", ["revoke", "rotate", "expire"])
def test_a_session_ends_with_its_key(browser, user, change):
    sign_in(browser, user[0])
    assert browser.get(f"/ui/keys/{user[1].id}").status_code == 200
    if change == "revoke":
        keystore.revoke_key(user[1].id)
    elif change == "rotate":
        keystore.rotate_key(user[1].id)
    else:
        ApiKey.update(expires_at=ApiKey.created_at).where(ApiKey.id == user[1].id).execute()
    answer = browser.get(f"/ui/keys/{user[1].id}")
    assert answer.status_code == 302 and answer.headers["Location"] == "/ui/signin"
    assert "ogw_ui=;" in answer.headers["Set-Cookie"]  # the stale cookie is removed


def test_a_session_expires(browser, user, monkeypatch):
    sign_in(browser, user[0])
    later = int(time.time()) + 12 * 3600 + 5
    monkeypatch.setattr(itsdangerous.TimestampSigner, "get_timestamp", lambda self: later)
    assert browser.get("/ui/").headers["Location"] == "/ui/signin"


def test_signing_out_ends_the_session(browser, admin):
    sign_in(browser, admin[0])
    cookie = browser.get_cookie(ui_session.COOKIE, path="/ui/").value
    answer = browser.post("/ui/signout", data={"csrf": csrf(browser)})
    assert answer.headers["Location"] == "/ui/signin"
    assert browser.get("/ui/keys").headers["Location"] == "/ui/signin"
    browser.set_cookie(ui_session.COOKIE, cookie, path="/ui/")  # the same cookie, replayed
    assert browser.get("/ui/keys").headers["Location"] == "/ui/signin"
    assert UiSession.select().count() == 0


def test_the_session_id_is_kept_only_as_a_hash(ui_app, browser, admin):
    sign_in(browser, admin[0])
    cookie = browser.get_cookie(ui_session.COOKIE, path="/ui/").value
    session_id = ui_app.extensions["ui_sessions"]._signer.loads(cookie)["s"]
    assert [row.id for row in UiSession.select()] == [
        hashlib.sha256(session_id.encode()).hexdigest()]


def test_a_cookie_without_a_server_session_is_refused(ui_app, browser, admin):
    """A cookie of the previous version (no session id) or one whose row is gone."""
    sign_in(browser, admin[0])
    UiSession.delete().execute()  # ended by another instance
    assert browser.get("/ui/keys").headers["Location"] == "/ui/signin"
    signer = ui_app.extensions["ui_sessions"]
    old = signer._signer.dumps({"k": admin[1].id, "t": signer._tag(admin[1].key_hash),
                                "c": "token"})
    browser.set_cookie(ui_session.COOKIE, old, path="/ui/")
    assert browser.get("/ui/keys").headers["Location"] == "/ui/signin"


def test_an_admin_manages_keys_as_the_cli_does(browser, client, admin):
    sign_in(browser, admin[0])
    token = csrf(browser)
    created = browser.post("/ui/keys", data={
        "csrf": token, "name": "ci", "role": "user", "rate_limit": "60/minute",
        "token_quota": "1000/day", "models": "llama3.2", "expires": "30d",
        "max_concurrent": "2"})
    assert created.status_code == 201
    secret = re.search(r'id="secret">(ogw_[A-Za-z0-9_-]{43})<', created.get_data(as_text=True))[1]
    row = ApiKey.get(ApiKey.name == "ci")
    summary = keystore.key_summary(row)
    assert (summary["rate_limit"], summary["token_quota"], summary["models"],
            summary["max_concurrent"]) == ("60/minute", "1000/day", ["llama3.2:latest"], 2)
    assert summary["expires_at"] is not None
    # With no answer cap a quota key's answer may use all that is left of its quota (and
    # the fake Ollama does): a cap leaves some for the requests after it.
    capped = {**GENERATE, "options": {"num_predict": 5}}
    assert client.post("/api/generate", json=capped, headers=auth_header(secret),
                       buffered=True).status_code == 200

    edited = browser.post(f"/ui/keys/{row.id}", data={"csrf": token, "rate_limit": "500/hour",
                                                      "expires": "never", "name": "ci-2",
                                                      "priority": "3"})
    assert edited.status_code == 302
    row = ApiKey.get_by_id(row.id)
    assert (row.name, row.rate_limit, row.rate_period, row.expires_at, row.priority) == (
        "ci-2", 500, 3600, None, 3)
    bad = browser.post(f"/ui/keys/{row.id}", data={"csrf": token, "rate_limit": "lots"})
    assert bad.status_code == 400 and "form-error" in bad.get_data(as_text=True)

    confirm = browser.get(f"/ui/keys/{row.id}/rotate").get_data(as_text=True)
    assert "Rotate the key" in confirm and ApiKey.get_by_id(row.id).key_hash == row.key_hash
    rotated = browser.post(f"/ui/keys/{row.id}/rotate", data={"csrf": token})
    new_secret = re.search(r'id="secret">(ogw_[A-Za-z0-9_-]{43})<',
                           rotated.get_data(as_text=True))[1]
    client.application.extensions["key_cache"].clear()  # rather than wait its second out
    assert client.post("/api/generate", json=capped,
                       headers=auth_header(secret)).status_code == 401
    assert client.post("/api/generate", json=capped, headers=auth_header(new_secret),
                       buffered=True).status_code == 200

    assert browser.post(f"/ui/keys/{row.id}/revoke", data={"csrf": token}).status_code == 302
    assert ApiKey.get_by_id(row.id).revoked_at is not None
    entries = list(AuditEntry.select().where(AuditEntry.via == "ui").order_by(AuditEntry.id))
    assert [e.action for e in entries] == ["key.created", "key.updated", "key.rotated",
                                           "key.revoked"]
    assert all(e.actor == f"{admin[1].prefix} (ops)" for e in entries)


def test_a_live_keys_name_is_a_form_error_on_create_and_on_rename(browser, admin, user):
    sign_in(browser, admin[0])
    token = csrf(browser)
    taken = (f"a key named &#39;alice&#39; already exists (key {user[1].id}, {user[1].prefix}): "
             "choose another name, or revoke that key first")
    refused = browser.post("/ui/keys", data={"csrf": token, "name": "alice"})
    html = refused.get_data(as_text=True)
    assert refused.status_code == 400 and f'id="form-error">{taken}</p>' in html
    assert 'value="alice"' in html  # the form keeps what was typed
    renamed = browser.post(f"/ui/keys/{admin[1].id}", data={"csrf": token, "name": "alice"})
    assert renamed.status_code == 400
    assert f'id="form-error">{taken}</p>' in renamed.get_data(as_text=True)
    assert [k.name for k in ApiKey.select().order_by(ApiKey.id)] == ["ops", "alice"]


def test_the_audit_page_shows_changes_as_the_cli_prints_them(browser, admin, user, runner):
    keystore.update_key(user[1].id, rate_limit="60/minute", role="admin")
    changes = "rate_limit: 1000/minute -> 60/minute; role: user -> admin"
    assert changes in runner("audit").output
    sign_in(browser, admin[0])
    html = browser.get("/ui/audit?action=key.updated").get_data(as_text=True)
    assert f"<td>{changes.replace('>', '&gt;')}</td>" in html
    assert "&#34;" not in html and '{"' not in html  # no raw JSON


def test_a_new_key_secret_appears_only_on_its_creation_page(browser, admin, caplog):
    caplog.set_level(logging.DEBUG)
    sign_in(browser, admin[0])
    created = browser.post("/ui/keys", data={"csrf": csrf(browser), "name": "once"})
    secret = re.search(r'id="secret">(ogw_[A-Za-z0-9_-]{43})<', created.get_data(as_text=True))[1]
    assert "Location" not in created.headers
    row = ApiKey.get(ApiKey.name == "once")
    for path in ("/ui/", "/ui/keys", f"/ui/keys/{row.id}", "/ui/audit", "/ui/webhooks",
                 f"/ui/keys/{row.id}/rotate"):
        answer = browser.get(path)
        assert secret not in answer.get_data(as_text=True), path
        assert admin[0] not in answer.get_data(as_text=True), path
        assert secret not in str(answer.headers)
    assert secret not in caplog.text and admin[0] not in caplog.text


def test_the_overview_and_a_key_page_show_usage(ui_app, browser, client, admin, user):
    for secret, status in ((admin[0], 200), (user[0], 200), ("ogw_" + "y" * 43, 401)):
        answer = client.post("/api/generate", json=GENERATE, headers=auth_header(secret))
        answer.get_data()
        answer.close()  # the usage record is taken when the server closes the answer
        assert answer.status_code == status
    assert client.application.extensions["usage"].write_pending()
    sign_in(browser, admin[0])
    for span in ("1h", "24h", "30d"):
        page = browser.get(f"/ui/?range={span}").get_data(as_text=True)
        data = re.search(r'id="chart-data">(.*?)</script>', page, re.S)[1]
        assert '"llama3.2:latest"' in data
        assert re.search(r'id="total-requests">3<', page), span
        assert "alice" in page and "healthy" in page
    key_page = browser.get(f"/ui/keys/{user[1].id}").get_data(as_text=True)
    assert re.search(r'id="total-requests">1<', key_page)
    assert "/api/generate" in key_page


def test_a_key_page_lists_each_request_once_answered_or_refused(browser, client, admin,
                                                                 make_key):
    secret, row = make_key("narrow", models="llama3.2")
    for model, status in (("llama3.2", 200), ("qwen2.5:0.5b", 403)):
        answer = client.post("/api/generate", json={**GENERATE, "model": model},
                             headers=auth_header(secret))
        answer.get_data()
        answer.close()  # the usage record is taken when the server closes the answer
        assert answer.status_code == status
    assert client.application.extensions["usage"].write_pending()
    sign_in(browser, admin[0])
    page = browser.get(f"/ui/keys/{row.id}").get_data(as_text=True)

    def rows(table):
        html = re.search(rf'<table id="{table}">(.*?)</table>', page, re.S)[1]
        return re.findall(r"<td>(\d{3})</td>", html)

    assert (rows("recent"), rows("refusals")) == (["200"], ["403"])


def test_a_users_page_lists_only_its_own_recent_requests_and_refusals(browser, client,
                                                                       make_key):
    alice, alice_row = make_key("alice", rate_limit="1/hour")
    bob, _ = make_key("bob", rate_limit="1/hour")
    for secret, model in ((alice, "llama3.2"), (bob, "qwen2.5:0.5b")):
        for status in (200, 429):  # the second is refused by the rate limit
            answer = client.post("/api/generate", headers=auth_header(secret),
                                 json={**GENERATE, "model": model})
            answer.get_data()
            answer.close()  # the usage record is taken when the server closes the answer
            assert answer.status_code == status
    assert client.application.extensions["usage"].write_pending()
    sign_in(browser, alice)
    page = browser.get(f"/ui/keys/{alice_row.id}").get_data(as_text=True)

    def rows(table):
        html = re.search(rf'<table id="{table}">(.*?)</table>', page, re.S)[1]
        return [re.findall(r"<td>([^<]*)</td>", row)
                for row in re.findall(r"<tr><td><time.*?</tr>", html, re.S)]

    # endpoint, model, status, refused, …: alice's answered one and her refusal apart
    # (each listed once); bob's never
    assert [row[:4] for row in rows("recent")] == [
        ["/api/generate", "llama3.2:latest", "200", ""]]
    assert [row[:4] for row in rows("refusals")] == [
        ["/api/generate", "llama3.2:latest", "429", "rate"]]
    assert "qwen" not in page


def test_webhooks_can_be_tested_and_failed_deliveries_retried(browser, admin):
    row, _ = hooks.add_webhook("http://127.0.0.1:9/hook")  # nothing listens on port 9
    sign_in(browser, admin[0])
    token = csrf(browser, "/ui/webhooks")
    answer = browser.post(f"/ui/webhooks/{row.id}/test", data={"csrf": token})
    assert answer.status_code == 302
    assert "failed" in browser.get(answer.headers["Location"]).get_data(as_text=True)
    delivery = WebhookDelivery.get(WebhookDelivery.webhook == row.id)
    assert delivery.state == "failed"
    failed_page = browser.get("/ui/webhooks?state=failed").get_data(as_text=True)
    assert f"/ui/webhooks/deliveries/{delivery.id}/retry" in failed_page
    assert browser.post(f"/ui/webhooks/deliveries/{delivery.id}/retry",
                        data={"csrf": token}).status_code == 302
    assert WebhookDelivery.get_by_id(delivery.id).state == "pending"
    again = browser.post(f"/ui/webhooks/deliveries/{delivery.id}/retry", data={"csrf": token})
    assert again.status_code == 404  # only a failed delivery is retried


def test_the_cookie_secret_is_made_once_and_kept_private(settings):
    first = ui_session.cookie_secret(settings)
    assert first == ui_session.cookie_secret(settings) and len(first) >= 48
    path = settings.resolved_data_dir / ui_session.SECRET_FILE
    assert path.stat().st_mode & 0o077 == 0
    assert ui_session.cookie_secret(dataclasses.replace(settings, ui_secret="set")) == "set"


@pytest.mark.parametrize("on", [True, False])
def test_check_says_whether_the_dashboard_is_on(runner, monkeypatch, on):
    monkeypatch.setenv("OLLAMA_GW_UI", str(on).lower())
    result = runner("check")
    assert ("web dashboard: on" if on else "web dashboard: off") in result.output


@pytest.mark.parametrize("answer", ["status", "banner"])
def test_a_webhook_test_shows_the_status_never_the_receivers_words(browser, admin, answer):
    from tests.webhook_receiver import WebhookReceiver

    with WebhookReceiver() as receiver:
        if answer == "status":
            receiver.status = 503  # its body: "receiver says no"
        else:
            receiver.raw_answer = b"SSH-2.0-OpenSSH_9.6 internal-secret-banner\r\n"
        row, _ = hooks.add_webhook(receiver.url)
        sign_in(browser, admin[0])
        answer_ = browser.post(f"/ui/webhooks/{row.id}/test",
                               data={"csrf": csrf(browser, "/ui/webhooks")})
        page = browser.get(answer_.headers["Location"]).get_data(as_text=True)
    assert re.search(rf'id="message">webhook {row.id} test failed: ', page)
    assert ("HTTP 503 in" in page and "Service Unavailable" in page if answer == "status"
            else "not HTTP" in page)
    for said in ("receiver says no", "SSH-2.0", "internal-secret-banner"):
        assert said not in page


def test_the_webhooks_page_shows_only_its_own_messages_once(browser, admin):
    row, _ = hooks.add_webhook("http://127.0.0.1:9/hook")  # nothing listens on port 9
    sign_in(browser, admin[0])
    forged = "Your session expired: sign in again at https://evil.example"
    page = browser.get("/ui/webhooks", query_string={"message": forged}).get_data(as_text=True)
    assert "evil.example" not in page and 'id="message"' not in page
    answer = browser.post(f"/ui/webhooks/{row.id}/test",
                          data={"csrf": csrf(browser, "/ui/webhooks")})
    assert answer.headers["Location"] == "/ui/webhooks"  # nothing in the URL
    shown = browser.get("/ui/webhooks").get_data(as_text=True)
    assert f'id="message">webhook {row.id} test failed: no answer' in shown
    assert "Connection refused" in shown
    assert 'id="message"' not in browser.get("/ui/webhooks").get_data(as_text=True)


def test_gpu_time_shows_by_key_model_and_upstream_and_a_gpu_quota_is_set_and_shown(
        ui_app, browser, admin, user):
    from app.accounting.usage import Record

    writer = ui_app.extensions["usage"]
    now = time.time()
    for key, model, upstream, seconds in ((user[1], "llama3.2:latest", "gpu1", 90.0),
                                          (user[1], "qwen2.5:0.5b", "gpu2", 3725.0),
                                          (admin[1], "llama3.2:latest", "gpu1", 30.5)):
        writer.add(Record(at=now, endpoint="/api/chat", status=200, latency_ms=5,
                          key_id=key.id, key_prefix=key.prefix, model=model,
                          upstream=upstream, gpu_seconds=seconds, load_seconds=0.0))
    assert writer.write_pending()
    sign_in(browser, admin[0])
    for span in ("1h", "24h", "30d"):
        page = browser.get(f"/ui/?range={span}").get_data(as_text=True)
        data = json.loads(re.search(r'id="chart-data">(.*?)</script>', page, re.S)[1])
        assert sum(data["gpu_seconds"]["llama3.2:latest"]) == 120.5, span
        assert re.search(r'id="total-gpu">1h04m<', page), span  # 3845.5 s
        by_key = page.split('id="by-key"')[1].split("</table>")[0]
        assert re.search(r"alice \(%s\)</a></td>\s*<td>2</td><td>0</td><td>1h03m</td>"
                         % user[1].prefix, by_key), span
        upstreams = page.split('id="gpu-by-upstream"')[1].split("</table>")[0]
        assert upstreams.index("gpu2</td><td>1h02m") < upstreams.index("gpu1</td><td>2m00s")
        by_model = page.split('id="by-model"')[1].split("</table>")[0]
        assert "<td>llama3.2:latest</td><td>2</td><td>0</td><td>2m00s</td>" in by_model
    token = csrf(browser)
    assert browser.post(f"/ui/keys/{user[1].id}", data={
        "csrf": token, "gpu_quota": "2h/day"}).status_code == 302
    assert keystore.key_summary(ApiKey.get_by_id(user[1].id))["gpu_quota"] == "2h/day"
    bad = browser.post(f"/ui/keys/{user[1].id}", data={"csrf": token, "gpu_quota": "2x/day"})
    assert bad.status_code == 400 and "GPU quota" in bad.get_data(as_text=True)
    key_page = browser.get(f"/ui/keys/{user[1].id}").get_data(as_text=True)
    assert "GPU seconds this UTC day" in key_page and "<td>2h/day</td>" in key_page
    own = browser.get(f"/ui/keys/{admin[1].id}").get_data(as_text=True)
    assert re.search(r'id="total-gpu">30.5s<', own)  # the admin's own, not alice's


def test_cloud_use_shows_on_the_overview_and_the_keys_page_and_the_form_sets_it(
        browser, client, admin, user, fake):
    fake.models.append("qwen3:cloud")
    body = {"model": "qwen3:cloud", "prompt": "hi", "stream": False}
    sign_in(browser, admin[0])
    token = csrf(browser)
    refused = client.post("/api/generate", json=body, headers=auth_header(user[0]))
    assert refused.status_code == 403
    assert browser.post(f"/ui/keys/{user[1].id}", data={"csrf": token, "cloud": "allow"}
                        ).status_code == 302
    assert ApiKey.get_by_id(user[1].id).cloud == "allow"
    client.application.extensions["key_cache"].clear()
    for secret in (user[0], admin[0]):
        answer = client.post("/api/generate", json=body, headers=auth_header(secret))
        answer.get_data()
        answer.close()
        assert answer.status_code == 200
    assert client.application.extensions["usage"].write_pending()
    overview = browser.get("/ui/").get_data(as_text=True)
    assert re.search(r'id="cloud-last_5h"><td>Last 5 hours</td><td>2<', overview)
    key_page = browser.get(f"/ui/keys/{user[1].id}").get_data(as_text=True)
    assert re.search(r'id="cloud-last_7d"><td>Last 7 days</td><td>1<', key_page)
    assert 'id="key-cloud">allow<' in key_page
    assert browser.post(f"/ui/keys/{user[1].id}", data={"csrf": token, "cloud": "default"}
                        ).status_code == 302
    assert ApiKey.get_by_id(user[1].id).cloud is None
