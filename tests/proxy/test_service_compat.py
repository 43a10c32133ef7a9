"""Coming from ollama-api-service: its request shape, routes, settings and demo keys work.

In-process tests use the Flask client against the fake Ollama on a real socket; the
README's examples run as `requests` calls against a real gateway (`ollama-gw serve`).
"""
import concurrent.futures
import dataclasses
import json
import logging
import secrets
import time

import pytest
import requests

from app import create_app
from app.config import load_settings
from app.keys import demo_keys
from app.keys import registry as keystore
from app.store.db import open_database
from app.store.models import ApiKey, AuditEntry
from tests import leak_check
from tests.conftest import auth_header
from tests.fake_ollama import FakeOllama
from tests.gateway_process import GatewayProcess

GENERATE = {"model": "llama3.2", "prompt": "Explain machine learning", "stream": False}
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "Hi"}], "stream": False}
TOP_LEVEL = {"temperature": 0.3, "max_tokens": 7, "top_p": 0.9, "top_k": 20, "seed": 42,
             "stop": ["\n\n"], "num_ctx": 4096, "repeat_penalty": 1.1,
             "presence_penalty": 0.5, "frequency_penalty": 0.25}
AS_OPTIONS = {"temperature": 0.3, "num_predict": 7, "top_p": 0.9, "top_k": 20, "seed": 42,
              "stop": ["\n\n"], "num_ctx": 4096, "repeat_penalty": 1.1,
              "presence_penalty": 0.5, "frequency_penalty": 0.25}


def demo_secret(label):
    """A DEMO_* value as ollama-api-service's README makes them, known to the leak check."""
    secret = f"ollama-{label}-" + secrets.token_urlsafe(32)
    leak_check.remember_secrets([secret])
    return secret


def post(client, path, body, secret):
    return client.post(path, json=body, headers=auth_header(secret), buffered=True)


def sent_to_ollama(fake):
    return fake.requests[-1].json()


# --- temperature, max_tokens and the rest at the top level -----------------------------------

@pytest.mark.parametrize("path, body", [("/api/generate", GENERATE), ("/api/chat", CHAT)])
def test_top_level_sampling_fields_reach_ollama_as_options(client, make_key, fake, path,
                                                           body):
    secret, _ = make_key()
    response = post(client, path, {**body, **TOP_LEVEL}, secret)
    assert response.status_code == 200, response.data
    sent = sent_to_ollama(fake)
    assert sent["options"] == AS_OPTIONS
    assert not set(TOP_LEVEL) & set(sent)  # moved, not copied
    assert {k: sent[k] for k in body} == body  # everything else as the client sent it


def test_go_ollama_apis_generate_moves_them_too(client, make_key, fake):
    secret, _ = make_key()
    post(client, "/generate", {**GENERATE, "apikey": secret, "max_tokens": 9}, secret)
    assert fake.requests[-1].path == "/api/generate"
    assert sent_to_ollama(fake)["options"] == {"num_predict": 9}


def test_an_explicit_option_wins_and_nothing_is_defaulted(client, make_key, fake):
    secret, _ = make_key()
    post(client, "/api/generate", {**GENERATE, "temperature": 0.2, "max_tokens": 50,
                                   "options": {"temperature": 0.9, "num_ctx": 1024}}, secret)
    assert sent_to_ollama(fake)["options"] == {"temperature": 0.9, "num_ctx": 1024,
                                               "num_predict": 50}
    # A plain body reaches Ollama byte for byte: no default temperature, no options at all.
    raw = json.dumps(GENERATE).encode()
    client.post("/api/generate", data=raw, headers=auth_header(secret), buffered=True)
    assert fake.requests[-1].body == raw


def test_only_the_listed_fields_on_generating_endpoints_are_moved(client, make_key, fake):
    secret, _ = make_key()
    ollamas_own = {"system": "be brief", "format": "json", "keep_alive": "5m", "raw": False}
    post(client, "/api/generate", {**GENERATE, **ollamas_own, "temperature": None,
                                   "mirostat": 1}, secret)
    sent = sent_to_ollama(fake)
    assert {k: sent[k] for k in ollamas_own} == ollamas_own
    assert sent["mirostat"] == 1 and "temperature" not in sent  # null: dropped, not set
    assert sent["options"] == {}
    embed = {"model": "nomic-embed-text", "input": "x", "temperature": 0.5}
    post(client, "/api/embed", embed, secret)
    assert sent_to_ollama(fake) == embed  # not a generating endpoint: untouched


def test_options_in_another_letter_case_are_the_ones_extended(client, make_key, fake):
    secret, _ = make_key()
    post(client, "/api/chat", {**CHAT, "Options": {"seed": 1}, "temperature": 0.1,
                                      "seed": 2}, secret)
    sent = sent_to_ollama(fake)
    assert sent["options"] == {"seed": 1, "temperature": 0.1} and "Options" not in sent


def test_a_large_body_gets_its_options_moved_without_being_re_encoded(client, make_key,
                                                                     fake):
    secret, _ = make_key()
    image = "A" * (2 * 1024 * 1024)  # over the 1 MiB a body is parsed whole up to
    post(client, "/api/generate", {**GENERATE, "images": [image], "temperature": 0.4},
         secret)
    sent = sent_to_ollama(fake)
    assert sent["options"] == {"temperature": 0.4} and sent["images"] == [image]


@pytest.mark.parametrize("mode", ["refuse", "clamp"])
def test_a_keys_answer_cap_holds_for_a_top_level_max_tokens(settings, make_key, fake, mode):
    secret, _ = make_key(max_predict=5)
    app = create_app(dataclasses.replace(settings, model_policy=mode))
    client = app.test_client()
    response = post(client, "/api/generate", {**GENERATE, "max_tokens": 500}, secret)
    if mode == "refuse":
        assert response.status_code == 403
        assert "500" in response.get_json()["error"]
        assert not [r for r in fake.requests if r.path == "/api/generate"]
    else:
        assert response.status_code == 200
        assert sent_to_ollama(fake)["options"] == {"num_predict": 5}
    assert post(client, "/api/chat", {**CHAT, "max_tokens": 3}, secret).status_code == 200
    assert sent_to_ollama(fake)["options"] == {"num_predict": 3}


# --- GET / and /api/models ---------------------------------------------------------------------

@pytest.mark.parametrize("accept", [None, "*/*", "text/plain", "application/json, text/plain, */*",
                                    "text/html,application/xhtml+xml,*/*;q=0.8"])
def test_root_is_ollamas_text_for_probes_and_browsers(client, accept):
    response = client.get("/", headers={"Accept": accept} if accept else {})
    assert response.data == b"Ollama is running" and response.mimetype == "text/plain"
    assert "Accept" in response.headers["Vary"]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("accept", ["application/json", "application/json, text/plain;q=0.5"])
def test_root_is_service_info_for_a_client_that_prefers_json(client, accept, method):
    response = client.open("/", method=method, headers={"Accept": accept})
    assert response.status_code == 200 and response.mimetype == "application/json"
    if method == "GET":
        info = response.get_json()
        assert info["service"] == "ollama-gw" and info["status"] == "running"
        assert info["version"][0].isdigit()
        assert {k: info[k] for k in ("documentation", "health", "openapi", "redoc")} == {
            "documentation": "/docs", "health": "/health", "openapi": "/openapi.json",
            "redoc": "/redoc"}


def test_api_models_is_what_api_tags_lists_for_the_key(client, make_key, fake):
    everything, _ = make_key("all")
    narrow, _ = make_key("narrow", models="llama3.2,qwen*")
    for secret in (everything, narrow):
        models = client.get("/api/models", headers=auth_header(secret), buffered=True)
        tags = client.get("/api/tags", headers=auth_header(secret), buffered=True)
        assert models.status_code == 200
        assert models.get_json() == tags.get_json()
    names = [m["name"] for m in client.get("/api/models", headers=auth_header(narrow),
                                           buffered=True).get_json()["models"]]
    assert names == ["llama3.2:latest", "qwen2.5:0.5b"]
    assert client.get("/api/models").status_code == 401
    refused = client.post("/api/models", headers=auth_header(everything), buffered=True)
    assert refused.status_code == 405 and refused.headers["Allow"] == "GET, HEAD"
    assert all(r.path == "/api/tags" for r in fake.requests)  # Ollama has no /api/models


def test_api_models_is_the_union_over_several_servers(settings, make_key):
    secret, _ = make_key(models="llama3.2,phi3")
    with FakeOllama(models=["llama3.2:latest", "qwen2.5:0.5b"]) as gpu1, \
            FakeOllama(models=["phi3:latest", "llama3.2:latest"]) as gpu2:
        app = create_app(dataclasses.replace(
            settings, upstreams=(f"gpu1={gpu1.url}", f"gpu2={gpu2.url}")))
        app.extensions["upstreams"].refresh()
        client = app.test_client()
        models = client.get("/api/models", headers=auth_header(secret), buffered=True)
        tags = client.get("/api/tags", headers=auth_header(secret), buffered=True)
    # The same list as /api/tags (each model once; the server asked first varies).
    for answer in (models, tags):
        assert sorted(m["name"] for m in answer.get_json()["models"]) == [
            "llama3.2:latest", "phi3:latest"]


# --- /api/stats/detailed -----------------------------------------------------------------------

def test_detailed_stats_are_the_calling_keys_own(client, make_key, fake):
    alice, row = make_key("alice", rate_limit="10/hour")
    bob, _ = make_key("bob")
    before = time.time()
    for _ in range(3):
        post(client, "/api/generate", GENERATE, alice)
    post(client, "/api/chat", CHAT, bob)
    assert client.application.extensions["usage"].write_pending()
    answer = client.get("/api/stats/detailed", headers=auth_header(alice)).get_json()
    assert answer["key_name"] == "alice" and answer["role"] == "user"
    assert answer["key"]["prefix"] == row.prefix
    assert answer["total_requests_24h"] == answer["total_requests_7d"] == 3
    assert answer["answered_requests"] == 3
    low, high, avg = (answer[f"{k}_response_time"] for k in ("min", "max", "average"))
    assert 0 <= low <= avg <= high < 60
    first = answer["first_request"]
    assert before - 1 <= _epoch(first) <= _epoch(answer["last_request"]) <= time.time() + 1
    assert answer["rate_limit"] == "10/hour"
    window = answer["rate_limit_window"]
    if window["used"] == 3:  # unless an hour began between the requests and this call
        assert answer["usage_percent"] == 30.0 and window["remaining"] == 7
    assert client.get("/api/stats/detailed").status_code == 401
    bobs = client.get("/api/stats/detailed", headers=auth_header(bob)).get_json()
    assert bobs["key_name"] == "bob" and bobs["total_requests_24h"] == 1


def _epoch(iso):
    import datetime

    return datetime.datetime.fromisoformat(iso).timestamp()


# --- demo keys ---------------------------------------------------------------------------------

def test_demo_keys_are_created_once_hashed_and_announced_without_the_secret(
        migrated, settings, caplog, client, fake):
    admin, user = demo_secret("admin"), demo_secret("user")
    env = {"DEMO_ADMIN_KEY": admin, "DEMO_USER_KEY": user}
    with caplog.at_level(logging.INFO):
        demo_keys.ensure(migrated, env, settings)
        demo_keys.ensure(migrated, env, settings)  # a second start: nothing new
    rows = {row.name: row for row in ApiKey.select()}
    assert set(rows) == {"demo-admin", "demo-user"} and ApiKey.select().count() == 2
    assert (rows["demo-admin"].role, rows["demo-user"].role) == ("admin", "user")
    assert keystore.key_summary(rows["demo-admin"])["rate_limit"] == "1000/hour"
    assert keystore.key_summary(rows["demo-user"])["rate_limit"] == "100/hour"
    for row, secret in ((rows["demo-admin"], admin), (rows["demo-user"], user)):
        assert row.key_hash == keystore.hash_key(secret)
        assert row.prefix.startswith("demo_") and row.prefix[5:] not in secret
        # Found by its prefix, by its name, and by the pasted secret; and it authenticates.
        assert keystore.find_key(row.prefix).id == keystore.find_key(secret).id == row.id
    text = caplog.text
    assert "demo keys are on (DEMO_ADMIN_KEY, DEMO_USER_KEY)" in text
    assert any(r.levelno == logging.WARNING and "demo keys are on" in r.getMessage()
               for r in caplog.records)
    assert admin not in text and user not in text
    audit = [(e.action, e.actor) for e in AuditEntry.select().where(
        AuditEntry.action.startswith("key."))]
    assert [a for a, _ in audit] == ["key.created", "key.created"]
    assert "DEMO_ADMIN_KEY" in audit[0][1]
    assert client.get("/api/keys", headers=auth_header(admin)).status_code == 200
    assert client.get("/api/keys", headers=auth_header(user)).status_code == 403


def test_a_changed_demo_value_takes_over_the_key_and_a_revoked_one_stays_revoked(
        migrated, settings, client, caplog, fake):
    old, new, user = demo_secret("old"), demo_secret("new"), demo_secret("user")
    demo_keys.ensure(migrated, {"DEMO_ADMIN_KEY": old, "DEMO_USER_KEY": user}, settings)
    first = ApiKey.get(ApiKey.name == "demo-admin")
    keystore.revoke_key("demo-user")
    with caplog.at_level(logging.INFO):
        demo_keys.ensure(migrated, {"DEMO_ADMIN_KEY": new, "DEMO_USER_KEY": user}, settings)
        demo_keys.ensure(migrated, {"DEMO_USER_KEY": demo_secret("other")}, settings)
    now = ApiKey.get(ApiKey.name == "demo-admin")
    assert now.id == first.id and now.key_hash == keystore.hash_key(new)
    assert now.prefix != first.prefix
    assert "DEMO_ADMIN_KEY changed" in caplog.text and new not in caplog.text
    users = list(ApiKey.select().where(ApiKey.name == "demo-user"))
    assert len(users) == 1 and users[0].revoked_at is not None
    assert "stays revoked" in caplog.text
    assert client.get("/api/tags", headers=auth_header(old), buffered=True).status_code == 401
    assert client.get("/api/tags", headers=auth_header(new), buffered=True).status_code == 200
    assert client.get("/api/tags", headers=auth_header(user), buffered=True).status_code == 401
    assert [e.action for e in AuditEntry.select().order_by(AuditEntry.id)
            if e.action.startswith("key.")] == ["key.created", "key.created", "key.revoked",
                                                "key.rotated"]


def test_a_demo_value_shorter_than_32_characters_is_refused_with_an_error(
        migrated, settings, caplog):
    short, enough = demo_secret("admin")[:31], demo_secret("user")[:32]
    leak_check.remember_secrets([short, enough])
    with caplog.at_level(logging.INFO):
        demo_keys.ensure(migrated, {"DEMO_ADMIN_KEY": short, "DEMO_USER_KEY": enough}, settings)
    assert [(r.name, r.key_hash) for r in ApiKey.select()] == [
        ("demo-user", keystore.hash_key(enough))]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["DEMO_ADMIN_KEY is only 31 characters long, easy to guess: demo key "
                      "demo-admin is not created or changed; give it 32 characters or more "
                      "(a random value)"]
    assert short not in caplog.text and enough not in caplog.text


def test_a_short_demo_value_does_not_take_over_an_existing_demo_key(migrated, settings):
    first = demo_secret("admin")
    demo_keys.ensure(migrated, {"DEMO_ADMIN_KEY": first}, settings)
    demo_keys.ensure(migrated, {"DEMO_ADMIN_KEY": first[:31]}, settings)
    assert ApiKey.get(ApiKey.name == "demo-admin").key_hash == keystore.hash_key(first)


def test_a_demo_value_that_is_another_keys_secret_is_refused_not_taken(
        migrated, settings, make_key, caplog):
    secret, row = make_key("alice")
    same = demo_secret("same")
    with caplog.at_level(logging.INFO):
        demo_keys.ensure(migrated, {"DEMO_ADMIN_KEY": secret}, settings)
        demo_keys.ensure(migrated, {"DEMO_ADMIN_KEY": same, "DEMO_USER_KEY": same}, settings)
    assert f"already the secret of key {row.id} ({row.prefix}, named alice)" in caplog.text
    assert "DEMO_USER_KEY is already the secret of key" in caplog.text
    assert ApiKey.get_by_id(row.id).role == "user"
    assert [r.name for r in ApiKey.select().order_by(ApiKey.id)] == ["alice", "demo-admin"]
    assert secret not in caplog.text and same not in caplog.text


def test_gunicorn_run_directly_sets_up_demo_keys_with_its_migrations(runner, settings,
                                                                      monkeypatch):
    admin = demo_secret("admin")
    monkeypatch.setenv("DEMO_ADMIN_KEY", admin)
    result = runner("db", "upgrade", "--demo-keys")
    assert admin not in result.output
    database = open_database(settings.resolved_database_url)
    with database.bind_ctx([ApiKey]):
        assert [(r.name, r.key_hash) for r in ApiKey.select()] == [
            ("demo-admin", keystore.hash_key(admin))]
    database.close_all()


def test_a_gateway_starts_without_a_demo_key_too_short(database_url, fake, tmp_path):
    short, user = demo_secret("admin")[:31], demo_secret("user")
    leak_check.remember_secrets([short])
    with GatewayProcess(database_url, fake.url, workers=1) as gw:
        gw.env.update(DEMO_ADMIN_KEY=short, DEMO_USER_KEY=user)
        gw.start(tmp_path / "short.log")
        assert "ERROR app.keys.demo_keys: DEMO_ADMIN_KEY is only 31 characters long" in gw.log()
        assert requests.get(gw.url + "/api/tags", headers=auth_header(short),
                            timeout=60).status_code == 401
        assert requests.get(gw.url + "/api/tags", headers=auth_header(user),
                            timeout=60).status_code == 200
        assert short not in gw.log()


# --- settings from ollama-api-service's .env ---------------------------------------------------

def test_ollama_base_url_names_the_upstream_and_ollama_url_wins(tmp_path):
    env = {"HOME": str(tmp_path), "OLLAMA_BASE_URL": "http://vm:11434"}
    assert load_settings(environ=env).upstream == "http://vm:11434"
    env["OLLAMA_URL"] = "http://gpu:11434"
    assert load_settings(environ=env).upstream == "http://gpu:11434"


def test_an_asyncpg_database_url_works_as_it_is(postgres_url, tmp_path):
    url = postgres_url.replace("postgresql://", "postgresql+asyncpg://")
    settings = load_settings(environ={"HOME": str(tmp_path), "DATABASE_URL": url})
    database = open_database(settings.resolved_database_url)
    with database.connection_context():
        assert database.execute_sql("SELECT 1").fetchone() == (1,)
    database.close_all()


# --- the README of ollama-api-service, against a real gateway -------------------------------

@pytest.mark.gateway
def test_the_readme_examples_of_ollama_api_service_work(database_url, fake, tmp_path):
    fake.models = [*fake.models, "llama2:latest"]
    admin_key, user_key = demo_secret("admin"), demo_secret("user")
    with GatewayProcess(database_url, fake.url, workers=2) as gw:
        gw.env.update(DEMO_ADMIN_KEY=admin_key, DEMO_USER_KEY=user_key)
        gw.start(tmp_path / "gateway.log")
        log = gw.log()
        assert "WARNING app.keys.demo_keys: demo keys are on" in log
        assert admin_key not in log and user_key not in log
        base = gw.url
        admin = {"Authorization": f"Bearer {admin_key}"}

        health = requests.get(f"{base}/health", timeout=60).json()
        assert health["status"] == "healthy" and health["ollama_backend"] == "healthy"

        models = requests.get(f"{base}/api/models", headers=admin, timeout=60)
        assert "llama2:latest" in [m["name"] for m in models.json()["models"]]

        generated = requests.post(f"{base}/api/generate", headers=admin, timeout=60, json={
            "model": "llama2", "prompt": "Explain what is machine learning in simple terms",
            "temperature": 0.7, "stream": False})
        assert generated.status_code == 200 and generated.json()["done"] is True
        assert fake.requests[-1].json()["options"] == {"temperature": 0.7}

        chat = requests.post(f"{base}/api/chat", headers=admin, timeout=60, json={
            "model": "llama2", "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0.7, "stream": False})
        assert chat.json()["message"]["role"] == "assistant"

        _python_client_example(base, user_key, fake)

        def counted():
            stats = requests.get(f"{base}/api/stats", headers=admin, timeout=60).json()
            return stats if stats["total_requests"] == 3 else None
        assert _within(60, counted)["requests_by_endpoint"] == {
            "/api/models": 1, "/api/generate": 1, "/api/chat": 1}

        made = requests.post(f"{base}/api/keys", headers=admin, timeout=60, json={
            "name": "Production API Key", "role": "user", "rate_limit": 500})
        assert made.status_code == 201
        leak_check.remember_secrets([made.json()["api_key"]])
        assert made.json()["rate_limit"] == "500/hour"

        listed = requests.get(f"{base}/api/keys", headers=admin, timeout=60).json()
        assert listed["total"] == 3
        assert {k["name"]: k["role"] for k in listed["api_keys"]} == {
            "demo-admin": "admin", "demo-user": "user", "Production API Key": "user"}
        for key in listed["api_keys"]:
            assert len(key["key_preview"]) <= 13 and key["key_preview"] not in (
                admin_key + user_key)

        everyone = requests.get(f"{base}/api/admin/stats", headers=admin, timeout=60)
        assert {k["key_name"] for k in everyone.json()["keys"]} == {"demo-admin", "demo-user"}
        assert requests.get(f"{base}/api/admin/stats", timeout=60,
                            headers={"Authorization": f"Bearer {user_key}"}).status_code == 403


def _python_client_example(api_base_url, api_key, fake):
    """ollama-api-service's "Python Client Example", with its prints as assertions."""
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

    response = requests.get(f"{api_base_url}/api/models", headers=headers, timeout=60)
    assert response.json()["models"]

    generate_payload = {"model": "llama2", "prompt": "Write a haiku about programming",
                        "temperature": 0.8, "stream": False}
    response = requests.post(f"{api_base_url}/api/generate", headers=headers,
                             json=generate_payload, timeout=60)
    assert response.json()["response"]
    assert fake.requests[-1].json()["options"] == {"temperature": 0.8}

    chat_payload = {"model": "llama2",
                    "messages": [{"role": "user", "content": "Hello! How are you?"}],
                    "stream": False}
    response = requests.post(f"{api_base_url}/api/chat", headers=headers, json=chat_payload,
                             timeout=60)
    assert response.json()["message"]["content"]
    assert "options" not in fake.requests[-1].json()  # no temperature sent, none made up

    def counted():
        stats = requests.get(f"{api_base_url}/api/stats", headers=headers, timeout=60).json()
        return stats if stats["total_requests"] == 3 else None
    assert _within(60, counted)["last_24h_requests"] == 3


def _within(seconds, probe):
    """probe()'s first truthy answer within `seconds` (usage is written a moment later)."""
    deadline = time.monotonic() + seconds
    while True:
        answer = probe()
        if answer or time.monotonic() > deadline:
            assert answer, f"not within {seconds} s"
            return answer
        time.sleep(0.1)


@pytest.mark.gateway
def test_demo_keys_survive_concurrent_starts_restarts_and_a_changed_value(
        database_url, fake, tmp_path):
    first, second, user = demo_secret("first"), demo_secret("second"), demo_secret("user")
    gateways = [GatewayProcess(database_url, fake.url, workers=2) for _ in range(2)]
    try:
        for gw in gateways:
            gw.env.update(DEMO_ADMIN_KEY=first, DEMO_USER_KEY=user)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda pair: pair[1].start(tmp_path / f"start{pair[0]}.log"),
                          enumerate(gateways)))
        listed = json.loads(gateways[0].cli("keys", "list", "--json").stdout)
        assert sorted(k["name"] for k in listed) == ["demo-admin", "demo-user"]
        for gw in gateways:
            assert _status(gw, first) == 200
    finally:
        for gw in gateways:
            gw.stop()
    admin_id = next(k["id"] for k in listed if k["name"] == "demo-admin")
    restarted = GatewayProcess(database_url, fake.url, workers=2)
    restarted.env.update(DEMO_ADMIN_KEY=second, DEMO_USER_KEY=user)
    with restarted:
        restarted.start(tmp_path / "restart.log")
        assert "DEMO_ADMIN_KEY changed" in restarted.log()
        assert _status(restarted, second) == 200 and _status(restarted, first) == 401
        listed = json.loads(restarted.cli("keys", "list", "--json").stdout)
        assert [k["id"] for k in listed if k["name"] == "demo-admin"] == [admin_id]
        assert second not in restarted.log() and first not in restarted.log()


def _status(gw, secret):
    return requests.get(gw.url + "/api/tags", headers={"Authorization": f"Bearer {secret}"},
                        timeout=60).status_code
