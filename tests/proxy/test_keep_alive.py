"""Refusals on keep-alive connections, as gunicorn runs the gateway (issue 23, item 4).

A refusal sent before the request body was read ends its connection (the body is not
read later either: app/proxy/request_body.py). A client must be told, with `Connection:
close` on the refusal itself, or it sends its next request on a connection the gateway
has already closed: 8 of 30 such requests failed after a 401.
"""
import contextlib
import http.client
import time

import pytest
import requests

from tests.gateway_process import GatewayProcess, wait_for
from tests.tcp_proxy import proxied_database

pytestmark = pytest.mark.gateway
ROUNDS = 10
BODY = b'{"model": "llama3.2", "prompt": "hi", "stream": false}'


@contextlib.contextmanager
def database_switch(database):
    """(URL for the gateway, cut(), restore()): PostgreSQL going away and coming back.

    Through a proxy that drops its connections (PostgreSQL is shared by every suite on
    the machine). SQLite cannot be taken away from a running gateway this way: in WAL
    mode another connection cannot lock out the gateway's open ones.
    """
    if database.startswith("sqlite"):
        yield database, None, None
        return
    with proxied_database(database) as (proxy, url):
        yield url, proxy.cut, proxy.restore


@pytest.fixture(scope="module")
def gateway(database, fake_ollama, tmp_path_factory):
    """One worker (so every request meets the same keep-alive rules), small limits."""
    settings = {"client_body_timeout": 1, "max_body_bytes": 4096, "legacy_apikey": "false",
                "key_cache_seconds": 0.1}
    with database_switch(database) as (url, cut, restore):
        with GatewayProcess(url, fake_ollama.url, workers=1, **settings) as gw:
            gw.start(tmp_path_factory.mktemp("log") / "gateway.log")
            gw.admin = gw.add_key("--name", "admin", "--role", "admin",
                                  "--rate-limit", "none")["key"]
            gw.user = gw.add_key("--name", "user", "--rate-limit", "none")["key"]
            gw.cut, gw.restore = cut, restore
            yield gw


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


class StalledBody:
    """A body of len(BODY) bytes that sends 10, then nothing for longer than client_body_timeout."""

    def __len__(self):
        return len(BODY)

    def __iter__(self):
        yield BODY[:10]
        time.sleep(2.5)


def no_key(gw, session):
    return session.post(gw.url + "/api/generate", data=BODY, timeout=60)


def wrong_key(gw, session):
    return session.post(gw.url + "/api/generate", data=BODY, timeout=60,
                        headers=bearer("ogw_" + "x" * 43))


def user_key_on_admin_api(gw, session):
    return session.post(gw.url + "/api/keys", data=b'{"name": "mine", "role": "admin"}',
                        headers=bearer(gw.user), timeout=60)


def too_large(gw, session):
    return session.post(gw.url + "/api/generate", data=b" " * 5000 + BODY,
                        headers=bearer(gw.user), timeout=60)


def body_stalls(gw, session):
    return session.post(gw.url + "/api/generate", data=StalledBody(), timeout=60,
                        headers=bearer(gw.user))


def database_away(gw, session):
    if gw.cut is None:
        pytest.skip("PostgreSQL only: a running gateway's SQLite cannot be taken away")
    fresh = gw.add_key("--name", "fresh", "--rate-limit", "none")["key"]  # not cached
    gw.cut()
    try:
        return session.post(gw.url + "/api/generate", data=BODY, headers=bearer(fresh),
                            timeout=60)
    finally:
        gw.restore()


REFUSALS = [(no_key, 401), (wrong_key, 401), (user_key_on_admin_api, 403), (too_large, 413),
            (body_stalls, 408), (database_away, 503)]


@pytest.mark.parametrize("refuse, status", REFUSALS, ids=[f.__name__ for f, _ in REFUSALS])
def test_a_refusal_of_an_unread_body_says_it_closes_and_the_next_request_works(
        gateway, refuse, status):
    rounds = 3 if refuse in (body_stalls, database_away) else ROUNDS
    failures = []
    with requests.Session() as session:
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=1))
        for _ in range(rounds):
            refused = refuse(gateway, session)
            assert refused.status_code == status, refused.text
            assert refused.headers.get("Connection") == "close"
            try:
                after = session.get(gateway.url + "/api/tags", headers=bearer(gateway.user),
                                    timeout=60)
                assert after.status_code == 200
            except requests.ConnectionError as exc:
                failures.append(exc)
    assert failures == []


def test_a_refusal_without_a_body_keeps_the_connection(gateway):
    with requests.Session() as session:
        refused = session.get(gateway.url + "/api/tags", headers=bearer("ogw_" + "x" * 43),
                              timeout=60)
        assert refused.status_code == 401
        assert refused.headers.get("Connection") == "keep-alive"
        assert wait_for(lambda: session.get(gateway.url + "/api/tags", timeout=60,
                                            headers=bearer(gateway.user)).ok, 30)


@pytest.mark.parametrize("path, headers, body, status", [
    ("/api/generate", {}, BODY, 401),
    ("/api/generate", {"Authorization": "Bearer ogw_" + "x" * 43}, BODY, 401),
    ("/api/keys", "user", b'{"name": "mine"}', 403),
    ("/api/generate", "user", b" " * 5000 + BODY, 413),
], ids=["no key", "wrong key", "user key on the admin API", "too large"])
def test_a_client_that_reuses_every_connection_it_is_not_told_to_close_never_fails(
        gateway, path, headers, body, status):
    """http.client keeps a connection unless the answer says `Connection: close`."""
    headers = bearer(gateway.user) if headers == "user" else headers
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
    try:
        for _ in range(ROUNDS):
            conn.request("POST", path, body=body, headers=headers)
            answer = conn.getresponse()
            answer.read()
            assert answer.status == status
            conn.request("GET", "/api/tags", headers=bearer(gateway.user))
            after = conn.getresponse()
            after.read()
            assert after.status == 200
    finally:
        conn.close()
