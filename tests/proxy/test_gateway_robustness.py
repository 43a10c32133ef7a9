"""The gateway under abuse, as gunicorn runs it: stalled clients, unauthenticated bodies,
keys in bad request lines, a database that goes away or fills its disk.

Each test here was written against a failure seen from outside (issue 6) and fails
without the change that fixed it.
"""
import concurrent.futures
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading

import pytest
import requests

from tests.gateway_process import GatewayProcess, free_port, wait_for
from tests.tcp_proxy import proxied_database

pytestmark = pytest.mark.gateway
GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}


@pytest.fixture(scope="module")
def gateway(database, fake_ollama, tmp_path_factory):
    """One worker, short client timeouts, a short slot lease, a pool of two connections."""
    settings = {"client_body_timeout": 1, "client_send_timeout": 1, "slot_lease_seconds": 2,
                "database_pool_size": 2, "max_unauthenticated_body_bytes": 65536}
    with GatewayProcess(database, fake_ollama.url, workers=1, **settings) as gw:
        yield gw.start(tmp_path_factory.mktemp("log") / "gateway.log")


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def connect(gateway):
    return socket.create_connection(("127.0.0.1", gateway.port), timeout=60)


def read_answer(sock):
    """(status code, the whole answer) of a connection the gateway closes after answering."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while piece := sock.recv(65536):
            data += piece
    return int(data.split(b" ", 2)[1]), data


def head(path, key=None, length=None, extra=b""):
    lines = [b"POST " + path + b" HTTP/1.1", b"Host: gw", b"Content-Type: application/json"]
    if key:
        lines.append(b"Authorization: Bearer " + key.encode())
    if length is not None:
        lines.append(b"Content-Length: " + str(length).encode())
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n"


def can_generate(gateway, key):
    return requests.post(gateway.url + "/api/generate", json=GENERATE, headers=bearer(key),
                         timeout=60).status_code == 200


# --- keys never reach a log or an error page -----------------------------------------------

def test_a_key_in_a_request_line_gunicorn_rejects_is_in_neither_the_log_nor_the_page(gateway):
    key = gateway.add_key("--name", "legacy-query")["key"]
    with connect(gateway) as sock:
        sock.sendall(b"GET /api/tags?apikey=" + key.encode() + b"&x=\xff HTTP/1.1\r\n"
                     b"Host: gw\r\n\r\n")
        status, answer = read_answer(sock)
    assert status == 400
    assert key.encode() not in answer and b"apikey=[redacted]" in answer
    assert wait_for(lambda: "Invalid request" in gateway.log(), 30)
    assert key not in gateway.log()


# --- no unauthenticated work ---------------------------------------------------------------

def test_a_wrong_header_key_is_refused_before_a_byte_of_the_body_is_read(gateway, fake):
    with connect(gateway) as sock:
        sock.sendall(head(b"/api/generate", key="ogw_" + "x" * 43, length=60_000_000))
        status, answer = read_answer(sock)  # the gateway answers, and hangs up, without the body
    assert status == 401
    assert b"invalid API key" in answer
    assert fake.requests == []


def test_a_body_too_large_to_search_for_a_legacy_key_is_refused_unread(gateway, fake):
    body = json.dumps({"model": "llama3.2", "prompt": "x" * 200_000, "apikey": "ogw_x"}).encode()
    with connect(gateway) as sock:
        sender = threading.Thread(target=_send_quietly, args=(sock, head(
            b"/api/generate", length=len(body)) + body))
        sender.start()
        status, answer = read_answer(sock)
        sender.join(60)
    assert status == 401
    assert b"max_unauthenticated_body_bytes" in answer
    assert fake.requests == []


def _send_quietly(sock, data):
    with contextlib.suppress(OSError):  # the gateway may hang up before taking it all
        sock.sendall(data)


def test_a_legacy_key_in_a_small_body_still_works(gateway, fake):
    key = gateway.add_key("--name", "legacy-body")["key"]
    answer = requests.post(gateway.url + "/api/generate", json={**GENERATE, "apikey": key},
                           timeout=60)
    assert answer.status_code == 200
    assert "apikey" not in fake.requests[-1].json()


# --- clients that stall ---------------------------------------------------------------------

@pytest.mark.parametrize("with_key", [True, False], ids=["header key", "legacy body key"])
def test_a_body_that_stops_arriving_gets_408_and_the_connection_closes(gateway, with_key):
    key = gateway.add_key("--name", "stalled-sender")["key"] if with_key else None
    with connect(gateway) as sock:
        # Under max_unauthenticated_body_bytes, so the legacy key is looked for in it.
        sock.sendall(head(b"/api/generate", key=key, length=60_000) + b"{")
        status, answer = read_answer(sock)
    assert status == 408
    assert b"client_body_timeout" in answer


def test_a_client_that_stops_reading_loses_its_stream_and_frees_its_slot(gateway, fake):
    key = gateway.add_key("--name", "stalled-reader", "--max-concurrent", "1")["key"]
    payload = json.dumps({"model": "llama3.2", "prompt": "a long story",
                          "options": {"num_predict": 1_000_000}}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up fast
    sock.settimeout(60)
    with sock:
        sock.connect(("127.0.0.1", gateway.port))
        sock.sendall(head(b"/api/generate", key=key, length=len(payload)) + payload)
        assert sock.recv(12).startswith(b"HTTP/1.1 200")
        # ...and read nothing more, keeping the connection open.
        assert fake.wait_for_cancellation(timeout=120), "Ollama kept generating for nobody"
        assert wait_for(lambda: can_generate(gateway, key), 60), "the slot was kept"


# --- concurrency slots come back on every path ----------------------------------------------

def test_a_slot_comes_back_after_the_client_leaves_while_ollama_is_silent(gateway, fake):
    key = gateway.add_key("--name", "impatient", "--max-concurrent", "1")["key"]
    fake.first_byte_delay = 60
    with pytest.raises(requests.ReadTimeout):
        requests.post(gateway.url + "/api/generate", json=GENERATE, headers=bearer(key),
                      timeout=1)
    assert fake.wait_for_cancellation(timeout=30)  # the gateway answered 499 to nobody
    fake.first_byte_delay = 0
    assert wait_for(lambda: can_generate(gateway, key), 30)


def test_a_stream_longer_than_the_slot_lease_keeps_its_slot(gateway, fake):
    """slot_lease_seconds is 2 here: only the renewal keeps a 10 s stream counted."""
    key = gateway.add_key("--name", "long-stream", "--max-concurrent", "1")["key"]
    fake.token_delay = 0.5
    stream = requests.post(gateway.url + "/api/generate", headers=bearer(key), stream=True,
                           timeout=60, json={**GENERATE, "stream": True,
                                             "options": {"num_predict": 20}})
    lines = stream.iter_lines()
    seen = [json.loads(next(lines)) for _ in range(12)]  # 6 s in: three leases' worth
    assert not seen[-1]["done"]
    second = requests.post(gateway.url + "/api/generate", json=GENERATE, headers=bearer(key),
                           timeout=60)
    assert second.status_code == 429
    assert json.loads(list(lines)[-1])["done"] is True
    stream.close()
    fake.token_delay = 0
    assert wait_for(lambda: can_generate(gateway, key), 30)


def test_a_small_pool_serves_many_requests_waiting_on_a_slow_ollama(gateway, fake):
    """database_pool_size is 2: no connection may be held while Ollama is waited on."""
    key = gateway.add_key("--name", "crowd", "--max-concurrent", "50")["key"]
    fake.first_byte_delay = 2

    def call(_):
        answer = requests.post(gateway.url + "/api/generate", json=GENERATE,
                               headers=bearer(key), timeout=120)
        return answer.status_code, answer.text[:200]

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(call, range(24)))
    assert [status for status, _ in answers] == [200] * 24, answers


# --- serve's start-up checks ---------------------------------------------------------------

def test_serve_on_a_taken_port_says_so_and_exits(fake, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        gw = GatewayProcess(f"sqlite:///{tmp_path}/taken.db", fake.url)
        result = subprocess.run(
            [sys.executable, "-m", "cli", "serve", "--port", str(port)],
            env=gw.env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "listening" not in result.stderr


def test_serve_warns_when_ollama_does_not_answer_and_starts_anyway(tmp_path):
    with GatewayProcess(f"sqlite:///{tmp_path}/alone.db",
                        f"http://127.0.0.1:{free_port()}", workers=1) as gw:
        gw.start(tmp_path / "alone.log")
        assert "warning: Ollama at http://127.0.0.1:" in gw.log()
        assert "requests get 502 until it answers" in gw.log()


# --- the database going away ---------------------------------------------------------------

def test_postgres_going_away_is_503_and_slots_come_back_once_it_returns(
        own_postgres, fake, tmp_path):
    with proxied_database(own_postgres) as (proxy, url):
        with GatewayProcess(url, fake.url, workers=1, key_cache_seconds=0.2) as gw:
            gw.start(tmp_path / "outage.log")
            key = gw.add_key("--name", "steady", "--max-concurrent", "1")["key"]
            fake.token_delay = 0.1
            stream = requests.post(gw.url + "/api/generate", headers=bearer(key), stream=True,
                                   json={**GENERATE, "stream": True,
                                         "options": {"num_predict": 20}}, timeout=60)
            assert stream.status_code == 200
            proxy.cut()
            # The stream needs no database: it finishes, but its slot cannot be released.
            assert json.loads(stream.content.splitlines()[-1])["done"] is True
            refused = requests.post(gw.url + "/api/generate", json=GENERATE,
                                    headers=bearer(key), timeout=60)
            assert refused.status_code == 503
            assert "check DATABASE_URL" in refused.json()["error"]
            assert wait_for(lambda: requests.get(gw.url + "/health", timeout=30)
                            .status_code == 503, 30)
            proxy.restore()
            fake.token_delay = 0
            # Back within seconds, not after the slot's 60 s lease.
            assert wait_for(lambda: can_generate(gw, key), 20), "the slot stayed taken"
            assert wait_for(lambda: requests.get(gw.url + "/health", timeout=30)
                            .status_code == 200, 30)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB filesystem of its own, so that the test can fill it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
            capture_output=True).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root and must be able to mount a tmpfs")
        pytest.skip("needs root to mount a small filesystem")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_sqlite_disk_is_503_and_health_says_so(small_disk, fake, tmp_path):
    with GatewayProcess(f"sqlite:///{small_disk}/gateway.db", fake.url, workers=1) as gw:
        gw.start(tmp_path / "full.log")
        key = gw.add_key("--name", "counted", "--rate-limit", "1000/minute")["key"]
        assert can_generate(gw, key)
        filler = small_disk / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as fh:
            while True:
                fh.write(b"\0" * 65536)
        refused = requests.post(gw.url + "/api/generate", json=GENERATE, headers=bearer(key),
                                timeout=60)
        assert refused.status_code == 503
        assert "disk holding it is full" in refused.json()["error"]
        health = lambda: requests.get(gw.url + "/health", timeout=30)  # noqa: E731
        assert wait_for(lambda: health().status_code == 503, 30)
        assert "full" in health().json()["database_problem"]
        filler.unlink()
        assert wait_for(lambda: can_generate(gw, key), 30)
        assert wait_for(lambda: health().status_code == 200, 30)
