"""Several Ollama servers: where each request goes, failover, unions, management to all.

Three fake Ollamas with different models on real sockets; the gateway in-process with
Flask's client. The pool's view is refreshed explicitly here (a gunicorn worker runs a
monitor for it: tests/upstreams/test_upstreams_gateway.py).
"""
import collections
import dataclasses
import hashlib
import json
import subprocess
import sys
import time

import pytest

from app import create_app
from app.config import UpstreamSpec
from app.upstreams.pool import Member, UpstreamPool
from tests.conftest import auth_header
from tests.fake_ollama import FakeOllama

BLOB = b"layer" * 10_000
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


@pytest.fixture
def fakes():
    """gpu1 has llama3.2 and qwen; gpu2 has llama3.2 and an embedder; gpu3 only phi3."""
    servers = [FakeOllama(models=["llama3.2:latest", "qwen2.5:0.5b"]),
               FakeOllama(models=["llama3.2:latest", "nomic-embed-text:latest"]),
               FakeOllama(models=["phi3:latest"])]
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def gateway(settings, migrated, fakes):
    upstreams = tuple(f"gpu{i}={f.url}" for i, f in enumerate(fakes, 1))
    app = create_app(dataclasses.replace(settings, upstreams=upstreams))
    app.config["TESTING"] = True
    app.extensions["upstreams"].refresh()
    return app


@pytest.fixture
def admin(make_key):
    return auth_header(make_key("admin", role="admin")[0])


def served_by(fakes):
    """How many requests each fake received (its recorded requests)."""
    return [len(f.requests) for f in fakes]


def generate(client, headers, model="llama3.2", **extra):
    return client.post("/api/generate", headers=headers, buffered=True,
                       json={"model": model, "prompt": "hi", "stream": False, **extra})


# --- the routing rules, on their own ----------------------------------------------------------

def pool_of(*members):
    pool = UpstreamPool([UpstreamSpec(f"m{i}", f"http://127.0.0.1:{i + 1}", weight=w,
                                      max_concurrent=c) for i, (w, c) in enumerate(members)])
    return pool, pool.members


def test_a_request_goes_where_its_model_is_and_prefers_it_loaded():
    pool, (a, b, c) = pool_of((1, None), (1, None), (1, None))
    a.models, b.models, c.models = (frozenset({"llama3.2:latest"}), frozenset(
        {"llama3.2:latest", "qwen2.5:0.5b"}), frozenset({"phi3:latest"}))
    assert {m.name for m in pool.candidates("qwen2.5:0.5b")} == {"m1"}
    b.loaded = frozenset({"llama3.2:latest"})
    assert [m.name for m in pool.candidates("LLAMA3.2")][:1] == ["m1"]  # loaded wins
    # No server has it: every one that is up, and Ollama answers its own 404.
    assert {m.name for m in pool.candidates("nowhere")} == {"m0", "m1", "m2"}


def test_the_least_busy_for_its_weight_goes_first_and_a_full_one_last():
    pool, (a, b) = pool_of((1, None), (2, 3))
    a.in_flight, b.in_flight = 2, 3  # per weight: 2 and 1.5
    assert [m.name for m in pool.candidates()] == ["m0", "m1"]  # m1 is at its cap of 3
    b.in_flight = 2  # per weight 1: under its cap, and less busy than m0
    assert [m.name for m in pool.candidates()] == ["m1", "m0"]


def test_idle_upstreams_share_requests_by_weight():
    pool, _ = pool_of((1, None), (3, None))
    firsts = collections.Counter(pool.candidates()[0].name for _ in range(4000))
    assert 0.70 < firsts["m1"] / 4000 < 0.80  # weight 3 of 4


def test_a_failing_upstream_is_left_alone_for_a_while_that_doubles():
    pool, (a, b) = pool_of((1, None), (1, None))
    now = time.monotonic()
    for expected in (1, 2, 4, 8):
        a.failed(now)
        assert a.retry_at == now + expected
    assert [m.name for m in pool.candidates(now=now)] == ["m1", "m0"]  # down: a last resort
    b.in_flight = 1
    assert [m.name for m in pool.candidates(now=now + 9)] == ["m0", "m1"]  # due, less busy
    b.in_flight = 0
    b.failed(now)
    assert [m.name for m in pool.candidates(now=now)] == ["m1", "m0"]  # all down: soonest first
    a.answered()
    assert (a.up, a.failures) == (True, 0)


def test_an_upstream_back_after_its_back_off_is_ranked_by_load_again():
    """Due again (not yet answered: still marked down) it is no last resort: it goes
    ahead of a busier upstream and behind a less busy one."""
    pool, (a, b, c) = pool_of((1, None), (1, None), (1, None))
    now = time.monotonic()
    a.failed(now)
    assert [m.name for m in pool.candidates(now=now)][-1] == "m0"  # backing off: last
    a.in_flight, b.in_flight, c.in_flight = 1, 3, 0  # no ties: no random draw
    assert [m.name for m in pool.candidates(now=now + 1)] == ["m2", "m0", "m1"]
    c.in_flight = 2
    assert [m.name for m in pool.candidates(now=now + 1)] == ["m0", "m2", "m1"]


def test_member_names_models_the_way_ollama_does():
    member = Member(UpstreamSpec("x", "http://x:1"), client=None,
                    models=frozenset({"llama3.2:latest"}))
    assert member.has("llama3.2") and member.has("LLAMA3.2:latest") and not member.has("qwen")


# --- the gateway in front of three servers ------------------------------------------------------

def test_requests_go_to_a_server_that_has_the_model(gateway, fakes, admin):
    client = gateway.test_client()
    assert generate(client, admin, "qwen2.5:0.5b").status_code == 200
    assert generate(client, admin, "phi3").status_code == 200
    embed = client.post("/api/embed", headers=admin, buffered=True,
                        json={"model": "nomic-embed-text", "input": "x"})
    assert embed.status_code == 200
    assert served_by(fakes)[0] >= 1 and served_by(fakes)[1] >= 1 and served_by(fakes)[2] >= 1
    assert fakes[0].requests[-1].json()["model"] == "qwen2.5:0.5b"
    assert fakes[1].requests[-1].json()["model"] == "nomic-embed-text"
    assert fakes[2].requests[-1].json()["model"] == "phi3"


def generations(fake):
    return [r for r in fake.requests if r.path == "/api/generate"]


def test_a_server_with_the_model_loaded_is_preferred(gateway, fakes, admin):
    generate(gateway.test_client(), admin, "llama3.2", keep_alive="5m")
    first = 0 if generations(fakes[0]) else 1
    gateway.extensions["upstreams"].refresh()  # reads /api/ps: now loaded on `first`
    for fake in fakes:
        fake.requests.clear()
    for _ in range(5):
        generate(gateway.test_client(), admin, "llama3.2")
    assert len(generations(fakes[first])) == 5 and generations(fakes[1 - first]) == []


def test_a_server_that_refuses_the_connection_is_skipped_and_marked_down(gateway, fakes, admin):
    pool = gateway.extensions["upstreams"]
    pool.named("gpu2").in_flight += 5  # busier: gpu1 is always tried first
    fakes[0].stop()  # gpu1 goes away; gpu2 also has llama3.2
    answers = [generate(gateway.test_client(), admin) for _ in range(4)]
    pool.named("gpu2").in_flight -= 5
    assert [a.status_code for a in answers] == [200] * 4
    assert pool.named("gpu1").up is False
    assert len(generations(fakes[1])) >= 3
    fakes[0].start()
    pool.named("gpu1").retry_at = 0  # the backoff has run out
    pool.refresh()
    assert pool.named("gpu1").up is True


def test_only_when_every_server_with_the_model_is_down_is_it_a_502(gateway, fakes, admin):
    fakes[2].stop()
    answer = generate(gateway.test_client(), admin, "phi3")
    assert answer.status_code == 502 and "cannot reach the Ollama server" in answer.get_json()[
        "error"]


@pytest.mark.parametrize("path, field, ident, key_models, expected", [
    ("/api/tags", "models", "name", None,
     ["llama3.2:latest", "qwen2.5:0.5b", "nomic-embed-text:latest", "phi3:latest"]),
    ("/api/tags", "models", "name", "llama3.2,phi3", ["llama3.2:latest", "phi3:latest"]),
    ("/v1/models", "data", "id", "qwen*", ["qwen2.5:0.5b"]),
])
def test_model_lists_are_the_union_of_what_the_servers_have(gateway, fakes, make_key, path, field,
                                                            ident, key_models, expected):
    secret, _ = make_key(models=key_models)
    listed = gateway.test_client().get(path, headers=auth_header(secret)).get_json()[field]
    assert sorted(m[ident] for m in listed) == sorted(expected)


def test_management_goes_to_the_named_server_or_to_all(gateway, fakes, admin):
    client = gateway.test_client()
    named = client.delete("/api/delete", json={"model": "llama3.2"}, buffered=True,
                          headers={**admin, "X-Ollama-Upstream": "gpu2"})
    assert named.status_code == 200
    assert "llama3.2:latest" in fakes[0].models and "llama3.2:latest" not in fakes[1].models
    pulled = client.post("/api/pull?upstream=gpu3", json={"model": "tinyllama", "stream": False},
                         headers=admin, buffered=True)
    assert pulled.status_code == 200 and fakes[2].requests[-1].path == "/api/pull"
    progress = client.post("/api/pull", json={"model": "gemma"}, headers=admin, buffered=True)
    lines = [json.loads(line) for line in progress.data.splitlines()]
    assert [line.get("status") for line in lines].count("success") == 3  # each server's
    assert all("gemma:latest" in f.models for f in fakes)


def test_an_unknown_upstream_name_is_a_400_naming_the_known_ones(gateway, admin):
    answer = gateway.test_client().post("/api/pull", json={"model": "x"}, buffered=True,
                                        headers={**admin, "X-Ollama-Upstream": "gpu9"})
    assert answer.status_code == 400
    assert "gpu1, gpu2, gpu3" in answer.get_json()["error"]


def test_a_blob_is_copied_to_every_server_as_it_arrives(gateway, fakes, admin):
    client = gateway.test_client()
    assert client.head(f"/api/blobs/{DIGEST}", headers=admin).status_code == 404
    assert client.post(f"/api/blobs/{DIGEST}", data=BLOB, headers=admin,
                       buffered=True).status_code == 201
    assert all(f.blobs == {DIGEST: len(BLOB)} for f in fakes)
    assert client.head(f"/api/blobs/{DIGEST}", headers=admin).status_code == 200


def test_health_reports_each_upstream_by_name_not_by_address(gateway, fakes):
    fakes[2].stop()
    gateway.extensions["upstreams"].named("gpu3").client._health = (0.0, None)
    body = gateway.test_client().get("/health").get_json()
    assert body["upstreams"] == [{"name": "gpu1", "status": "healthy"},
                                 {"name": "gpu2", "status": "healthy"},
                                 {"name": "gpu3", "status": "unreachable"}]
    assert body["ollama_backend"] == "degraded"
    assert "127.0.0.1" not in json.dumps(body)


def test_health_without_a_key_shows_no_address_for_upstreams_without_a_name(settings, migrated,
                                                                            fakes):
    upstreams = (fakes[0].url, f"gpu2={fakes[1].url}", fakes[2].url + "/")
    app = create_app(dataclasses.replace(settings, upstreams=upstreams))
    body = app.test_client().get("/health").get_json()
    assert body["upstreams"] == [{"name": "upstream 1", "status": "healthy"},
                                 {"name": "gpu2", "status": "healthy"},
                                 {"name": "upstream 3", "status": "healthy"}]
    assert "127.0.0.1" not in json.dumps(body)
    # Shown so, not renamed: the fair queue and `upstreams ?upstream=` still use host:port.
    assert [m.name for m in app.extensions["upstreams"].members][0] == f"127.0.0.1:{fakes[0].port}"


def test_a_model_one_upstream_lists_as_remote_is_cloud_on_every_upstream(gateway, fakes,
                                                                        make_key):
    """The monitor's reading of each upstream's /api/tags keeps its remote_host models."""
    fakes[2].models.append("team-coder:latest")
    fakes[2].remote["team-coder"] = "qwen3-coder:480b"
    fakes[0].models.append("team-coder:latest")  # a local model of that name elsewhere
    gateway.extensions["upstreams"].refresh()
    client = gateway.test_client()
    user = auth_header(make_key()[0])
    refused = generate(client, user, "team-coder")
    assert refused.status_code == 403 and "is a cloud model" in refused.get_json()["error"]
    listed = {m["name"] for m in client.get("/api/tags", headers=user).get_json()["models"]}
    assert "team-coder:latest" not in listed and "phi3:latest" in listed
    allowed = auth_header(make_key(cloud="allow")[0])
    listed = {m["name"] for m in client.get("/api/tags", headers=allowed).get_json()["models"]}
    assert "team-coder:latest" in listed
    assert sum(len(f.probes) for f in fakes) == 0  # the monitor's view sufficed


# Under gevent (as in a gunicorn worker): does asking whether a pooled connection is still
# open let other greenlets run first? It must not: the request would wait behind them.
_YIELD_CHECK = """
from gevent import monkey
monkey.patch_all()
import json, socket, gevent, urllib3
from app.upstreams.client import OllamaHTTPConnection

def check(connection_class):
    ours, ollama = socket.socketpair()
    connection = connection_class("127.0.0.1", 9)
    connection.sock = ours
    others = []
    gevent.spawn(others.append, "ran")  # ready: runs at this greenlet's next yield
    idle = connection.is_connected
    yielded = bool(others)
    ollama.close()  # Ollama closed the idle connection
    closed = connection.is_connected
    return {"idle": idle, "yielded": yielded, "closed": closed}

print(json.dumps([check(OllamaHTTPConnection), check(urllib3.connection.HTTPConnection)]))
"""


def test_a_pooled_connection_is_checked_without_yielding_to_other_greenlets():
    ours, urllib3s = json.loads(subprocess.run(
        [sys.executable, "-c", _YIELD_CHECK], capture_output=True, text=True, check=True,
        timeout=120).stdout)
    assert ours == {"idle": True, "yielded": False, "closed": False}
    # What urllib3 does itself (why ours is needed): the same answers, after a yield.
    assert urllib3s == {"idle": True, "yielded": True, "closed": False}
