"""Ollama's native API through the gateway, relayed to a fake Ollama on a real local socket."""
import datetime
import hashlib
import json
import time

import pytest
import requests

from app import create_app
from app.keys.registry import revoke_key
from app.store.models import ApiKey, utcnow
from tests.conftest import auth_header
from tests.fake_ollama import fake_text

GENERATE = {"model": "llama3.2", "prompt": "why is the sky blue?"}
BLOB = bytes(range(256)) * 800  # 200 KiB
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


@pytest.fixture
def user_key(make_key):
    return make_key("user")[0]


@pytest.fixture
def admin_key(make_key):
    return make_key("admin", role="admin")[0]


def error_of(response):
    """The text of a native `{"error": "..."}` answer; fails on any other shape."""
    assert response.mimetype == "application/json", response.data
    body = response.get_json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


def ndjson(data):
    lines = data.decode().splitlines()
    assert lines and all(lines), data
    return [json.loads(line) for line in lines]


def without_timings(obj):
    """An Ollama answer minus the fields that differ between two identical requests."""
    return {k: v for k, v in obj.items() if k != "created_at" and not k.endswith("_duration")}


def start_of_fresh_window(period, margin=10):
    """Wait out the last moments of a fixed rate-limit window so a test fits in one.

    A margin of seconds, not milliseconds: the machine may be busy.
    """
    left = period - time.time() % period
    if left < margin:
        time.sleep(left + 0.05)


# --- probes without a key ------------------------------------------------------------------

@pytest.mark.parametrize("method, body", [("GET", b"Ollama is running"), ("HEAD", b"")])
def test_root_answers_like_ollama_without_a_key(client, fake, method, body):
    response = client.open("/", method=method)
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.data == body
    assert fake.requests == []


def test_health_reports_database_and_ollama(client):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert (body["status"], body["database"], body["ollama_backend"]) == (
        "healthy", "ok", "healthy")


def test_health_says_ollama_is_unreachable_but_stays_up(make_client):
    response = make_client(upstreams=("http://127.0.0.1:1",)).get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert (body["status"], body["database"], body["ollama_backend"]) == (
        "degraded", "ok", "unreachable")


# --- authentication ------------------------------------------------------------------------

def _no_key(make_key):
    return {}


def _wrong_key(make_key):
    make_key()
    return auth_header("ogw_" + "x" * 43)


def _basic_auth(make_key):
    return {"Authorization": "Basic dXNlcjpwYXNzd29yZA=="}


def _empty_bearer(make_key):
    return {"Authorization": "Bearer   "}


def _revoked_key(make_key):
    secret, row = make_key()
    revoke_key(row.id)
    return auth_header(secret)


def _expired_key(make_key):
    secret, row = make_key(expires="1h")
    past = utcnow() - datetime.timedelta(minutes=1)
    ApiKey.update(expires_at=past).where(ApiKey.id == row.id).execute()
    return auth_header(secret)


@pytest.mark.parametrize("credentials, problem", [
    (_no_key, "missing API key"),
    (_wrong_key, "invalid API key"),
    (_basic_auth, "missing API key"),
    (_empty_bearer, "missing API key"),
    (_revoked_key, "has been revoked"),
    (_expired_key, "expired"),
], ids=["no key", "wrong key", "basic auth", "empty bearer", "revoked", "expired"])
@pytest.mark.parametrize("method, path", [("POST", "/api/generate"), ("GET", "/api/tags")])
def test_request_without_a_valid_key_gets_401(client, fake, make_key, credentials, problem,
                                              method, path):
    headers = credentials(make_key)
    response = client.open(path, method=method, headers=headers,
                           json=GENERATE if method == "POST" else None)
    assert response.status_code == 401
    assert problem in error_of(response)
    assert fake.requests == []


def test_401_for_a_missing_key_says_how_to_send_one(client):
    message = error_of(client.post("/api/generate", json=GENERATE))
    assert "Authorization: Bearer" in message and "X-API-Key" in message


# --- key sources, and the key never reaching Ollama ----------------------------------------

OPTIONS = {"system": "answer in one word", "format": "json", "keep_alive": "5m",
           "options": {"temperature": 0, "num_predict": 3, "stop": ["\n"]}, "stream": False}


def _present(source, secret, body):
    """(headers, query, body) presenting `secret` the way `source` says."""
    if source == "bearer":
        return auth_header(secret), {}, body
    if source == "bearer-lowercase":
        return {"Authorization": f"bearer {secret}"}, {}, body
    if source == "x-api-key":
        return {"X-API-Key": secret}, {}, body
    if source == "json-body":
        return {}, {}, {**body, "apikey": secret}
    return {}, {"apikey": secret}, body


@pytest.mark.parametrize(
    "source", ["bearer", "bearer-lowercase", "x-api-key", "json-body", "query"])
def test_key_from_each_source_is_accepted_and_never_reaches_ollama(client, fake, user_key, source):
    sent_body = {"model": "llama3.2", "prompt": "hi", **OPTIONS}
    headers, query, body = _present(source, user_key, sent_body)
    response = client.post("/api/generate", json=body, headers=headers, query_string=query)

    assert response.status_code == 200, response.data
    assert response.get_json()["done"] is True
    received = fake.requests[-1]
    assert "authorization" not in received.headers
    assert "x-api-key" not in received.headers
    assert received.path == "/api/generate"
    assert user_key.encode() not in received.body
    assert received.json() == sent_body  # every other field arrives unchanged


def test_header_key_wins_and_a_stray_body_apikey_is_still_stripped(client, fake, user_key):
    body = {**GENERATE, "stream": False, "apikey": "ogw_not-a-real-key"}
    response = client.post("/api/generate", json=body, headers={"X-API-Key": user_key})
    assert response.status_code == 200
    assert "apikey" not in fake.requests[-1].json()


def test_query_reaches_ollama_without_the_legacy_key(client, fake, user_key):
    response = client.get(f"/api/tags?verbose=1&apikey={user_key}&name=a%2Fb")
    assert response.status_code == 200
    assert fake.requests[-1].path == "/api/tags?verbose=1&name=a%2Fb"


@pytest.mark.parametrize("source", ["json-body", "query"])
def test_legacy_key_forms_are_refused_when_disabled(make_client, make_key, fake, source):
    client = make_client(legacy_apikey=False)
    secret, _ = make_key()
    headers, query, body = _present(source, secret, GENERATE)
    response = client.post("/api/generate", json=body, headers=headers, query_string=query)
    assert response.status_code == 401
    assert "missing API key" in error_of(response)
    assert fake.requests == []


# --- authorization -------------------------------------------------------------------------

ADMIN_ONLY = [
    ("POST", "/api/pull", {"model": "llama3.2", "stream": False}, 200),
    ("POST", "/api/push", {"model": "llama3.2", "stream": False}, 200),
    ("POST", "/api/create", {"model": "mine", "from": "llama3.2", "stream": False}, 200),
    ("POST", "/api/copy", {"source": "llama3.2", "destination": "llama3.2-copy"}, 200),
    ("DELETE", "/api/delete", {"model": "qwen2.5:0.5b"}, 200),
    ("POST", f"/api/blobs/{BLOB_DIGEST}", BLOB, 201),
    ("HEAD", f"/api/blobs/{BLOB_DIGEST}", None, 404),
]
ADMIN_IDS = ["pull", "push", "create", "copy", "delete", "blob upload", "blob check"]


def _send(client, method, path, body, secret):
    if isinstance(body, bytes):
        return client.open(path, method=method, data=body, headers=auth_header(secret))
    return client.open(path, method=method, json=body, headers=auth_header(secret))


@pytest.mark.parametrize("method, path, body, ollama_status", ADMIN_ONLY, ids=ADMIN_IDS)
def test_model_management_is_refused_to_user_keys(client, fake, user_key, method, path, body,
                                                  ollama_status):
    response = _send(client, method, path, body, user_key)
    assert response.status_code == 403
    if method != "HEAD":  # a HEAD answer has no body to carry the message
        assert "needs an admin key" in error_of(response)
    assert fake.requests == []


@pytest.mark.parametrize("method, path, body, ollama_status", ADMIN_ONLY, ids=ADMIN_IDS)
def test_model_management_reaches_ollama_with_an_admin_key(client, fake, admin_key, method, path,
                                                           body, ollama_status):
    response = _send(client, method, path, body, admin_key)
    assert response.status_code == ollama_status, response.data
    assert (fake.requests[-1].method, fake.requests[-1].path) == (method, path)


@pytest.mark.parametrize("allowed, endpoint, model, status", [
    ("llama3.2", "/api/generate", "llama3.2", 200),
    ("llama3.2", "/api/generate", "llama3.2:latest", 200),
    ("llama3.2", "/api/chat", "llama3.2", 200),
    ("llama3.2", "/api/generate", "qwen2.5:0.5b", 403),
    ("llama3.2", "/api/generate", "llama3.2:1b", 403),
    ("llama3.2", "/api/show", "qwen2.5:0.5b", 403),
    ("llama3.2", "/api/embed", "nomic-embed-text", 403),
    ("qwen*", "/api/generate", "qwen2.5:0.5b", 200),
    ("qwen*", "/api/generate", "llama3.2", 403),
    ("llama3.2,nomic-embed-text", "/api/embed", "nomic-embed-text", 200),
])
def test_model_allow_list_decides_which_models_a_key_may_use(client, fake, make_key, allowed,
                                                             endpoint, model, status):
    secret, _ = make_key(models=allowed)
    body = {"model": model, "prompt": "hi", "input": "hi", "stream": False,
            "messages": [{"role": "user", "content": "hi"}]}
    response = client.post(endpoint, json=body, headers=auth_header(secret))
    assert response.status_code == status, response.data
    if status == 403:
        assert repr(model) in error_of(response)
        assert fake.requests == []
    else:
        assert fake.requests[-1].json()["model"] == model


def test_show_by_name_field_is_checked_against_the_allow_list(client, fake, make_key):
    secret, _ = make_key(models="llama3.2")
    response = client.post("/api/show", json={"name": "qwen2.5:0.5b"}, headers=auth_header(secret))
    assert response.status_code == 403
    assert fake.requests == []


@pytest.mark.parametrize("allowed, listed", [
    ("llama3.2", ["llama3.2:latest"]),
    ("qwen*", ["qwen2.5:0.5b"]),
    (None, ["llama3.2:latest", "qwen2.5:0.5b", "nomic-embed-text:latest"]),
])
def test_tags_list_only_the_models_a_key_may_use(client, make_key, allowed, listed):
    secret, _ = make_key(models=allowed)
    response = client.get("/api/tags", headers=auth_header(secret))
    assert response.status_code == 200
    assert [m["name"] for m in response.get_json()["models"]] == listed


def test_ps_lists_only_the_loaded_models_a_key_may_use(client, admin_key, make_key):
    for model in ("llama3.2", "qwen2.5:0.5b"):
        client.post("/api/generate", json={"model": model, "prompt": "hi", "stream": False},
                    headers=auth_header(admin_key))
    secret, _ = make_key(models="qwen*")
    everything = client.get("/api/ps", headers=auth_header(admin_key)).get_json()["models"]
    narrowed = client.get("/api/ps", headers=auth_header(secret)).get_json()["models"]
    assert sorted(m["name"] for m in everything) == ["llama3.2:latest", "qwen2.5:0.5b"]
    assert [m["name"] for m in narrowed] == ["qwen2.5:0.5b"]


# --- relay fidelity ------------------------------------------------------------------------

def test_generate_streams_ndjson_when_stream_is_absent(client, fake, user_key):
    fake.tokens = 4
    response = client.post("/api/generate", json=GENERATE, headers=auth_header(user_key))

    assert response.status_code == 200
    assert response.mimetype == "application/x-ndjson"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in response.headers
    lines = ndjson(response.data)
    assert [line["done"] for line in lines] == [False] * 4 + [True]
    assert "".join(line["response"] for line in lines) == fake_text(4)
    assert lines[-1]["eval_count"] == 4
    assert "stream" not in fake.requests[-1].json()  # Ollama's default (streaming) is kept


def test_generate_with_stream_false_answers_one_json_object(client, fake, user_key):
    fake.tokens = 3
    response = client.post("/api/generate", json={**GENERATE, "stream": False},
                           headers=auth_header(user_key))
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert (body["response"], body["done"], body["eval_count"]) == (fake_text(3), True, 3)


def test_chat_streams_the_assistant_message(client, fake, user_key):
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello there"}]}
    response = client.post("/api/chat", json=body, headers=auth_header(user_key))
    assert response.status_code == 200
    lines = ndjson(response.data)
    assert "".join(line["message"]["content"] for line in lines) == fake_text(fake.tokens)
    assert lines[-1]["done"] is True and lines[-1]["prompt_eval_count"] == 2


def test_embed_answers_one_vector_per_input(client, user_key):
    response = client.post("/api/embed", json={"model": "nomic-embed-text", "input": ["a", "b"]},
                           headers=auth_header(user_key))
    assert response.status_code == 200
    embeddings = response.get_json()["embeddings"]
    assert len(embeddings) == 2 and all(len(v) == 16 for v in embeddings)


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/api/version", None),
    ("GET", "/api/tags", None),
    ("GET", "/api/ps", None),
    ("POST", "/api/show", b'{"model": "llama3.2"}'),
    ("POST", "/api/show", b'{"model":"nope"}'),
    ("POST", "/api/generate", b'{"model": "nope", "prompt": "hi"}'),
    ("POST", "/api/chat", b'{"model": "nope", "messages": []}'),
    ("POST", "/api/embed", b'{"model": "llama3.2", "input": 5}'),
    ("POST", "/api/generate", b'{"model": "nomic-embed-text", "prompt": "hi"}'),
    ("GET", "/api/no-such-endpoint", None),
    ("POST", "/api/no-such-endpoint", b"{}"),
])
def test_answer_is_relayed_byte_for_byte(client, fake, admin_key, method, path, body):
    # An admin key: unknown paths are relayed for admin keys only (app/proxy/doors.py).
    direct = requests.request(method, fake.url + path, data=body, timeout=60)
    response = client.open(path, method=method, data=body, headers=auth_header(admin_key))
    assert response.status_code == direct.status_code
    assert response.headers["Content-Type"] == direct.headers["Content-Type"]
    assert response.data == direct.content


@pytest.mark.parametrize("path, body, status, message", [
    ("/api/generate", {"model": "nope", "prompt": "hi"}, 404, "model 'nope' not found"),
    ("/api/chat", {"model": "nope", "messages": []}, 404,
     'model "nope" not found, try pulling it first'),
    ("/api/show", {"model": "nope"}, 404, "model 'nope' not found"),
])
def test_unknown_model_gets_ollamas_own_error(client, user_key, path, body, status, message):
    response = client.post(path, json=body, headers=auth_header(user_key))
    assert response.status_code == status
    assert error_of(response) == message


@pytest.mark.parametrize("path, body", [
    ("/api/generate", {**GENERATE, "options": {"seed": 1}}),
    ("/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}),
])
def test_stream_carries_the_same_lines_as_ollama_sends(client, fake, user_key, path, body):
    direct = requests.post(fake.url + path, json=body, timeout=60)
    response = client.post(path, json=body, headers=auth_header(user_key))
    assert [without_timings(x) for x in ndjson(response.data)] == [
        without_timings(x) for x in ndjson(direct.content)]


def test_stream_reaches_the_client_before_ollama_finishes(client, fake, user_key):
    fake.tokens, fake.token_delay = 4, 0.1
    response = client.post("/api/generate", json=GENERATE, headers=auth_header(user_key),
                           buffered=False)
    chunks = iter(response.response)
    first = json.loads(next(chunks))
    assert first["response"] == "word0" and first["done"] is False
    assert fake.active_streams == 1  # Ollama is still generating the rest
    rest = ndjson(b"".join(chunks))
    response.close()
    assert rest[-1]["done"] is True and rest[-1]["eval_count"] == 4


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, fragment", [
    ("/api/generate", b'{"model": "llama3.2", ', "request body is not valid JSON"),
    ("/api/generate", b"\xff\xfe{}", "request body is not valid JSON"),
    ("/api/generate", b'[{"model": "llama3.2"}]', "request body must be a JSON object"),
    ("/api/generate", b'"llama3.2"', "request body must be a JSON object"),
    ("/api/generate", b'{"model": 5, "prompt": "hi"}', "'model' must be a string"),
    ("/api/show", b'{"name": ["llama3.2"]}', "'name' must be a string"),
])
def test_malformed_body_gets_400_and_never_reaches_ollama(client, fake, user_key, path, body,
                                                          fragment):
    response = client.post(path, data=body, content_type="application/json",
                           headers=auth_header(user_key))
    assert response.status_code == 400
    assert fragment in error_of(response)
    assert fake.requests == []


def test_body_over_max_body_bytes_gets_413(make_client, make_key, fake):
    client = make_client(max_body_bytes=1000)
    secret, _ = make_key()
    response = client.post("/api/generate", json={**GENERATE, "prompt": "x" * 2000},
                           headers=auth_header(secret))
    assert response.status_code == 413
    assert "larger than the gateway's limit of 1000 bytes" in error_of(response)
    assert fake.requests == []


def test_unknown_gateway_path_gets_a_json_404(client):
    response = client.get("/nope")
    assert response.status_code == 404
    assert "/nope is not an endpoint" in error_of(response)


# --- upstream problems ---------------------------------------------------------------------

@pytest.mark.parametrize("body", [GENERATE, {**GENERATE, "stream": False}],
                         ids=["streamed", "not streamed"])
def test_ollama_down_gets_502_without_revealing_its_address(make_client, make_key, body):
    client = make_client(upstreams=("http://127.0.0.1:1",))
    secret, _ = make_key()
    response = client.post("/api/generate", json=body, headers=auth_header(secret))
    assert response.status_code == 502
    message = error_of(response)
    assert "cannot reach the Ollama server" in message and "OLLAMA_URL" in message
    assert "127.0.0.1" not in message and "http://" not in message


def test_ollama_slower_than_read_timeout_gets_504(make_client, make_key, fake):
    fake.first_byte_delay = 1.5
    client = make_client(read_timeout=0.5)
    secret, _ = make_key()
    started = time.monotonic()
    response = client.post("/api/generate", json=GENERATE, headers=auth_header(secret))
    assert time.monotonic() - started < 1.4
    assert response.status_code == 504
    message = error_of(response)
    assert "no answer within 0.5 s" in message and "read_timeout" in message
    assert fake.url not in message


def test_ollama_crashing_mid_stream_ends_the_stream_with_an_error_line(client, fake, user_key):
    fake.fail_after_tokens = 2
    response = client.post("/api/generate", json=GENERATE, headers=auth_header(user_key))
    assert response.status_code == 200  # the status was sent before Ollama failed
    lines = ndjson(response.data)
    assert [line.get("response") for line in lines[:2]] == ["word0", " word1"]
    assert len(lines) == 3 and set(lines[2]) == {"error"}
    assert "stopped answering" in lines[2]["error"]


def test_ollama_crashing_before_answering_gets_502(client, fake, user_key):
    fake.fail_after_tokens = 0
    response = client.post("/api/generate", json={**GENERATE, "stream": False},
                           headers=auth_header(user_key))
    assert response.status_code == 502
    assert "cannot reach the Ollama server" in error_of(response)


# --- rate limits ---------------------------------------------------------------------------

def test_rate_limit_counts_down_then_answers_429(client, fake, make_key):
    secret, _ = make_key(rate_limit="3/minute")
    start_of_fresh_window(60)
    remaining = []
    for _ in range(3):
        response = client.get("/api/version", headers=auth_header(secret))
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Limit"] == "3"
        remaining.append(response.headers["X-RateLimit-Remaining"])
    assert remaining == ["2", "1", "0"]

    refused = client.get("/api/version", headers=auth_header(secret))
    assert refused.status_code == 429
    assert "rate limit exceeded" in error_of(refused) and "3/minute" in error_of(refused)
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert int(refused.headers["X-RateLimit-Reset"]) > time.time()
    assert len(fake.requests) == 3


@pytest.mark.parametrize("refused_request, status", [
    (("POST", "/api/pull", {"model": "llama3.2"}), 403),
    (("POST", "/api/generate", {"model": "qwen2.5:0.5b", "prompt": "hi"}), 403),
    (("POST", "/api/generate", b"{oops"), 400),
], ids=["admin endpoint", "model not allowed", "bad json"])
def test_refused_requests_do_not_use_up_the_rate_limit(client, make_key, refused_request, status):
    secret, _ = make_key(rate_limit="3/minute", models="llama3.2")
    start_of_fresh_window(60)
    method, path, body = refused_request
    assert _send(client, method, path, body, secret).status_code == status
    for expected in ("2", "1", "0"):
        response = client.get("/api/version", headers=auth_header(secret))
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Remaining"] == expected


@pytest.mark.parametrize("finish", ["read to the end", "hang up"])
def test_max_concurrent_refuses_a_second_stream_until_the_first_ends(client, fake, make_key,
                                                                    finish):
    secret, _ = make_key(max_concurrent=1)
    fake.tokens, fake.token_delay = 4, 0.1
    first = client.post("/api/generate", json=GENERATE, headers=auth_header(secret),
                        buffered=False)
    assert first.status_code == 200

    second = client.post("/api/generate", json=GENERATE, headers=auth_header(secret))
    assert second.status_code == 429
    assert "too many concurrent requests" in error_of(second)
    assert second.headers["Retry-After"] == "1"

    if finish == "hang up":
        first.close()
        assert fake.wait_for_cancellation(2.0)  # Ollama was told to stop generating
    else:
        assert ndjson(first.get_data())[-1]["done"] is True
        first.close()
    fake.token_delay = 0
    third = client.post("/api/generate", json=GENERATE, headers=auth_header(secret),
                        buffered=True)
    assert third.status_code == 200
    assert ndjson(third.data)[-1]["done"] is True


# --- blob uploads --------------------------------------------------------------------------

def test_admin_uploads_a_blob(client, fake, admin_key):
    response = client.post(f"/api/blobs/{BLOB_DIGEST}", data=BLOB, headers=auth_header(admin_key))
    assert response.status_code == 201
    assert fake.blobs == {BLOB_DIGEST: len(BLOB)}


def test_blob_upload_is_exempt_from_max_body_bytes(make_client, make_key, fake):
    client = make_client(max_body_bytes=1000)
    secret, _ = make_key(role="admin")
    response = client.post(f"/api/blobs/{BLOB_DIGEST}", data=BLOB, headers=auth_header(secret))
    assert response.status_code == 201
    assert fake.blobs == {BLOB_DIGEST: len(BLOB)}


def test_blob_with_the_wrong_digest_gets_ollamas_400(client, fake, admin_key):
    wrong = "sha256:" + "0" * 64
    response = client.post(f"/api/blobs/{wrong}", data=BLOB, headers=auth_header(admin_key))
    assert response.status_code == 400
    assert error_of(response).startswith(f'digest mismatch, expected "{wrong}"')
    assert fake.blobs == {}


def test_blob_upload_with_a_legacy_query_key_does_not_pass_the_key_on(client, fake, admin_key):
    response = client.post(f"/api/blobs/{BLOB_DIGEST}?apikey={admin_key}", data=BLOB)
    assert response.status_code == 201
    assert fake.requests[-1].path == f"/api/blobs/{BLOB_DIGEST}"


@pytest.mark.parametrize("body", [b'{"model": "llama3.2"', b"[1, 2]", b'{"model": 5}'])
def test_a_caller_without_a_key_learns_only_that_it_needs_one(client, fake, body):
    response = client.post("/api/generate", data=body, content_type="application/json")
    assert response.status_code == 401
    assert "missing API key" in error_of(response)


def test_model_and_name_are_both_checked_against_the_allow_list(client, make_key, fake):
    secret, _ = make_key(models="llama3.2")
    response = client.post("/api/show", headers=auth_header(secret),
                           json={"model": "llama3.2", "name": "qwen2.5:0.5b"})
    assert response.status_code == 403
    assert "qwen2.5:0.5b" in error_of(response)
    assert fake.requests == []


def test_a_head_request_gives_its_concurrency_slot_back(client, make_key, fake):
    secret, _ = make_key(max_concurrent=1)
    for _ in range(3):  # the second would be refused if the first had kept its slot
        response = client.head("/api/tags", headers=auth_header(secret))
        assert response.status_code == 200
        response.close()


def test_a_database_outage_is_a_503_that_says_what_to_check(fake, tmp_path):
    from app.config import Settings

    app = create_app(Settings(data_dir=str(tmp_path), upstreams=(fake.url,),
                              database_url="postgresql://postgres@127.0.0.1:1/gone"))
    response = app.test_client().post("/api/generate", json=GENERATE,
                                      headers=auth_header("ogw_anything"))
    assert response.status_code == 503
    assert "DATABASE_URL" in error_of(response)
    assert response.headers["Retry-After"]
    health = app.test_client().get("/health")
    assert health.status_code == 503 and health.get_json()["database"] == "unavailable"


@pytest.mark.parametrize("path", [
    "/api/./pull", "/api/x/../pull", "/api/x%2F..%2Fpull", "/api/pull%3Fa=1", "/api/pull%23",
    "/api/pull/", "/api/./blobs/sha256:00", "/api/./tags", "/api//pull",
])
def test_admin_endpoints_cannot_be_reached_by_spelling_the_path_differently(
        client, user_key, fake, path):
    response = client.post(path, headers=auth_header(user_key), json={"model": "llama3.2"})
    assert response.status_code in (400, 404)
    message = error_of(response)
    assert "malformed path" in message or "is not an endpoint" in message
    assert fake.requests == []


@pytest.mark.parametrize("body", [
    {"MODEL": "qwen2.5:0.5b", "prompt": "hi"},
    {"model": "llama3.2", "Model": "qwen2.5:0.5b", "prompt": "hi"},
    {"model": "llama3.2", "NAME": "qwen2.5:0.5b", "prompt": "hi"},
], ids=["upper", "both, last wins in Go", "name"])
def test_the_allow_list_sees_model_fields_in_any_letter_case(client, make_key, fake, body):
    # Ollama decodes JSON with Go's encoding/json, which matches field names regardless of case.
    secret, _ = make_key(models="llama3.2")
    response = client.post("/api/generate", headers=auth_header(secret), json=body)
    assert response.status_code == 403
    assert fake.requests == []


def test_a_model_field_of_the_wrong_type_in_any_case_is_refused(client, user_key, fake):
    response = client.post("/api/generate", headers=auth_header(user_key), json={"Model": 5})
    assert response.status_code == 400
    assert "'Model' must be a string" in error_of(response)


def test_a_legacy_key_field_in_any_letter_case_is_not_forwarded(client, user_key, fake):
    body = {**GENERATE, "stream": False, "APIKEY": user_key, "ApiKey": user_key}
    assert client.post("/api/generate", headers=auth_header(user_key), json=body).status_code == 200
    assert user_key.encode() not in fake.requests[-1].body
    query = client.get(f"/api/tags?ApiKey={user_key}", headers=auth_header(user_key))
    assert query.status_code == 200 and user_key not in fake.requests[-1].path


def test_deeply_nested_json_is_a_400_not_a_crash(client, user_key, fake):
    body = b"[" * 100_000 + b"]" * 100_000
    response = client.post("/api/generate", data=body, headers=auth_header(user_key),
                           content_type="application/json")
    assert response.status_code == 400
    assert "not valid JSON" in error_of(response)


def test_refusals_of_a_limited_key_still_say_where_it_stands(client, make_key, fake):
    secret, _ = make_key(rate_limit="5/minute", models="llama3.2")
    start_of_fresh_window(60)
    client.post("/api/generate", headers=auth_header(secret), json={**GENERATE, "stream": False})
    forbidden = client.post("/api/generate", headers=auth_header(secret),
                            json={"model": "qwen2.5:0.5b"})
    malformed = client.post("/api/generate", headers=auth_header(secret), data=b"{",
                            content_type="application/json")
    for response in (forbidden, malformed):
        assert response.status_code in (400, 403)
        assert response.headers["X-RateLimit-Limit"] == "5"
        assert response.headers["X-RateLimit-Remaining"] == "4"  # the refusals used nothing


def test_a_concurrency_refusal_reports_the_true_remaining_count(client, make_key, fake):
    secret, _ = make_key(rate_limit="10/minute", max_concurrent=1)
    start_of_fresh_window(60)
    fake.token_delay = 0.05
    first = client.post("/api/generate", headers=auth_header(secret), json=GENERATE,
                        buffered=False)
    refused = client.post("/api/generate", headers=auth_header(secret), json=GENERATE)
    assert refused.status_code == 429
    assert refused.headers["X-RateLimit-Remaining"] == "9"
    first.close()


def test_head_of_a_filtered_model_list_answers_like_get_without_a_body(client, make_key, fake):
    secret, _ = make_key(models="llama3.2")
    response = client.head("/api/tags", headers=auth_header(secret))
    assert response.status_code == 200
    assert response.data == b""


# --- hardening (issue 6) -------------------------------------------------------------------

@pytest.mark.parametrize("body, with_key, status, fragment", [
    (b'{"apikey": "\\ud800", "model": "llama3.2"}', False, 401, "invalid API key"),
    (b'{"model": "llama3.2", "seed": ' + b"9" * 4301 + b"}", True, 400, "not valid JSON"),
    (b'{"model": "llama3.2", "seed": ' + b"9" * 4301 + b"}", False, 401, "missing API key"),
], ids=["lone surrogate key", "huge number", "huge number without a key"])
def test_inputs_that_once_crashed_the_gateway_are_4xx(client, user_key, fake, body, with_key,
                                                       status, fragment):
    headers = auth_header(user_key) if with_key else {}
    response = client.post("/api/generate", data=body, headers=headers,
                           content_type="application/json")
    assert response.status_code == status
    assert fragment in error_of(response)
    assert fake.requests == []


@pytest.mark.parametrize("method, path, allowed", [
    ("GET", "/api/generate", "POST"),
    ("DELETE", "/api/chat", "POST"),
    ("POST", "/api/tags", "GET, HEAD"),
    ("GET", "/api/delete", "DELETE"),
    ("PUT", "/api/blobs/sha256:00", "HEAD, POST"),
])
def test_a_wrong_method_on_a_known_endpoint_is_a_json_405(client, user_key, fake, method, path,
                                                          allowed):
    response = client.open(path, method=method, headers=auth_header(user_key))
    assert response.status_code == 405
    assert response.headers["Allow"] == allowed
    assert f"{method} is not allowed on {path}" in error_of(response)
    assert fake.requests == []


def test_an_unknown_endpoint_is_relayed_for_an_admin_key(client, admin_key, fake):
    response = client.get("/api/some-future-endpoint", headers=auth_header(admin_key))
    assert response.status_code == 404  # Ollama's own answer
    assert fake.requests[-1].path == "/api/some-future-endpoint"


def test_with_legacy_keys_off_an_apikey_field_still_never_reaches_ollama(make_client, make_key,
                                                                         fake):
    client = make_client(legacy_apikey=False)
    secret, _ = make_key()
    response = client.post(f"/api/generate?apikey={secret}", headers=auth_header(secret),
                           json={**GENERATE, "stream": False, "ApiKey": secret})
    assert response.status_code == 200
    assert secret.encode() not in fake.requests[-1].body
    assert secret not in fake.requests[-1].path


@pytest.mark.parametrize("model, status", [
    ("LLAMA3.2", 200), ("Llama3.2:Latest", 200), ("QWEN2.5:0.5b", 403),
])
def test_the_allow_list_ignores_letter_case_as_ollama_does(client, make_key, fake, model, status):
    # Ollama resolves model names without regard to case: LLAMA3.2 runs llama3.2.
    secret, _ = make_key(models="llama3.2")
    response = client.post("/api/generate", headers=auth_header(secret),
                           json={"model": model, "prompt": "hi", "stream": False})
    assert response.status_code == status


def test_a_cached_key_is_trusted_for_key_cache_seconds(make_client, make_key, fake):
    secret, row = make_key()
    trusting = make_client(key_cache_seconds=300)
    careful = make_client(key_cache_seconds=0.000001)
    for client in (trusting, careful):
        assert client.get("/api/version", headers=auth_header(secret)).status_code == 200
    revoke_key(row.id)
    assert trusting.get("/api/version", headers=auth_header(secret)).status_code == 200
    assert careful.get("/api/version", headers=auth_header(secret)).status_code == 401


def test_last_used_at_is_stamped_once_a_minute_not_on_every_request(client, make_key, fake):
    secret, row = make_key()
    assert ApiKey.get_by_id(row.id).last_used_at is None
    client.get("/api/version", headers=auth_header(secret))
    stamped = ApiKey.get_by_id(row.id).last_used_at
    assert stamped is not None and abs(stamped - utcnow()) < datetime.timedelta(minutes=1)
    past = stamped - datetime.timedelta(hours=1)
    ApiKey.update(last_used_at=past).where(ApiKey.id == row.id).execute()
    client.get("/api/version", headers=auth_header(secret))
    assert ApiKey.get_by_id(row.id).last_used_at == past  # not written again within the minute


@pytest.mark.parametrize("failure", ["502", "504"])
def test_a_one_at_a_time_key_works_right_after_a_failed_request(make_client, make_key, fake,
                                                                 failure):
    secret, _ = make_key(max_concurrent=1)
    if failure == "502":
        failing = make_client(upstreams=("http://127.0.0.1:1",))
    else:
        fake.first_byte_delay = 1.5
        failing = make_client(read_timeout=0.3)
    assert failing.post("/api/generate", json=GENERATE,
                        headers=auth_header(secret)).status_code == int(failure)
    fake.first_byte_delay = 0
    working = make_client()
    response = working.post("/api/generate", json={**GENERATE, "stream": False},
                            headers=auth_header(secret), buffered=True)
    assert response.status_code == 200


LARGE_IMAGE = "iVBORw0KGgo" + "A" * (3 * 1024 * 1024)  # a 3 MiB base64 'image'


def test_a_large_body_reaches_ollama_byte_for_byte(client, user_key, fake):
    body = json.dumps({"model": "llava", "prompt": "what is this?", "images": [LARGE_IMAGE],
                       "stream": False}).encode()
    fake.models.append("llava:latest")
    response = client.post("/api/generate", data=body, headers=auth_header(user_key),
                           content_type="application/json")
    assert response.status_code == 200
    assert fake.requests[-1].body == body


def test_a_stray_key_is_cut_out_of_a_large_body_and_nothing_else_changes(client, user_key, fake):
    fields = {"model": "llava", "images": [LARGE_IMAGE], "APIKEY": user_key, "prompt": "é\n"}
    body = json.dumps(fields, ensure_ascii=False).encode()
    fake.models.append("llava:latest")
    response = client.post("/api/generate", data=body, headers=auth_header(user_key),
                           content_type="application/json")
    assert response.status_code == 200
    received = fake.requests[-1]
    assert user_key.encode() not in received.body
    assert received.json() == {k: v for k, v in fields.items() if k != "APIKEY"}


@pytest.mark.parametrize("position", ["first", "after the image"])
def test_the_allow_list_sees_the_model_of_a_large_body(client, make_key, fake, position):
    secret, _ = make_key(models="llama3.2")
    fields = [("images", [LARGE_IMAGE]), ("prompt", "hi")]
    fields.insert(0 if position == "first" else 2, ("model", "qwen2.5:0.5b"))
    response = client.post("/api/generate", data=json.dumps(dict(fields)),
                           headers=auth_header(secret), content_type="application/json")
    assert response.status_code == 403
    assert fake.requests == []


@pytest.mark.parametrize("body, fragment", [
    (b'{"model": "llama3.2", "images": ["' + b"A" * 2_000_000 + b'"', "not valid JSON"),
    (b'{"model": "llama3.2", "images": ["' + b"A" * 2_000_000 + b'"]] }', "not valid JSON"),
    (b'[{"model": "llama3.2"}, "' + b"A" * 2_000_000 + b'"]', "must be a JSON object"),
    (b'{"model": ["' + b"A" * 2_000_000 + b'"]}', "'model' must be a string"),
], ids=["unterminated", "unbalanced", "not an object", "model not a string"])
def test_a_malformed_large_body_is_a_400(client, user_key, fake, body, fragment):
    response = client.post("/api/generate", data=body, headers=auth_header(user_key),
                           content_type="application/json")
    assert response.status_code == 400
    assert fragment in error_of(response)
    assert fake.requests == []


# --- CORS, the way Ollama does it -------------------------------------------------------------

@pytest.fixture
def browser_client(make_client):
    return make_client(cors_origins=("https://chat.example.com", "http://localhost:*"))


@pytest.mark.parametrize("origin", ["https://chat.example.com", "http://localhost:3000"])
def test_an_allowed_origin_gets_cors_headers(browser_client, user_key, fake, origin):
    response = browser_client.get("/api/tags", headers={**auth_header(user_key), "Origin": origin})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert "X-RateLimit-Remaining" in response.headers["Access-Control-Expose-Headers"]


def test_a_preflight_from_an_allowed_origin_is_answered_without_a_key(browser_client, fake):
    response = browser_client.options("/api/chat", headers={
        "Origin": "https://chat.example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://chat.example.com"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert fake.requests == []


@pytest.mark.parametrize("make", [lambda m: m(), lambda m: m(cors_origins=("https://ok.test",))],
                         ids=["default: no origins", "another origin listed"])
def test_any_other_origin_is_refused_before_anything_happens(make_client, user_key, fake, make):
    response = make(make_client).post("/api/generate", json=GENERATE, headers={
        **auth_header(user_key), "Origin": "https://evil.example"})
    assert response.status_code == 403
    assert "origin https://evil.example is not allowed" in error_of(response)
    assert "Access-Control-Allow-Origin" not in response.headers
    assert fake.requests == []


def test_requests_without_an_origin_or_from_the_gateways_own_host_are_not_cross_origin(
        client, user_key, fake):
    plain = client.get("/api/tags", headers=auth_header(user_key))
    same = client.get("/api/tags", headers={**auth_header(user_key),
                                            "Origin": "http://localhost"})
    for response in (plain, same):
        assert response.status_code == 200
        assert "Access-Control-Allow-Origin" not in response.headers
