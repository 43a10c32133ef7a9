"""Hostile requests to every endpoint of a real gateway: never a 500, never a dropped client.

A fixed seed and count, so a failure replays: bodies (huge, invalid or deep JSON, wrong
types, lone surrogates, NUL), ids, headers (bad Content-Length, two Authorizations,
CRLF) and framing (bad chunk sizes, pipelining), sent on raw keep-alive connections
to `ollama-gw serve` (gunicorn, gevent) on SQLite. A connection the gateway closes after
saying `Connection: close` is fine; one it drops without saying so is an error, since a
pooled client sends its next request on it.
"""
import json
import random
import socket
import time

import pytest

from tests.fake_ollama import FakeOllama
from tests.gateway_process import GatewayProcess

SEED, COUNT = 20261207, 700
IDS = ["1", "2", "3", "0", "9223372036854775807", "9223372036854775808",
       "99999999999999999999999", "²", "１", "-1", "%00", "abc", "ogw_", "%E2%80%AE", "1e3"]
MODEL_BODIES = {
    "/api/generate": {"model": "llama3.2", "prompt": "hi", "stream": False},
    "/generate": {"model": "llama3.2", "prompt": "hi", "stream": False},
    "/api/chat": {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]},
    "/api/embed": {"model": "nomic-embed-text", "input": "hi"},
    "/api/embeddings": {"model": "nomic-embed-text", "prompt": "hi"},
    "/api/show": {"model": "llama3.2"},
    "/api/pull": {"model": "llama3.2", "stream": False},
    "/api/copy": {"source": "llama3.2", "destination": "fuzzed"},
    "/api/delete": {"model": "no-such-model"},
    "/v1/chat/completions": {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]},
    "/v1/completions": {"model": "llama3.2", "prompt": "x"},
    "/v1/embeddings": {"model": "nomic-embed-text", "input": "x"},
    "/v1/responses": {"model": "llama3.2", "input": "x"},
    "/v1/messages": {"model": "llama3.2", "max_tokens": 5,
                     "messages": [{"role": "user", "content": "x"}]},
    "/v1/messages/count_tokens": {"model": "llama3.2",
                                  "messages": [{"role": "user", "content": "x"}]},
    "/v1/images/generations": {"model": "llama3.2", "prompt": "a cat"},
    "/api/keys": {"name": "fuzzed", "role": "user", "rate_limit": "60/minute"},
    "/api/keys/{id}": {"name": "renamed", "rate_limit": "10/minute"},
}
ENDPOINTS = [
    ("GET", "/"), ("GET", "/health"), ("GET", "/health?apikey={key}"), ("GET", "/metrics"),
    ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/assets/{id}"),
    ("GET", "/api/stats"), ("GET", "/api/stats/detailed?since={id}"), ("GET", "/api/admin/stats"),
    ("POST", "/api/keys"), ("GET", "/api/keys"), ("GET", "/api/keys/{id}"),
    ("PATCH", "/api/keys/{id}"), ("DELETE", "/api/keys/{id}"), ("POST", "/api/keys/{id}/rotate"),
    ("GET", "/api/admin/audit?limit={id}"), ("GET", "/ui/"), ("GET", "/ui/keys/{id}"),
    ("POST", "/ui/keys/{id}"), ("POST", "/ui/keys/{id}/revoke"),
    ("POST", "/ui/webhooks/{id}/test"), ("POST", "/ui/webhooks/deliveries/{id}/retry"),
    ("POST", "/ui/signin"), ("GET", "/ui/assets/{id}"),
    ("GET", "/api/tags"), ("GET", "/api/ps"), ("GET", "/api/version"), ("GET", "/api/status"),
    ("GET", "/api/models"), ("GET", "/v1/models"), ("GET", "/v1/models/{id}"),
    ("HEAD", "/api/blobs/sha256:{id}"), ("POST", "/api/signout"), ("POST", "/api/me"),
    ("DELETE", "/api/user/keys/{id}"), ("POST", "/api/x/{id}"), ("GET", "/v1/x/{id}"),
    ("POST", "/v1/audio/transcriptions"), ("POST", "/v1/images/edits"),
    *(("POST", path) for path in MODEL_BODIES if "{id}" not in path and path != "/api/keys"),
    ("DELETE", "/api/delete"),
]
# Transfer framing that leaves the connection's state unknown: the client closes after it.
DESYNCS = {"short-length", "bad-chunk", "pipelined", "bad-length", "no-length"}


class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def closes(self):
        return "close" in self.headers.get("connection", "").lower()


class Dropped(Exception):
    """The connection ended before a whole answer arrived."""


class KeepAliveClient:
    """One HTTP/1.1 connection at a time, reused while the gateway keeps it open."""

    def __init__(self, port):
        self.port, self.sock, self.file, self.fresh = port, None, None, True

    def send(self, raw):
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            self.file, self.fresh = self.sock.makefile("rb"), True
        else:
            self.fresh = False
        self.sock.sendall(raw)

    def read(self, method):
        line = self.file.readline(65537)
        if not line:
            raise Dropped("no answer")
        status = int(line.split()[1])
        headers = {}
        while (line := self.file.readline(65537)) not in (b"\r\n", b"\n"):
            if not line:
                raise Dropped("headers cut")
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif "chunked" in headers.get("transfer-encoding", ""):
            body = self._chunks()
        elif "content-length" in headers:
            body = self.file.read(int(headers["content-length"]))
        else:
            body = self.file.read()
        return Answer(status, headers, body)

    def _chunks(self):
        body = b""
        while True:
            size_line = self.file.readline()
            if not size_line:
                raise Dropped("chunked body cut")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.file.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return body
            body += self.file.read(size)
            self.file.readline()

    def close(self):
        if self.sock is not None:
            self.file.close()
            self.sock.close()
        self.sock = self.file = None


def hostile_body(rng, base):
    """(bytes, label) for a JSON body: the endpoint's own, or one of many wrong ones."""
    kind = rng.choice(["valid", "valid", "huge", "invalid", "types", "surrogate", "nul", "deep",
                       "array", "empty", "big-number", "duplicate", "non-utf8"])
    if kind == "valid":
        return json.dumps(base).encode(), kind
    if kind == "huge":
        return json.dumps({**base, "prompt": "x" * rng.choice([70_000, 1_100_000])}).encode(), kind
    if kind == "invalid":
        return rng.choice([b"{", b"{'model': 1}", b"nul", b'{"model": "a",}', b"\xff\xfe"]), kind
    if kind == "types":
        field = rng.choice(list(base) or ["model"])
        value = rng.choice([None, 1, -1, 1.5, True, [], {}, [1, "a"], "x" * 300, 2**70])
        return json.dumps({**base, field: value}).encode(), kind
    if kind == "surrogate":
        return (json.dumps(base)[:-1] + ', "name": "\\ud800", "prompt": "\\udfff\\ud800"}'
                ).encode(), kind
    if kind == "nul":
        return json.dumps({**base, "model": "llama3.2\x00admin", "x\x00": "\x00"}).encode(), kind
    if kind == "deep":
        depth = rng.choice([500, 5000, 200_000])
        return b'{"model": "llama3.2", "x": ' + b"[" * depth + b"]" * depth + b"}", kind
    if kind == "array":
        return json.dumps([base]).encode(), kind
    if kind == "empty":
        return b"", kind
    if kind == "big-number":
        return b'{"model": "llama3.2", "options": {"num_ctx": 1' + b"0" * 5000 + b"}}", kind
    if kind == "duplicate":
        return b'{"model": "llama3.2", "MODEL": "qwen2.5:0.5b", "model": "phi3"}', kind
    return b'{"model": "llama3.2\xc0\xaf", "prompt": "\xed\xa0\x80"}', kind


def hostile_request(rng, keys):
    """(raw request bytes, method, label, how many answers to expect)."""
    method, path = rng.choice(ENDPOINTS)
    key = rng.choice([keys["admin"], keys["user"], keys["admin"], keys["user"], None,
                      "ogw_" + "A" * 43, "x" * 5000])
    path = path.replace("{key}", keys["user"]).replace("{id}", rng.choice(IDS + [keys["victim"]]))
    if rng.random() < 0.1:
        method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    base = MODEL_BODIES.get(path, MODEL_BODIES.get("/api/keys/{id}" if path.startswith(
        "/api/keys/") else "/api/generate"))
    body, label = (b"", "no body") if method in ("GET", "HEAD") and rng.random() < 0.8 \
        else hostile_body(rng, base)
    headers = [("Host", "127.0.0.1"), ("Content-Type", "application/json")]
    if key is not None:
        headers.append(("Authorization", f"Bearer {key}"))
    framing = rng.choice(["plain"] * 6 + ["chunked", "bad-chunk", "short-length", "no-length",
                                          "pipelined", "two-auth", "crlf", "bad-length",
                                          "huge-header"])
    label = f"{label}/{framing}"
    if framing == "two-auth":
        headers.append(("Authorization", f"Bearer {rng.choice([keys['admin'], 'nope'])}"))
    if framing == "crlf":
        headers.append(("X-API-Key", "a\rb"))
        headers.append(("X-Fuzz", "a\r\nX-Injected: 1"))
    if framing == "huge-header":
        headers.append(("X-Fuzz", "h" * 9000))
    if rng.random() < 0.15:  # a form (the dashboard's, or a transcription's), framed any way
        if rng.random() < 0.5:
            headers[1] = ("Content-Type", "multipart/form-data; boundary=zz")
            body = (b'--zz\r\nContent-Disposition: form-data; name="model"\r\n\r\nphi3\r\n'
                    b"--zz--\r\n")
        else:
            headers[1] = ("Content-Type", "application/x-www-form-urlencoded")
            body = b"key=" + keys["admin"].encode() + b"&csrf=%00&name=" + b"%ED%A0%80" * 3
        headers.append(("Sec-Fetch-Site", "same-origin"))
    if framing in ("chunked", "bad-chunk"):
        headers.append(("Transfer-Encoding", "chunked"))
        size = f"{len(body):x}".encode() if framing == "chunked" else rng.choice(
            [b"zz", b"-1", b"ffffffffffffffffffff", f"{len(body) + 5:x}".encode()])
        framed = (size + b"\r\n" + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"
    else:
        length = {"short-length": max(len(body) - 3, 0), "bad-length": rng.choice(
            ["-1", "abc", "1, 2", "99999999999999999999"])}.get(framing, len(body))
        if framing != "no-length":
            headers.append(("Content-Length", str(length)))
        framed = body
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    raw = head.encode("utf-8", "surrogateescape") + b"\r\n" + framed
    if framing == "pipelined":
        follow = b"GET /api/version HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + \
            keys["user"].encode() + b"\r\n\r\n"
        return raw + follow + follow, method, label, 3
    return raw, method, label, 1


def run_fuzz(port, keys, seed=SEED, count=COUNT, clients=4):
    """{'statuses': {status: n}, 'fives': [...], 'drops': [...]} over `count` requests."""
    rng = random.Random(seed)
    pool = [KeepAliveClient(port) for _ in range(clients)]
    statuses, fives, drops = {}, [], []
    previous = {}  # client -> (label, status) of the last answer on its connection
    for number in range(count):
        client = pool[number % clients]
        raw, method, label, answers = hostile_request(rng, keys)
        desync = label.split("/")[-1] in DESYNCS
        try:
            client.send(raw)
            for i in range(answers):
                answer = client.read(method if i == 0 else "GET")
                statuses[answer.status] = statuses.get(answer.status, 0) + 1
                previous[client] = (label, method, raw.split(b" ", 2)[1][:60], answer.status)
                if answer.status == 500:
                    fives.append((number, method, raw[:120], label, answer.status,
                                  answer.body[:300]))
                if answer.closes:
                    client.close()
                    break
        except (Dropped, OSError) as exc:
            # Garbage framing may end a connection; a well-formed request never may, and a
            # reused connection must not have been closed after an answer that kept it.
            if not desync or not client.fresh:
                drops.append((number, method, raw[:120], label, repr(exc),
                              "fresh" if client.fresh else ("after", previous.get(client))))
            client.close()
            continue
        if desync:
            client.close()
    for client in pool:
        client.close()
    return {"statuses": statuses, "fives": fives, "drops": drops}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """(gateway, keys): a gunicorn-run gateway on SQLite, with an admin, a user and a victim."""
    directory = tmp_path_factory.mktemp("fuzz")
    with FakeOllama() as fake, GatewayProcess(
            f"sqlite:///{directory}/gateway.db", fake.url, workers=2, ui="true",
            client_body_timeout="2", upstream_max_concurrent="0") as gw:
        keys = {
            "admin": gw.add_key("--name", "fuzz-admin", "--role", "admin",
                                "--rate-limit", "none")["key"],
            "user": gw.add_key("--name", "fuzz-user", "--models", "llama3.2*,nomic-embed-text",
                               "--rate-limit", "none")["key"],
        }
        keys["victim"] = str(gw.add_key("--name", "victim")["id"])
        gw.start(directory / "gateway.log")
        yield gw, keys


@pytest.fixture(scope="module")
def fuzzed(gateway):
    gw, keys = gateway
    started = time.monotonic()
    result = run_fuzz(gw.port, keys)
    result["seconds"] = time.monotonic() - started
    result["log"] = gw.log()
    return result


def test_no_request_gets_a_500(fuzzed):
    assert sum(fuzzed["statuses"].values()) + len(fuzzed["drops"]) >= COUNT
    assert fuzzed["fives"] == [], fuzzed["fives"][:5]
    assert "Traceback" not in fuzzed["log"], fuzzed["log"][-3000:]


def test_keep_alive_clients_lose_no_connection(fuzzed):
    assert fuzzed["drops"] == [], (len(fuzzed["drops"]), fuzzed["drops"][:5])


@pytest.mark.parametrize("head, body", [
    # Found by the fuzz with other seeds: each was a 500.
    ("PATCH /api/keys/{victim} HTTP/1.1\r\nTransfer-Encoding: chunked", b"-1\r\n{}\r\n0\r\n\r\n"),
    ("PATCH /api/keys/{victim} HTTP/1.1\r\nContent-Length: 200002",
     b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("HEAD /api/blobs/sha256:00 HTTP/1.1\r\nContent-Length: 99999999999999999999", b"{}"),
    ("POST /api/blobs/sha256:00 HTTP/1.1\r\nContent-Length: 99999999999999999999", b"{}"),
    ("POST /ui/signin HTTP/1.1\r\nSec-Fetch-Site: same-origin\r\nTransfer-Encoding: chunked"
     "\r\nContent-Type: application/x-www-form-urlencoded", b"zz\r\nkey=a\r\n0\r\n\r\n"),
    ("POST /ui/signin HTTP/1.1\r\nSec-Fetch-Site: same-origin\r\nTransfer-Encoding: chunked"
     "\r\nContent-Type: multipart/form-data; boundary=zz", b"-1\r\n--zz\r\n0\r\n\r\n"),
], ids=["bad chunk size", "deep JSON", "HEAD past sys.maxsize", "POST past sys.maxsize",
        "form, bad chunk size", "multipart, bad chunk size"])
def test_bodies_the_fuzz_found_are_refused_not_500(gateway, head, body):
    gw, keys = gateway
    client = KeepAliveClient(gw.port)
    try:
        if "Content-Type" not in head:
            head += "\r\nContent-Type: application/json"
        client.send(head.format(**keys).encode() + b"\r\nHost: x\r\nAuthorization: Bearer "
                    + keys["admin"].encode() + b"\r\n\r\n" + body)
        answer = client.read(head.split()[0])
    finally:
        client.close()
    assert 400 <= answer.status < 500, (answer.status, answer.body)
