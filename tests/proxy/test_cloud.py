"""Cloud models and web search are a key's permission (app/proxy/cloud.py), in-process."""
import json
import time

import pytest

from app.accounting import stats
from app.accounting.usage import Record
from app.proxy.cloud import is_cloud_name
from app.store.models import UsageRecord
from tests.conftest import auth_header

CLOUD = ["gpt-oss:120b-cloud", "deepseek-v3.1:671b-cloud", "qwen3-coder:480b-cloud",
         "qwen3:cloud", "Gpt-OSS:120B-CLOUD", "registry.example.com:5000/lib/foo:cloud"]
LOCAL = ["cloudy:latest", "my-cloud-model", "my-cloud-model:latest", "foo-cloud", "llama3.2",
         "cloud", "foo:bar-cloud/baz", "localhost:11434/cloud-team/foo", "foo:cloudy"]
# (path, body) of every endpoint that carries a model; {model} is filled in.
ENDPOINTS = [
    ("/api/generate", {"prompt": "hi", "stream": False}),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "stream": False}),
    ("/api/embed", {"input": "hi"}),
    ("/api/embeddings", {"prompt": "hi"}),
    ("/api/show", {}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/embeddings", {"input": "hi"}),
    ("/v1/responses", {"input": "hi"}),
    ("/v1/messages", {"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}),
]


@pytest.mark.parametrize("name", CLOUD)
def test_names_with_a_cloud_tag_are_cloud_models(name):
    assert is_cloud_name(name)


@pytest.mark.parametrize("name", LOCAL)
def test_cloud_elsewhere_than_the_tag_is_a_local_model(name):
    assert not is_cloud_name(name)


def reached(fake, path):
    return [r for r in fake.requests if r.path.split("?")[0] == path]


def message(response):
    error = response.get_json()["error"]
    return error if isinstance(error, str) else error["message"]


@pytest.fixture
def cloud_fake(fake):
    fake.models += ["gpt-oss:120b-cloud", "qwen3:cloud", "team-coder:latest", "cloudy:latest",
                    "my-cloud-model:latest"]
    fake.remote["team-coder"] = "qwen3-coder:480b"  # made from a cloud model: remote_host
    return fake


@pytest.mark.parametrize("path, body", ENDPOINTS, ids=[p for p, _ in ENDPOINTS])
@pytest.mark.parametrize("model", ["gpt-oss:120b-cloud", "team-coder"])
def test_a_user_key_is_refused_cloud_models_on_every_endpoint(client, make_key, cloud_fake,
                                                              path, body, model):
    secret, row = make_key()
    response = client.post(path, headers=auth_header(secret), json={**body, "model": model})
    assert response.status_code == 403
    text = message(response)
    assert f"model {model!r} is a cloud model" in text
    assert (f"key {row.prefix} (role user) has cloud setting default, which cloud_default = "
            "'role' makes deny" in text)
    assert f"ollama-gw keys update {row.prefix} --cloud allow" in text
    assert reached(cloud_fake, path) == []


@pytest.mark.parametrize("path, body", ENDPOINTS[:2] + ENDPOINTS[5:6],
                         ids=["generate", "chat", "v1-chat"])
@pytest.mark.parametrize("model", ["cloudy:latest", "my-cloud-model"])
def test_a_cloud_elsewhere_in_the_name_is_relayed(client, make_key, cloud_fake, path, body,
                                                  model):
    secret, _ = make_key()
    response = client.post(path, headers=auth_header(secret), json={**body, "model": model})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert len(reached(cloud_fake, path)) == 1


def test_the_model_of_get_v1_models_is_checked_too(client, make_key, cloud_fake):
    secret, _ = make_key()
    response = client.get("/v1/models/gpt-oss:120b-cloud", headers=auth_header(secret))
    assert response.status_code == 403
    assert "is a cloud model" in message(response)


def test_an_allowed_user_key_and_an_admin_key_use_cloud_models(client, make_key, cloud_fake):
    allowed, _ = make_key(cloud="allow")
    admin, _ = make_key(role="admin")
    for secret in (allowed, admin):
        for model in ("gpt-oss:120b-cloud", "team-coder"):
            response = client.post("/api/generate", headers=auth_header(secret),
                                   json={"model": model, "prompt": "hi", "stream": False})
            assert response.status_code == 200
    assert len(reached(cloud_fake, "/api/generate")) == 4


def test_cloud_deny_refuses_an_admin_key(client, make_key, cloud_fake):
    secret, row = make_key(role="admin", cloud="deny")
    response = client.post("/api/chat", headers=auth_header(secret),
                           json={"model": "qwen3:cloud", "messages": []})
    assert response.status_code == 403
    assert f"key {row.prefix} has cloud setting deny" in message(response)
    response = client.post("/api/experimental/web_search", headers=auth_header(secret),
                           json={"query": "x"})
    assert response.status_code == 403
    assert reached(cloud_fake, "/api/chat") == reached(
        cloud_fake, "/api/experimental/web_search") == []


def test_changing_cloud_default_reaches_a_default_key_without_touching_it(make_client, make_key,
                                                                          cloud_fake):
    user, _ = make_key()
    admin, _ = make_key(role="admin")
    denied, _ = make_key(cloud="deny")
    body = {"model": "gpt-oss:120b-cloud", "prompt": "hi", "stream": False}

    def status(client, secret):
        return client.post("/api/generate", headers=auth_header(secret), json=body).status_code

    role, allow, deny = (make_client(cloud_default=v) for v in ("role", "allow", "deny"))
    assert [status(role, s) for s in (user, admin, denied)] == [403, 200, 403]
    assert [status(allow, s) for s in (user, admin, denied)] == [200, 200, 403]
    assert [status(deny, s) for s in (user, admin, denied)] == [403, 403, 403]


WEB = ["/api/experimental/web_search", "/api/experimental/web_fetch"]


@pytest.mark.parametrize("path", WEB)
@pytest.mark.parametrize("open_unknown", [False, True], ids=["default", "open_unknown_paths"])
def test_the_web_routes_follow_the_cloud_permission_whatever_open_unknown_paths(
        make_client, make_key, cloud_fake, path, open_unknown):
    client = make_client(open_unknown_paths=open_unknown)
    user, _ = make_key()
    body = {"query": "ollama", "url": "https://ollama.com"}
    response = client.post(path, headers=auth_header(user), json=body)
    assert response.status_code == 403
    assert f"{path} runs a web search or fetch on ollama.com" in message(response)
    assert reached(cloud_fake, path) == []

    allowed, _ = make_key(cloud="allow")
    answer = client.post(path, headers=auth_header(allowed), json=body)
    assert answer.status_code == 200
    assert ("results" if path.endswith("search") else "content") in answer.get_json()
    assert len(reached(cloud_fake, path)) == 1
    assert client.get(path, headers=auth_header(allowed)).status_code == 405


def test_another_spelling_of_a_web_route_stays_an_admin_only_account_path(client, make_key,
                                                                           cloud_fake):
    allowed, _ = make_key(cloud="allow")
    response = client.post("/api/Experimental/Web_Search", headers=auth_header(allowed),
                           json={"query": "x"})
    assert response.status_code == 403
    assert "account endpoints" in message(response)
    denied_admin, _ = make_key(role="admin", cloud="deny")
    response = client.post("/api/Experimental/Web_Search", headers=auth_header(denied_admin),
                           json={"query": "x"})
    assert response.status_code == 403  # an admin key, but its cloud setting says no


TOOLS = [
    ("/v1/messages", {"model": "llama3.2", "max_tokens": 10,
                      "messages": [{"role": "user", "content": "news?"}]},
     [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]),
    ("/v1/responses", {"model": "llama3.2", "input": "news?"}, [{"type": "web_search"}]),
    ("/v1/responses", {"model": "llama3.2", "input": "news?"}, [{"type": "web_search_preview"}]),
    # Go's decoder matches field names in any letter case.
    ("/v1/messages", {"model": "llama3.2", "max_tokens": 10,
                      "messages": [{"role": "user", "content": "hi"}]},
     [{"TYPE": "web_search_20250305", "name": "web_search"}]),
]


@pytest.mark.parametrize("path, body, tools", TOOLS)
@pytest.mark.parametrize("field", ["tools", "Tools"])
def test_a_web_search_tool_needs_the_permission_whatever_the_model(client, make_key,
                                                                   cloud_fake, path, body,
                                                                   tools, field):
    user, _ = make_key()
    function = {"type": "function", "name": "lookup", "parameters": {"type": "object"}}
    response = client.post(path, headers=auth_header(user),
                           json={**body, field: [function, *tools]})
    assert response.status_code == 403
    assert "offers the built-in web search tool" in message(response)
    assert reached(cloud_fake, path) == []
    allowed, _ = make_key(cloud="allow")
    assert client.post(path, headers=auth_header(allowed),
                       json={**body, field: tools}).status_code == 200
    # A function tool of the client's own, even one called web_search, is no cloud request.
    own = [{**function, "name": "web_search"}]
    assert client.post(path, headers=auth_header(user),
                       json={**body, field: own}).status_code == 200
    assert len(reached(cloud_fake, path)) == 2


def test_a_web_search_tool_in_a_large_body_is_seen(client, make_key, cloud_fake):
    """Over 1 MiB a body is scanned, and values over 64 KiB are skipped: not `tools`."""
    user, _ = make_key()
    padding = [{"type": "function", "name": f"tool{i}", "description": "x" * 1000}
               for i in range(100)]  # ~100 KiB of tools
    body = {"model": "llama3.2", "max_tokens": 10,
            "messages": [{"role": "user", "content": "y" * (1024 * 1024)}],
            "tools": [*padding, {"type": "web_search_20250305", "name": "web_search"}]}
    response = client.post("/v1/messages", headers=auth_header(user),
                           data=json.dumps(body), content_type="application/json")
    assert response.status_code == 403
    assert "web_search_20250305" in message(response)
    assert reached(cloud_fake, "/v1/messages") == []


@pytest.mark.parametrize("path, field, name", [("/api/tags", "models", "name"),
                                               ("/v1/models", "data", "id")])
def test_model_lists_hide_the_cloud_models_a_key_may_not_use(client, make_key, cloud_fake,
                                                             path, field, name):
    user, _ = make_key()
    allowed, _ = make_key(cloud="allow")
    seen = {secret: {m[name] for m in client.get(path, headers=auth_header(secret))
                     .get_json()[field]} for secret in (user, allowed)}
    assert seen[allowed] - seen[user] == {"gpt-oss:120b-cloud", "qwen3:cloud",
                                          "team-coder:latest"}
    assert {"llama3.2:latest", "cloudy:latest", "my-cloud-model:latest"} <= seen[user]


def test_a_cloud_model_pulled_after_the_remote_list_was_read_is_hidden_too(client, make_key,
                                                                          cloud_fake):
    """Until the next refresh the gateway's remote list is older than the upstream's model
    list: a listed entry's own remote_host, and a cloud tag, still hide the model."""
    user, _ = make_key()
    assert client.get("/api/tags", headers=auth_header(user)).status_code == 200
    cloud_fake.models += ["late-coder:latest", "late:cloud"]
    cloud_fake.remote["late-coder"] = "qwen3-coder:480b"
    tags = {m["name"] for m in client.get("/api/tags", headers=auth_header(user))
            .get_json()["models"]}
    ids = {m["id"] for m in client.get("/v1/models", headers=auth_header(user))
           .get_json()["data"]}
    assert [p.path for p in cloud_fake.probes] == ["/api/tags"]  # the list read before
    assert "llama3.2:latest" in tags and "llama3.2:latest" in ids
    assert not {"late-coder:latest", "late:cloud"} & tags
    assert "late:cloud" not in ids


@pytest.mark.parametrize("cloud", ["allow", None])
def test_a_key_that_may_use_the_cloud_still_sees_only_its_allow_list(client, make_key,
                                                                     cloud_fake, cloud):
    role = "user" if cloud else "admin"
    secret, _ = make_key(models="llama3.2,gpt-oss:120b-cloud", role=role, cloud=cloud)
    tags = {m["name"] for m in client.get("/api/tags", headers=auth_header(secret))
            .get_json()["models"]}
    ids = {m["id"] for m in client.get("/v1/models", headers=auth_header(secret))
           .get_json()["data"]}
    assert tags == ids == {"llama3.2:latest", "gpt-oss:120b-cloud"}


def test_the_remote_list_is_read_once_per_refresh_not_per_request(client, make_key,
                                                                 cloud_fake):
    user, _ = make_key()
    for _ in range(5):
        assert client.post("/api/generate", headers=auth_header(user),
                           json={"model": "team-coder", "prompt": "hi"}).status_code == 403
        assert client.post("/api/generate", headers=auth_header(user),
                           json={"model": "llama3.2", "prompt": "hi",
                                 "stream": False}).status_code == 200
    assert [p.path for p in cloud_fake.probes] == ["/api/tags"]
    assert reached(cloud_fake, "/api/tags") == []  # kept apart from what clients asked for


def test_cloud_requests_are_recorded_as_such_and_refusals_are_not(client, make_key, cloud_fake,
                                                                  app):
    allowed, row = make_key(cloud="allow")
    user, other = make_key()
    for secret, model in ((allowed, "gpt-oss:120b-cloud"), (allowed, "llama3.2"),
                          (user, "gpt-oss:120b-cloud")):
        client.post("/api/generate", headers=auth_header(secret),
                    json={"model": model, "prompt": "hi", "stream": False}).close()
    admin, admin_row = make_key(role="admin")
    client.post("/api/copy", headers=auth_header(admin),  # a stub copied: nothing ran there
                json={"source": "gpt-oss:120b-cloud", "destination": "x:cloud"}).close()
    assert app.extensions["usage"].write_pending()
    rows = {(r.key_id, r.status, r.cloud) for r in UsageRecord.select()}
    assert rows == {(row.id, 200, True), (row.id, 200, False), (other.id, 403, False),
                    (admin_row.id, 200, False)}


def _record(key_id, at, cloud=True, prompt=10, completion=5):
    UsageRecord.create(at=at, key_id=key_id, endpoint_id=1, status=200, latency_ms=1,
                       prompt_tokens=prompt, completion_tokens=completion, cloud=cloud)


def test_the_cloud_windows_are_rolling_to_the_second(migrated):
    now = time.time()
    _record(1, now - 5 * 3600 + 1)         # 5 h - 1 s old: in both windows
    _record(1, now - 5 * 3600 - 1, prompt=100)  # 5 h + 1 s: only in 7 d
    _record(1, now - 7 * 86400 + 1, prompt=1000)
    _record(1, now - 7 * 86400 - 1, prompt=10000)  # out of both
    _record(1, now - 60, cloud=False, prompt=100000)  # local
    _record(1, now - 60, cloud=None, prompt=100000)  # an older instance's row: local
    _record(2, now - 60, prompt=1000000)  # another key's
    windows = stats.cloud_usage(1, now=now)
    assert windows == {
        "last_5h": {"requests": 1, "prompt_tokens": 10, "completion_tokens": 5, "tokens": 15},
        "last_7d": {"requests": 3, "prompt_tokens": 1110, "completion_tokens": 15,
                    "tokens": 1125}}
    assert stats.cloud_usage(None, now=now)["last_5h"]["requests"] == 2


def test_a_keys_own_stats_show_its_cloud_use_and_not_another_keys(client, make_key, migrated):
    secret, row = make_key()
    _, other = make_key()
    now = time.time()
    _record(row.id, now - 100)
    _record(other.id, now - 100, prompt=500)
    own = client.get("/api/stats", headers=auth_header(secret)).get_json()["cloud"]
    assert own["last_5h"] == {"requests": 1, "prompt_tokens": 10, "completion_tokens": 5,
                              "tokens": 15}
    admin, _ = make_key(role="admin")
    everyone = client.get("/api/admin/stats", headers=auth_header(admin)).get_json()["cloud"]
    assert everyone["last_7d"]["tokens"] == 15 + 505


def test_cloud_default_is_read_from_the_environment_and_checked():
    from app.config import ConfigError, load_settings

    assert load_settings(environ={}).cloud_default == "role"
    assert load_settings(environ={"OLLAMA_GW_CLOUD_DEFAULT": "allow"}).cloud_default == "allow"
    with pytest.raises(ConfigError, match="cloud_default must be role, allow or deny"):
        load_settings(environ={"OLLAMA_GW_CLOUD_DEFAULT": "users"})


@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/images/edits"])
def test_a_cloud_model_named_in_a_form_needs_the_permission(client, make_key, cloud_fake, path):
    from tests.proxy.test_v1_media import form, transcribe

    secret, _ = make_key()
    response = transcribe(client, secret, form(("model", "gpt-oss:120b-cloud")), path=path)
    assert response.status_code == 403
    assert "is a cloud model" in message(response)
    assert reached(cloud_fake, path) == []
    allowed, _ = make_key(cloud="allow")
    response = transcribe(client, allowed, form(("model", "gpt-oss:120b-cloud")), path=path)
    assert response.status_code != 403, response.get_data(as_text=True)
    assert len(reached(cloud_fake, path)) == 1  # relayed (the fake reads edits as JSON)


def test_a_cloud_model_before_a_local_one_in_a_form_is_seen(client, make_key, cloud_fake):
    """Go's FormValue takes the first `model` part: the one Ollama runs here."""
    from tests.proxy.test_v1_media import form, transcribe

    secret, _ = make_key()
    response = transcribe(client, secret, form(("model", "gpt-oss:120b-cloud"),
                                               ("model", "llama3.2")))
    assert response.status_code == 403
    assert "model 'gpt-oss:120b-cloud' is a cloud model" in message(response)
    assert reached(cloud_fake, "/v1/audio/transcriptions") == []


def test_a_cloud_model_for_images_needs_the_permission(client, make_key, cloud_fake):
    secret, _ = make_key()
    response = client.post("/v1/images/generations", headers=auth_header(secret),
                           json={"model": "qwen3:cloud", "prompt": "a cat"})
    assert response.status_code == 403 and "is a cloud model" in message(response)


@pytest.mark.parametrize("field", ["toolſ", "TOOLS", "Tools"])
def test_a_web_search_tool_under_any_spelling_go_folds_is_seen(client, make_key, cloud_fake,
                                                               field):
    """Go's decoder folds case as Unicode does: `toolſ` (a long s, U+017F) is `tools` to
    Ollama, so it must be to the check."""
    secret, _ = make_key()
    response = client.post("/v1/messages", headers=auth_header(secret), json={
        "model": "llama3.2", "max_tokens": 10,
        "messages": [{"role": "user", "content": "news?"}],
        field: [{"type": "web_search_20250305", "name": "web_search"}]})
    assert response.status_code == 403
    assert "web search tool" in message(response)
    assert reached(cloud_fake, "/v1/messages") == []


@pytest.mark.parametrize("path, body, kind", [
    ("/v1/messages", TOOLS[0][1], "WEB_SEARCH_20250305"),
    ("/v1/responses", TOOLS[1][1], "Web_Search_Preview")])
def test_a_web_search_tools_type_is_seen_in_any_letter_case(client, make_key, cloud_fake,
                                                            path, body, kind):
    secret, _ = make_key()
    response = client.post(path, headers=auth_header(secret),
                           json={**body, "tools": [{"type": kind, "name": "web_search"}]})
    assert response.status_code == 403
    assert f"offers the built-in web search tool ({kind!r})" in message(response)
    assert reached(cloud_fake, path) == []


@pytest.mark.parametrize("model", ["registry.ollama.ai/library/team-coder",
                                   "library/team-coder:latest", "TEAM-CODER",
                                   "team-coder@sha256:" + "0" * 64])
def test_a_remote_model_under_a_longer_name_is_still_cloud(client, make_key, cloud_fake,
                                                           model):
    secret, _ = make_key()
    response = client.post("/api/generate", headers=auth_header(secret),
                           json={"model": model, "prompt": "hi", "stream": False})
    assert response.status_code == 403, response.get_data(as_text=True)
    assert "is a cloud model" in message(response)


def test_the_querys_model_of_a_form_is_checked_for_the_cloud(client, make_key, cloud_fake):
    """Go's FormValue reads the query before a multipart body's fields."""
    from tests.proxy.test_v1_media import form, transcribe

    secret, _ = make_key()
    response = transcribe(client, secret, form(("model", "llama3.2")),
                          path="/v1/audio/transcriptions?model=gpt-oss:120b-cloud")
    assert response.status_code == 403
    assert "is a cloud model" in message(response)


def test_a_local_model_that_searches_the_web_is_cloud_but_runs_on_the_local_gpu(
        client, make_key, cloud_fake):
    """Its searches spend the owner's plan (a cloud request), its model the local GPU."""
    from app.accounting import gpu
    from app.config import UpstreamSpec
    from app.proxy import cloud

    secret, _ = make_key(cloud="allow")
    response = client.post("/v1/messages", headers=auth_header(secret), json={
        "model": "llama3.2", "max_tokens": 10,
        "messages": [{"role": "user", "content": "news?"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}]})
    assert response.status_code == 200, response.get_data(as_text=True)
    response.close()  # the request ends, and is recorded, when its answer does
    assert client.application.extensions["usage"].write_pending()
    [row] = UsageRecord.select().where(UsageRecord.status == 200)
    assert row.cloud is True
    assert row.gpu_seconds is not None and row.gpu_seconds > 0
    spec = UpstreamSpec("gpu1", "http://gpu1:11434", max_concurrent=1)
    searching = Record(at=0, endpoint="/v1/messages", status=200, latency_ms=1, cloud=True,
                       cloud_model=False)
    assert gpu.gpu_seconds(searching, spec, 2.0) == (2.0, 0.0)
    remote = Record(at=0, endpoint="/v1/messages", status=200, latency_ms=1, cloud=True,
                    cloud_model=True)
    assert gpu.gpu_seconds(remote, spec, 2.0) == (None, None)
    assert cloud.SEARCHES != cloud.ON_OLLAMA_COM
