"""The gateway as users run it: `ollama-gw serve` (gunicorn, gevent, 2 workers) over sockets.

Clients are the official `ollama` library and plain HTTP; the upstream is the fake Ollama.
"""
import concurrent.futures
import json
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import ollama
import pytest
import requests

from tests.conftest import auth_header
from tests.gateway_process import GatewayProcess, wait_for

pytestmark = pytest.mark.gateway
REPO = pathlib.Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="module")
def gateway(database, fake_ollama, tmp_path_factory):
    with GatewayProcess(database, fake_ollama.url, workers=2) as gw:
        yield gw.start(tmp_path_factory.mktemp("log") / "gateway.log")


@pytest.fixture
def user_key(gateway, fake):
    return gateway.add_key("--name", "user", "--rate-limit", "1000/minute")["key"]


def client_for(gateway, key):
    return ollama.Client(host=gateway.url, headers={"Authorization": f"Bearer {key}"})


def test_ollama_client_generates_streaming_and_not(gateway, user_key):
    client = client_for(gateway, user_key)
    answer = client.generate(model="llama3.2", prompt="say hi", stream=False)
    assert answer.done and answer.eval_count == 5
    parts = list(client.generate(model="llama3.2", prompt="say hi", stream=True))
    assert "".join(p.response for p in parts) == answer.response
    assert parts[-1].done and parts[-1].eval_count == 5


def test_ollama_client_chats_streaming_and_not(gateway, user_key):
    client = client_for(gateway, user_key)
    messages = [{"role": "user", "content": "hello there"}]
    answer = client.chat(model="llama3.2", messages=messages)
    assert answer.message.role == "assistant" and answer.message.content
    parts = list(client.chat(model="llama3.2", messages=messages, stream=True))
    assert "".join(p.message.content for p in parts) == answer.message.content


def test_ollama_client_embeds_lists_shows_and_ps(gateway, user_key):
    client = client_for(gateway, user_key)
    assert len(client.embed(model="nomic-embed-text", input=["a", "b"]).embeddings) == 2
    names = {m.model for m in client.list().models}
    assert "llama3.2:latest" in names
    assert client.show("llama3.2").details.family
    assert client.ps().models is not None


@pytest.mark.parametrize("headers, status, fragment", [
    ({"Authorization": "Bearer ogw_not-a-real-key"}, 401, "invalid API key"),
    ({}, 401, "missing API key"),
])
def test_ollama_client_sees_auth_failures_as_response_errors(gateway, headers, status, fragment):
    client = ollama.Client(host=gateway.url, headers=headers)
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="llama3.2", prompt="hi", stream=False)
    assert caught.value.status_code == status
    assert fragment in caught.value.error


def test_ollama_client_sees_unknown_model_and_forbidden_model(gateway):
    key = gateway.add_key("--name", "narrow", "--models", "llama3.2")["key"]
    client = client_for(gateway, key)
    with pytest.raises(ollama.ResponseError) as forbidden:
        client.chat(model="qwen2.5:0.5b", messages=[{"role": "user", "content": "x"}])
    assert forbidden.value.status_code == 403
    admin = client_for(gateway, gateway.add_key("--name", "admin", "--role", "admin")["key"])
    with pytest.raises(ollama.ResponseError) as missing:
        admin.generate(model="no-such-model", prompt="hi")
    assert missing.value.status_code == 404
    assert "not found" in missing.value.error


def test_open_webui_style_probes_work_without_a_key(gateway):
    assert requests.get(gateway.url + "/").text == "Ollama is running"
    assert requests.head(gateway.url + "/").status_code == 200
    assert requests.get(gateway.url + "/health").json()["database"] == "ok"


def _wait_for_fresh_window(period=3600, margin=120):
    """Start a burst early in a fixed window so it cannot straddle two."""
    into = time.time() % period
    if into > period - margin:
        time.sleep(period - into + 0.1)


def test_rate_limit_is_exact_across_workers_and_instances(gateway, fake, database, tmp_path):
    """40 concurrent callers, two gateways x two workers, one 25/hour key: exactly 25 pass."""
    with GatewayProcess(database, fake.url, workers=2) as second:
        second.start(tmp_path / "second.log")
        key = gateway.add_key("--name", "burst", "--rate-limit", "25/hour")["key"]
        body = {"model": "llama3.2", "prompt": "x", "stream": False}
        urls = [gateway.url, second.url]
        _wait_for_fresh_window()

        def call(i):
            r = requests.post(urls[i % 2] + "/api/generate", json=body,
                              headers={"Authorization": f"Bearer {key}"}, timeout=30)
            return r.status_code, r.headers

        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            results = list(pool.map(call, range(120)))
    statuses = [status for status, _ in results]
    assert statuses.count(200) == 25
    assert statuses.count(429) == 95
    refused = [headers for status, headers in results if status == 429]
    assert all(int(h["Retry-After"]) >= 1 for h in refused)
    assert all(h["X-RateLimit-Remaining"] == "0" for h in refused)


def _open_stream(gateway, key, **body):
    response = requests.post(
        gateway.url + "/api/generate", stream=True, timeout=30,
        json={"model": "llama3.2", "prompt": "tell a long story", **body},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200
    return response


def _raw_stream(gateway, key, **body):
    """A bare socket that sent a streaming request and saw its headers."""
    payload = json.dumps({"model": "llama3.2", "prompt": "tell a long story", **body}).encode()
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=60)
    sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def _can_generate(gateway, key):
    body = {"model": "llama3.2", "prompt": "again", "stream": False}
    return requests.post(gateway.url + "/api/generate", json=body, timeout=30,
                         headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_client_that_drops_a_stream_stops_ollama_and_frees_its_slot(gateway, fake):
    key = gateway.add_key("--name", "one-at-a-time", "--max-concurrent", "1")["key"]
    fake.token_delay = 0.2  # 200 tokens: Ollama would go on for 40 s if nobody told it
    with _raw_stream(gateway, key, options={"num_predict": 200}) as sock:
        assert b'"done":false' in sock.recv(65536)
    # The client hung up, as a killed process would.
    assert fake.wait_for_cancellation(timeout=20), "Ollama was not told to stop"
    fake.token_delay = 0.0
    assert wait_for(lambda: _can_generate(gateway, key), 20), "the slot was not freed"


def test_client_that_leaves_while_the_model_loads_stops_ollama(gateway, fake):
    key = gateway.add_key("--name", "impatient")["key"]
    fake.first_byte_delay = 60.0  # loading: Ollama sends nothing, so only a watcher can tell
    calls = threading.Thread(target=lambda: _swallow(lambda: requests.post(
        gateway.url + "/api/generate", timeout=0.5,
        json={"model": "llama3.2", "prompt": "x"}, headers={"Authorization": f"Bearer {key}"})))
    calls.start()
    calls.join()
    assert fake.wait_for_cancellation(timeout=30), "the upstream kept loading for nobody"


def _swallow(func):
    try:
        func()
    except requests.RequestException:
        pass


def test_a_revoked_key_stops_working_on_every_worker(gateway):
    created = gateway.add_key("--name", "leaver")
    headers = {"Authorization": f"Bearer {created['key']}"}
    for _ in range(4):  # warm both workers' caches
        assert requests.get(gateway.url + "/api/version", headers=headers).status_code == 200
    gateway.cli("keys", "revoke", str(created["id"]), "--yes")

    def refused_everywhere():  # 8 in a row: both workers, whichever takes each request
        return all(requests.get(gateway.url + "/api/version", headers=headers,
                                timeout=30).status_code == 401 for _ in range(8))

    assert wait_for(refused_everywhere, 20)


def test_sigterm_lets_an_inflight_stream_finish(database, fake, tmp_path):
    with GatewayProcess(database, fake.url, workers=1) as gw:
        gw.start(tmp_path / "drain.log")
        key = gw.add_key("--name", "drain")["key"]
        fake.token_delay = 0.2
        stream = _open_stream(gw, key, options={"num_predict": 10})
        lines = stream.iter_lines()
        next(lines)
        gw.proc.send_signal(signal.SIGTERM)
        rest = [json.loads(line) for line in lines if line]
        assert rest[-1]["done"] is True and rest[-1]["eval_count"] == 10
        assert gw.proc.wait(60) == 0


def _send_raw(gateway, head, body=b"", close_after_send=False):
    """Send bytes as they are (bad framing included); return the status line, or None."""
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=60)
    with sock:
        sock.sendall(head.replace(b"\n", b"\r\n") + b"\r\n" + body)
        if close_after_send:
            return None
        answer = b""
        while b"\r\n" not in answer:
            piece = sock.recv(4096)
            if not piece:
                break
            answer += piece
        return answer.split(b"\r\n", 1)[0].decode()


def _chunked_head(path, key, extra=b""):
    return (b"POST " + path + b" HTTP/1.1\nHost: gw\nAuthorization: Bearer " + key.encode()
            + b"\nContent-Type: application/json\nTransfer-Encoding: chunked\n" + extra)


def test_a_chunked_body_over_the_limit_is_a_413(database, fake, tmp_path):
    with GatewayProcess(database, fake.url, workers=1, max_body_bytes=1000) as gw:
        gw.start(tmp_path / "small.log")
        key = gw.add_key("--name", "big")["key"]
        payload = json.dumps({"model": "llama3.2", "prompt": "x" * 5000}).encode()
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
        status = _send_raw(gw, _chunked_head(b"/api/generate", key), body)
        assert status.split()[1] == "413", status


def test_malformed_chunked_bodies_are_400_and_never_hold_a_slot(gateway, fake):
    key = gateway.add_key("--name", "mangled", "--role", "admin", "--max-concurrent", "1")["key"]
    for path in (b"/api/generate", b"/api/blobs/sha256:" + b"0" * 64):
        status = _send_raw(gateway, _chunked_head(path, key), b"zz\r\nnot hex\r\n0\r\n\r\n")
        assert status.split()[1] in ("400", "499"), status
    response = requests.get(gateway.url + "/api/tags", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200  # the slot came back: a leak would make this 429


def test_an_abandoned_blob_upload_frees_its_slot_and_stops_ollama_waiting(gateway, fake):
    key = gateway.add_key("--name", "uploader", "--role", "admin", "--max-concurrent", "1")["key"]
    head = (b"POST /api/blobs/sha256:" + b"0" * 64 + b" HTTP/1.1\nHost: gw\nAuthorization: Bearer "
            + key.encode() + b"\nContent-Length: 1000000\n")
    _send_raw(gateway, head, b"x" * 1000, close_after_send=True)
    headers = {"Authorization": f"Bearer {key}"}
    assert wait_for(
        lambda: requests.get(gateway.url + "/api/tags", headers=headers).status_code == 200, 20)


def test_gunicorn_run_directly_migrates_a_fresh_database(fake, tmp_path):
    """docs/operations.md's `gunicorn -c python:app.gunicorn_conf wsgi:app` needs no db upgrade."""
    gw = GatewayProcess(f"sqlite:///{tmp_path}/direct.db", fake.url, workers=1)
    log = open(tmp_path / "direct.log", "wb")
    gw.proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "python:app.gunicorn_conf", "wsgi:app"],
        env=gw.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for(lambda: _healthy(gw.url), 90)
        status = json.loads(gw.cli("db", "status", "--json").stdout)
        assert [row["applied_at"] is not None for row in status] == [True] * len(status)
        key = gw.add_key("--name", "direct")["key"]
        answer = requests.get(gw.url + "/api/tags", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200
    finally:
        gw.stop()
        log.close()


def _healthy(url):
    try:
        return requests.get(url + "/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.parametrize("ui", [True, False])
def test_the_log_says_once_that_the_dashboard_is_on(database, fake_ollama, tmp_path, ui):
    with GatewayProcess(database, fake_ollama.url, workers=2, ui=str(ui).lower()) as gw:
        gw.start(tmp_path / "gateway.log")
        assert requests.get(gw.url + "/ui/signin", timeout=60).status_code == (200 if ui else 404)
        said = [line for line in gw.log().splitlines() if "dashboard" in line]
    assert [line.split("] ", 3)[-1] for line in said] == (
        [f"web dashboard on at {gw.url}/ui/ (ui = true)"] if ui else [])


def test_a_user_key_cannot_sign_the_server_out_of_ollama_com(gateway, fake, user_key):
    refused = requests.post(gateway.url + "/api/signout", headers=auth_header(user_key),
                            timeout=60)
    assert refused.status_code == 403
    assert "account endpoints" in refused.json()["error"]
    assert [r.path for r in fake.requests] == []
    admin = gateway.add_key("--name", "signout-admin", "--role", "admin")["key"]
    relayed = requests.post(gateway.url + "/api/signout", headers=auth_header(admin), timeout=60)
    assert relayed.status_code == 404  # the fake Ollama's answer: it got the request
    assert [(r.method, r.path) for r in fake.requests] == [("POST", "/api/signout")]
