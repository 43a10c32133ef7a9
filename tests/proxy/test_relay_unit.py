"""What the gateway sends Ollama and what it relays back, with Ollama faked by `responses`."""
import contextlib
import dataclasses
import json
import time
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
import responses
import urllib3
from requests.structures import CaseInsensitiveDict

from app import create_app
from app.proxy.relay import (
    CHUNK_SIZE,
    ClientDisconnected,
    RelayBody,
    RelayOutcome,
    response_headers,
)
from app.store.models import QueueEntry
from app.upstreams.client import forwardable_request_headers
from app.upstreams.pool import CLOUD_READER
from tests.conftest import auth_header

UPSTREAM = "http://ollama.test:11434"
GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}
DONE = b'{"model":"llama3.2","response":"hello","done":true}'


@pytest.fixture
def app(settings, migrated):
    """The gateway pointed at an upstream that only `responses` answers."""
    app = create_app(dataclasses.replace(settings, upstreams=(UPSTREAM,)))
    app.config["TESTING"] = True
    return app


@pytest.fixture
def ollama():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def secret(make_key):
    return make_key()[0]


def only_call(ollama):
    """The one request the client's made Ollama see (not the gateway's own read of which
    models run in the cloud: app/upstreams/pool.py)."""
    calls = [c for c in ollama.calls if c.request.headers.get("User-Agent") != CLOUD_READER]
    assert len(calls) == 1
    return calls[0].request


# --- what Ollama receives ------------------------------------------------------------------

def test_credentials_and_hop_by_hop_headers_are_not_forwarded(client, ollama, secret):
    ollama.post(UPSTREAM + "/api/generate", body=DONE, content_type="application/json")
    response = client.post("/api/generate", json=GENERATE, headers={
        **auth_header(secret),
        "X-API-Key": "ogw_second-secret",
        "Cookie": "session=browser-cookie",
        "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
        "Connection": "Upgrade",
        "Upgrade": "h2c",  # not websocket: werkzeug's router answers 400 to that itself
        "Keep-Alive": "timeout=99",
        "TE": "trailers",
        "User-Agent": "my-client/1.0",
        "X-Request-Id": "req-42",
        "Accept": "application/x-ndjson",
    })
    assert response.status_code == 200

    sent = only_call(ollama)
    for name in ("Authorization", "X-API-Key", "Cookie", "Proxy-Authorization", "Upgrade",
                 "Keep-Alive", "TE"):
        assert name not in sent.headers, name
    assert sent.headers.get("Connection") != "Upgrade"
    assert (sent.headers["User-Agent"], sent.headers["X-Request-Id"], sent.headers["Accept"]) == (
        "my-client/1.0", "req-42", "application/x-ndjson")
    assert sent.headers["Content-Type"] == "application/json"
    assert secret not in str(sent.headers) and "browser-cookie" not in str(sent.headers)


def test_request_goes_to_the_upstream_host_not_the_gateways(client, ollama, secret):
    ollama.post(UPSTREAM + "/api/generate", body=DONE, content_type="application/json")
    client.post("/api/generate", json=GENERATE, headers=auth_header(secret),
                base_url="http://gateway.example:8080")
    sent = only_call(ollama)
    assert urlsplit(sent.url).netloc == "ollama.test:11434"
    assert sent.headers.get("Host", "ollama.test:11434") == "ollama.test:11434"
    assert "gateway.example" not in str(sent.headers)


def test_body_reaches_ollama_unchanged(client, ollama, secret):
    ollama.post(UPSTREAM + "/api/generate", body=DONE, content_type="application/json")
    raw = b'{"model": "llama3.2", "prompt": "caf\\u00e9 \xe2\x98\x95", "options": {"seed": 7}}'
    client.post("/api/generate", data=raw, content_type="application/json",
                headers=auth_header(secret))
    assert only_call(ollama).body == raw


@pytest.mark.parametrize("query, forwarded", [
    ("verbose=1&apikey={secret}&x=a+b", [("verbose", "1"), ("x", "a b")]),
    ("apikey={secret}", []),
    ("verbose=1&tag=a%2Fb", [("verbose", "1"), ("tag", "a/b")]),
])
def test_query_is_forwarded_without_the_legacy_key(client, ollama, secret, query, forwarded):
    ollama.get(UPSTREAM + "/api/tags", json={"models": []})
    headers = {} if "apikey" in query else auth_header(secret)
    response = client.get("/api/tags?" + query.format(secret=secret), headers=headers)
    assert response.status_code == 200
    sent_url = urlsplit(only_call(ollama).url)
    assert sent_url.path == "/api/tags"
    assert parse_qsl(sent_url.query) == forwarded
    assert secret not in sent_url.query


def test_legacy_body_key_is_removed_from_what_ollama_receives(client, ollama, secret):
    ollama.post(UPSTREAM + "/api/generate", body=DONE, content_type="application/json")
    response = client.post("/api/generate", json={**GENERATE, "apikey": secret})
    assert response.status_code == 200
    sent = only_call(ollama)
    assert secret.encode() not in sent.body
    assert json.loads(sent.body) == GENERATE


# --- what the client receives --------------------------------------------------------------

def test_response_headers_are_relayed_except_hop_by_hop(client, ollama, secret):
    ollama.post(UPSTREAM + "/api/generate", body=DONE, content_type="application/json", headers={
        "X-Ollama-Trace": "abc",
        "Cache-Control": "no-store",
        "Connection": "close",
        "Keep-Alive": "timeout=5",
        "Server": "ollama-internal/1.2",
        "Date": "Mon, 01 Jan 2024 00:00:00 GMT",
        "Trailer": "X-Checksum",
        "Content-Length": str(len(DONE)),
    })
    response = client.post("/api/generate", json=GENERATE, headers=auth_header(secret))
    assert response.status_code == 200
    assert response.headers["X-Ollama-Trace"] == "abc"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Content-Length"] == str(len(DONE))
    for name in ("Connection", "Keep-Alive", "Server", "Date", "Trailer"):
        assert name not in response.headers, name
    assert response.headers["X-RateLimit-Limit"] == "1000"
    assert response.data == DONE


def test_ndjson_stream_is_relayed_as_is_without_a_length(client, ollama, secret):
    body = b'{"response":"a","done":false}\n{"response":"b","done":true,"eval_count":2}\n'
    ollama.post(UPSTREAM + "/api/generate", body=body, content_type="application/x-ndjson",
                headers={"Content-Length": str(len(body))})
    response = client.post("/api/generate", json={"model": "llama3.2", "prompt": "hi"},
                           headers=auth_header(secret))
    assert response.data == body
    assert response.headers["Content-Type"] == "application/x-ndjson"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in response.headers


@pytest.fixture
def capped_client(settings, migrated):
    """The gateway with one slot at the upstream, and `held`: the slots taken (queue
    entries) as each answer left the view, before the WSGI server began on its body."""
    app = create_app(dataclasses.replace(settings, upstreams=(UPSTREAM,),
                                         upstream_max_concurrent=1))
    app.config["TESTING"] = True
    client = app.test_client()
    client.held = []

    @app.after_request
    def count(response):
        client.held.append(slots_held())
        return response

    return client


def slots_held():
    return QueueEntry.select().count()


def test_a_whole_short_answer_frees_its_slot_before_it_is_sent_on(capped_client, ollama,
                                                                  secret):
    """Ollama is done with a request whose whole answer it sent: the next one may start
    while this one's answer is still on its way to the client (bench/queue_handoff.py)."""
    ollama.post(UPSTREAM + "/api/generate", body=DONE, content_type="application/json",
                headers={"Content-Length": str(len(DONE))})  # as Ollama's always has
    response = capped_client.post("/api/generate", json=GENERATE, headers=auth_header(secret))
    assert response.status_code == 200
    assert capped_client.held == [0]
    assert response.data == DONE


@pytest.mark.parametrize("body, content_type", [
    (b'{"response":"a","done":false}\n', "application/x-ndjson"),  # a stream: no length
    (b'{"embeddings":[' + b"0.5," * 20_000 + b'0.5]}', "application/json"),  # over a chunk
])
def test_an_answer_not_read_ahead_holds_its_slot_until_it_is_read(capped_client, ollama,
                                                                   secret, body, content_type):
    headers = {} if content_type == "application/x-ndjson" else {
        "Content-Length": str(len(body))}
    ollama.post(UPSTREAM + "/api/generate", body=body, content_type=content_type,
                headers=headers)
    response = capped_client.post("/api/generate", json=GENERATE, headers=auth_header(secret))
    assert capped_client.held == [1]
    assert response.data == body
    response.close()  # as the WSGI server does once the body is sent
    assert slots_held() == 0


@pytest.mark.parametrize("status, body", [
    (500, b'{"error":"llama runner process has terminated: exit status 2"}'),
    (400, b'{"error":"invalid options: num_gpu"}'),
    (404, b"404 page not found"),
])
def test_ollama_error_answers_pass_through_unchanged(client, ollama, secret, status, body):
    ollama.post(UPSTREAM + "/api/generate", status=status, body=body,
                content_type="application/json; charset=utf-8")
    response = client.post("/api/generate", json=GENERATE, headers=auth_header(secret))
    assert response.status_code == status
    assert response.data == body


@pytest.mark.parametrize("body", [
    b"<html>proxy error</html>", b"[1, 2]", b'{"models": 5}', b'{"models": ["llama3.2"]}',
], ids=["html", "array", "models not a list", "models not objects"])
def test_malformed_model_list_from_ollama_gets_502(client, ollama, make_key, body):
    restricted, _ = make_key(models="llama3.2")
    ollama.get(UPSTREAM + "/api/tags", body=body, content_type="application/json")
    response = client.get("/api/tags", headers=auth_header(restricted))
    assert response.status_code == 502
    assert "could not be read" in response.get_json()["error"]


# --- upstream failures ---------------------------------------------------------------------

@pytest.mark.parametrize("failure, status, advice", [
    (requests.ConnectionError("Connection refused"), 502, "check that it is running"),
    (requests.exceptions.ChunkedEncodingError("broken"), 502, "check that it is running"),
    (requests.ConnectTimeout("connect timed out"), 504, "check that the Ollama server is up"),
    (requests.ReadTimeout("read timed out"), 504, "read_timeout"),
], ids=["refused", "broken answer", "connect timeout", "read timeout"])
def test_upstream_failure_says_what_to_check_without_naming_the_upstream(
        client, ollama, secret, failure, status, advice):
    ollama.post(UPSTREAM + "/api/generate", body=failure)
    response = client.post("/api/generate", json=GENERATE, headers=auth_header(secret))
    assert response.status_code == status
    message = response.get_json()["error"]
    assert advice in message
    for leak in ("ollama.test", "11434", "http://", str(failure)):
        assert leak not in message


def test_upstream_failure_keeps_the_rate_limit_headers(client, ollama, secret):
    ollama.post(UPSTREAM + "/api/generate", body=requests.ConnectionError("refused"))
    response = client.post("/api/generate", json=GENERATE, headers=auth_header(secret))
    assert response.status_code == 502
    assert response.headers["X-RateLimit-Limit"] == "1000"
    assert response.headers["X-RateLimit-Remaining"] == "999"


# --- the header filters themselves ---------------------------------------------------------

@pytest.mark.parametrize("name", [
    "Authorization", "authorization", "X-API-Key", "x-api-key", "Cookie", "Connection",
    "Keep-Alive", "Proxy-Authorization", "TE", "Trailer", "Transfer-Encoding", "Upgrade", "Host",
    "Content-Length",
])
def test_forwardable_request_headers_drops(name):
    assert forwardable_request_headers({name: "x", "Accept": "*/*"}) == {"Accept": "*/*"}


@pytest.mark.parametrize("name", [
    "User-Agent", "X-Request-Id", "Accept", "Accept-Language", "Content-Type", "Traceparent",
    "X-Forwarded-For",
])
def test_forwardable_request_headers_keeps(name):
    assert forwardable_request_headers({name: "v"}) == {name: "v"}


def _upstream_response(headers):
    response = requests.Response()
    response.headers = CaseInsensitiveDict(headers)
    return response


@pytest.mark.parametrize("content_type", [
    "application/x-ndjson", "text/event-stream", "text/event-stream; charset=utf-8"])
def test_response_headers_for_a_stream_drop_the_length_and_ask_nginx_not_to_buffer(content_type):
    upstream = _upstream_response({"Content-Type": content_type, "Content-Length": "10",
                                   "Transfer-Encoding": "chunked", "X-Trace": "t"})
    headers = response_headers(upstream, {"X-RateLimit-Limit": "5"})
    assert headers == [("Content-Type", content_type), ("X-Trace", "t"),
                       ("X-Accel-Buffering", "no"), ("X-RateLimit-Limit", "5")]


def test_response_headers_for_json_keep_the_length_and_drop_hop_by_hop():
    upstream = _upstream_response({
        "Content-Type": "application/json; charset=utf-8", "Content-Length": "42",
        "Connection": "keep-alive", "Keep-Alive": "timeout=5", "Server": "gin", "Date": "today",
        "Proxy-Authenticate": "Basic", "Upgrade": "h2c", "Content-Encoding": "gzip",
    })
    headers = response_headers(upstream, {})
    assert headers == [("Content-Type", "application/json; charset=utf-8"),
                       ("Content-Length", "42"), ("Content-Encoding", "gzip")]


def test_cookies_set_by_ollama_are_not_replayed_for_the_next_client(client, ollama, secret):
    ollama.get(UPSTREAM + "/api/version", json={"version": "0.6.8"},
               headers={"Set-Cookie": "session=of-the-first-client; Path=/"})
    client.get("/api/version", headers=auth_header(secret))
    client.get("/api/version", headers=auth_header(secret))
    assert "Cookie" not in ollama.calls[1].request.headers


def test_the_gateway_adds_no_headers_the_client_did_not_send(client, ollama, secret):
    # A gzip Accept-Encoding added on the client's behalf would bring back a compressed
    # body that is relayed raw to a client that cannot read it.
    ollama.get(UPSTREAM + "/api/version", json={"version": "0.6.8"})
    client.get("/api/version", headers=auth_header(secret))
    sent = {name.lower() for name in only_call(ollama).headers}
    assert "accept-encoding" not in sent
    assert "user-agent" not in sent or "python-requests" not in only_call(ollama).headers.get(
        "User-Agent", "")


def test_a_full_upstream_pool_closes_connections_without_a_warning_each(caplog):
    """After a burst of streams, connections beyond the pool's size are closed: one log line
    per connection would flood the log; other urllib3 warnings still get through."""
    import logging

    import urllib3

    import app.upstreams.client  # noqa: F401  (installs the filter)

    pool = urllib3.HTTPConnectionPool("127.0.0.1", 9, maxsize=1)
    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        for _ in range(3):
            pool._put_conn(pool.ConnectionCls("127.0.0.1", 9))
        logging.getLogger("urllib3.connectionpool").warning("Retrying after a reset")
    assert [r.getMessage() for r in caplog.records] == ["Retrying after a reset"]


# --- read_ahead(): a whole short answer, read before the body is relayed -----------------

class _Raw:
    """What RelayBody asks of urllib3's response: stream() and length_remaining."""

    def __init__(self, chunks, length):
        self.length_remaining, self._chunks = length, iter(chunks)
        self.chunks_read = 0

    def stream(self, amount, decode_content=True):
        # One pass, as urllib3's: after a failure its connection is closed, and a second
        # stream() yields nothing (read_ahead must keep what it met).
        for chunk in self._chunks:
            if isinstance(chunk, BaseException):
                raise chunk
            if self.length_remaining is not None:  # None: no Content-Length (a stream)
                self.length_remaining -= len(chunk)
            self.chunks_read += 1
            yield chunk


class _Answer:
    def __init__(self, chunks, length):
        self.raw = _Raw(chunks, length)
        self.headers = {"Content-Type": "application/json"}
        self.closed = False

    def close(self):
        self.closed = True


class _Watch:
    def __init__(self, gone=False):
        self.gone = gone

    def waiting(self):
        if self.gone:
            raise ClientDisconnected()
        return contextlib.nullcontext()

    def sending(self):
        return contextlib.nullcontext()

    def stop(self):
        pass


def relay_body(chunks, length, watch=None):
    events, outcome = [], RelayOutcome(status=200, started=time.monotonic())
    body = RelayBody(_Answer(chunks, length), watch or _Watch(), outcome,
                     lambda _o: events.append("finished"), "/api/generate",
                     on_upstream_done=lambda: events.append("slot freed"))
    return body, outcome, events


def test_read_ahead_frees_the_slot_and_relays_the_answer_as_read_then():
    body, outcome, events = relay_body([DONE], len(DONE))
    body.read_ahead()
    read_at = time.monotonic()
    assert events == ["slot freed"]
    time.sleep(0.05)  # Flask and the WSGI server at work: not Ollama's time
    assert b"".join(body) == DONE
    body.close()
    assert events == ["slot freed", "finished"]
    assert outcome.complete and not outcome.client_aborted
    assert outcome.last_byte_at <= read_at  # GPU time ends at Ollama's last byte
    assert outcome.tail == DONE and outcome.bytes == len(DONE)


def test_an_answer_cut_short_during_read_ahead_is_met_as_when_relaying():
    cut = urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")
    body, outcome, events = relay_body([cut], 100)
    body.read_ahead()
    assert events == []  # not done: the slot is freed when the body closes
    assert b"".join(body) == b""
    body.close()
    assert events == ["finished"]
    assert "IncompleteRead" in outcome.upstream_error and not outcome.client_aborted


def test_a_hang_up_during_read_ahead_ends_the_body_as_aborted():
    body, outcome, events = relay_body([DONE], len(DONE), _Watch(gone=True))
    body.read_ahead()
    assert b"".join(body) == b""
    body.close()
    assert events == ["finished"] and outcome.client_aborted


def test_an_answer_longer_than_a_chunk_is_not_read_ahead():
    big = [b"x" * CHUNK_SIZE, b"y"]
    body, outcome, events = relay_body(big, CHUNK_SIZE + 1)
    body.read_ahead()
    assert events == [] and body._response.raw.length_remaining == CHUNK_SIZE + 1
    assert b"".join(body) == b"".join(big)
    assert events == ["slot freed"]


def test_a_short_answer_only_partly_read_ahead_keeps_its_slot_until_the_rest_is_read():
    """The first read brought only part of a short answer (it came in pieces): Ollama is
    not done with the request yet, so its slot stays taken until the last byte is read."""
    body, outcome, events = relay_body([DONE[:10], DONE[10:]], len(DONE))
    body.read_ahead()
    assert events == []
    assert b"".join(body) == DONE
    assert events == ["slot freed"]
    body.close()
    assert events == ["slot freed", "finished"] and outcome.complete


def test_an_answer_without_a_length_is_not_read_ahead():
    """A stream (no Content-Length) is never whole in one chunk: the view does not wait
    for its first chunk, and its slot stays taken until Ollama ends it."""
    stream = [b'{"response":"a","done":false}\n', b'{"response":"","done":true}\n']
    body, outcome, events = relay_body(stream, None)
    body._response.headers["Content-Type"] = "application/x-ndjson"
    body.read_ahead()
    assert body._response.raw.chunks_read == 0 and events == []
    assert b"".join(body) == b"".join(stream)
    body.close()
    assert events == ["finished"] and outcome.complete and outcome.lines == 2


def test_a_chunk_before_the_last_frees_nothing_the_last_frees_the_slot_before_it_is_sent():
    """Ollama is done with a request once its whole answer (of a known length) is read:
    not at an earlier chunk, and not only once the client has taken the last one."""
    big = [b"x" * CHUNK_SIZE, b"y"]
    body, _, events = relay_body(big, CHUNK_SIZE + 1)
    body.read_ahead()
    chunks = iter(body)
    assert next(chunks) == big[0]
    assert events == []  # one byte still to come from Ollama
    assert next(chunks) == big[1]
    assert events == ["slot freed"]  # while the last chunk is on its way to the client
    assert next(chunks, None) is None
    body.close()
    assert events == ["slot freed", "finished"]
