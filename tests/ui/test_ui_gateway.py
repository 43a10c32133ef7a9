"""Dashboard sign-in and sign-out as gunicorn runs the gateway: two instances of two
workers each on one database, so that whatever one process learns, the others must know.

Sign-out ends the session on the server: the same cookie replayed anywhere is refused.
Failed sign-ins are throttled per client address by all processes together, a valid
key is never throttled, and X-Forwarded-For counts only from a trusted proxy.
"""
import json
import re

import pytest
import requests

from app.store import db
from tests.gateway_process import GatewayProcess, wait_for

pytestmark = pytest.mark.gateway
COOKIE = "ogw_ui"
WRONG = "ogw_" + "x" * 43
ALLOWED = 10  # docs/dashboard.md: ten failed sign-ins a minute from one address, then 429


@pytest.fixture(scope="module")
def gateways(database, fake_ollama, tmp_path_factory):
    """(a, b): `a` trusts a proxy on 127.0.0.1, `b` one elsewhere; one secret for cookies."""
    logs = tmp_path_factory.mktemp("log")
    common = {"ui": "true", "ui_secret": "s" * 48, "data_dir": str(logs)}
    with GatewayProcess(database, fake_ollama.url, workers=2, trusted_proxies="127.0.0.1",
                        **common) as a, \
            GatewayProcess(database, fake_ollama.url, workers=2, trusted_proxies="10.0.0.0/8",
                           **common) as b:
        a.start(logs / "a.log")
        b.start(logs / "b.log")
        a.admin = b.admin = a.add_key("--name", "ops", "--role", "admin")["key"]
        yield a, b


@pytest.fixture
def a_and_b(gateways, database):
    """The two gateways, with no failed sign-in remembered from another test."""
    instance = db.open_database(database)
    with instance.connection_context():
        instance.execute_sql("DELETE FROM signin_failure")
    instance.close_all()
    return gateways


def sign_in(gw, key, **headers):
    return requests.post(gw.url + "/ui/signin", data={"key": key}, headers=headers,
                         allow_redirects=False, timeout=60)


def signed_in(gw, key):
    answer = sign_in(gw, key)
    assert answer.status_code == 302, answer.text
    return answer.cookies[COOKIE]


def page(gw, cookie, path="/ui/keys"):
    return requests.get(gw.url + path, cookies={COOKIE: cookie}, allow_redirects=False,
                        timeout=60)


def sign_out(gw, cookie):
    csrf = re.search(r'name="csrf" value="([^"]+)"', page(gw, cookie).text).group(1)
    answer = requests.post(gw.url + "/ui/signout", data={"csrf": csrf},
                           cookies={COOKIE: cookie}, allow_redirects=False, timeout=60)
    assert answer.status_code == 302 and answer.headers["Location"] == "/ui/signin"


# --- sign-out -------------------------------------------------------------------------------

def test_a_cookie_replayed_after_sign_out_is_refused_by_every_instance(a_and_b):
    a, b = a_and_b
    cookie = signed_in(a, a.admin)
    for gw in (a, b, a, b):  # two workers each: whichever takes each request
        assert page(gw, cookie).status_code == 200
    sign_out(a, cookie)
    for gw in (b, a, b, a):
        answer = page(gw, cookie)
        assert answer.status_code == 302 and answer.headers["Location"] == "/ui/signin"


def test_sign_out_ends_that_session_only(a_and_b):
    a, b = a_and_b
    leaving, staying = signed_in(a, a.admin), signed_in(b, a.admin)
    sign_out(b, leaving)
    assert page(a, leaving).status_code == 302
    for gw in (a, b, a, b):
        assert page(gw, staying).status_code == 200


# --- the sign-in throttle -------------------------------------------------------------------

def test_exactly_ten_failures_are_answered_then_the_address_waits_on_every_instance(a_and_b):
    a, b = a_and_b
    for attempt in range(ALLOWED):  # alternately: each instance sees only half of them
        answer = sign_in((a, b)[attempt % 2], WRONG)
        assert answer.status_code == 401, (attempt, answer.text)
        assert "invalid API key" in answer.text
    for gw in (b, a):
        answer = sign_in(gw, WRONG)
        assert answer.status_code == 429, answer.text
        assert 1 <= int(answer.headers["Retry-After"]) <= 60


def test_a_valid_key_signs_in_while_its_address_is_throttled(a_and_b):
    a, b = a_and_b
    for attempt in range(ALLOWED + 1):
        sign_in((a, b)[attempt % 2], WRONG)
    assert sign_in(a, WRONG).status_code == 429
    for gw in (a, b):
        cookie = signed_in(gw, a.admin)
        assert page(gw, cookie).status_code == 200


def test_x_forwarded_for_from_an_untrusted_address_is_ignored(a_and_b):
    _, b = a_and_b
    for attempt in range(ALLOWED):
        answer = sign_in(b, WRONG, **{"X-Forwarded-For": f"203.0.113.{attempt}"})
        assert answer.status_code == 401
    answer = sign_in(b, WRONG, **{"X-Forwarded-For": "203.0.113.200"})
    assert answer.status_code == 429


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_count(a_and_b):
    a, _ = a_and_b
    client = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}  # the proxy appended .7
    for _ in range(ALLOWED):
        assert sign_in(a, WRONG, **client).status_code == 401
    assert sign_in(a, WRONG, **client).status_code == 429
    assert sign_in(a, WRONG, **{"X-Forwarded-For": "203.0.113.8"}).status_code == 401
    assert sign_in(a, WRONG).status_code == 401  # the proxy's own address: no failures yet


def test_the_access_log_names_the_forwarded_client_only_behind_a_trusted_proxy(a_and_b):
    a, b = a_and_b
    for gw, remote in ((a, "203.0.113.9"), (b, "127.0.0.1")):
        answer = requests.get(gw.url + "/api/tags?probe=forwarded", timeout=60, headers={
            "Authorization": f"Bearer {gw.admin}", "X-Forwarded-For": "203.0.113.9"})
        assert answer.status_code == 200
        assert wait_for(lambda gw=gw: _access_lines(gw), 30)
        assert [line["remote"] for line in _access_lines(gw)] == [remote]


def _access_lines(gw):
    lines = (json.loads(line) for line in gw.log().splitlines() if line.startswith("{"))
    return [line for line in lines if line.get("query") == "probe=forwarded"]
