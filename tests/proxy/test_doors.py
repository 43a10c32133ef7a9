"""Which paths a key may reach through the relays: account endpoints, unknown paths, the rest."""
import pytest

from tests.conftest import auth_header

ACCOUNT = [("POST", "/api/signout"), ("POST", "/api/signin"), ("POST", "/api/me"),
           ("DELETE", "/api/user/keys/c3NoLWVkMjU1MTkgQUFBQQ"), ("GET", "/api/user"),
           ("POST", "/api/SignOut"),
           # The families, below any path Ollama may add to them, in any letter case.
           ("GET", "/api/me/plan"), ("POST", "/api/signin/device"), ("POST", "/api/signout/all"),
           ("DELETE", "/api/User/Keys/c3NoLWVkMjU1MTkgQUFBQQ"),
           # In this spelling; /api/experimental/web_search and web_fetch themselves are known
           # endpoints the key's cloud setting governs (tests/proxy/test_cloud.py).
           ("POST", "/api/Experimental/Web_Search"), ("POST", "/api/Experimental/Web_Fetch")]


def reached(fake, path):
    return [r for r in fake.requests if r.path.split("?")[0] == path]


@pytest.mark.parametrize("method, path", ACCOUNT)
@pytest.mark.parametrize("open_unknown", [False, True], ids=["default", "open_unknown_paths"])
def test_account_endpoints_are_refused_to_user_keys_and_never_reach_ollama(
        make_client, make_key, fake, method, path, open_unknown):
    client = make_client(open_unknown_paths=open_unknown)
    secret, _ = make_key()
    response = client.open(path, method=method, headers=auth_header(secret), json={})
    assert response.status_code == 403
    assert "account endpoints" in response.get_json()["error"]
    assert "needs an admin key" in response.get_json()["error"]
    assert reached(fake, path) == []


@pytest.mark.parametrize("method, path", ACCOUNT)
def test_account_endpoints_are_relayed_for_admin_keys(client, make_key, fake, method, path):
    secret, _ = make_key("admin", role="admin")
    response = client.open(path, method=method, headers=auth_header(secret), json={})
    assert response.status_code == 404  # the fake Ollama's own answer: it got the request
    assert [r.method for r in reached(fake, path)] == [method]


@pytest.mark.parametrize("path, shape", [
    ("/api/some-future-endpoint", "native"), ("/v1/some-future-endpoint", "openai")])
def test_unknown_paths_are_for_admin_keys_unless_opened(make_client, make_key, fake, path,
                                                        shape):
    secret, _ = make_key()
    response = make_client().post(path, headers=auth_header(secret), json={})
    assert response.status_code == 403
    error = response.get_json()["error"]
    message = error if shape == "native" else error["message"]
    assert "not an endpoint the gateway knows" in message
    assert "open_unknown_paths = true" in message
    assert reached(fake, path) == []

    opened = make_client(open_unknown_paths=True).post(path, headers=auth_header(secret),
                                                         json={})
    assert opened.status_code == 404  # Ollama's answer
    assert len(reached(fake, path)) == 1
    admin, _ = make_key("admin", role="admin")
    assert make_client().post(path, headers=auth_header(admin), json={}).status_code == 404
    assert len(reached(fake, path)) == 2


def test_the_setting_is_read_from_the_environment():
    from app.config import load_settings

    environ = {"OLLAMA_GW_OPEN_UNKNOWN_PATHS": "true"}
    assert load_settings(environ=environ).open_unknown_paths is True
    assert load_settings(environ={}).open_unknown_paths is False


# Ollama's own answers: /v1/messages wants max_tokens, an image edit its `image`.
# (Transcriptions take a form: tests/proxy/test_v1_media.py.)
@pytest.mark.parametrize("path, status", [("/v1/messages", 400), ("/v1/images/generations", 200),
                                          ("/v1/images/edits", 400)])
def test_new_known_endpoints_are_relayed_for_user_keys_within_their_models(client, make_key,
                                                                           fake, path, status):
    secret, _ = make_key(models="llama3.2")
    body = {"model": "llama3.2", "prompt": "a cat"}
    response = client.post(path, headers=auth_header(secret), json=body)
    assert response.status_code == status
    assert reached(fake, path)[-1].json() == body

    refused = client.post(path, headers=auth_header(secret), json={**body, "model": "qwen2.5"})
    assert refused.status_code == 403
    assert "may not use model 'qwen2.5'" in refused.get_json()["error"]["message"]
    assert len(reached(fake, path)) == 1


def test_api_status_and_version_are_relayed_for_user_keys(client, make_key, fake):
    secret, _ = make_key(models="llama3.2")
    status = client.get("/api/status", headers=auth_header(secret))
    assert (status.status_code, status.get_data()) == (
        200, b'{"cloud":{"disabled":false,"source":"none"}}')  # Ollama's, as it is
    assert [r.method for r in reached(fake, "/api/status")] == ["GET"]
    version = client.get("/api/version", headers=auth_header(secret))
    assert version.status_code == 200 and version.get_json()["version"].count(".") == 2
    assert client.head("/api/version", headers=auth_header(secret)).status_code == 200
    assert client.post("/api/status", headers=auth_header(secret)).status_code == 405
    assert client.get("/api/status").status_code == 401


def test_codex_oss_probes_work_for_a_user_key_and_its_pull_is_refused_clearly(client, make_key,
                                                                              fake):
    """`codex --oss` asks /v1/models, /api/version, /api/tags, then pulls what it misses."""
    secret, _ = make_key(models="llama3.2")
    models = client.get("/v1/models", headers=auth_header(secret))
    assert [m["id"] for m in models.get_json()["data"]] == ["llama3.2:latest"]
    assert client.get("/api/version", headers=auth_header(secret)).status_code == 200
    tags = client.get("/api/tags", headers=auth_header(secret)).get_json()["models"]
    assert [m["name"] for m in tags] == ["llama3.2:latest"]
    pull = client.post("/api/pull", headers=auth_header(secret),
                       json={"model": "gpt-oss:20b", "stream": True})
    assert pull.status_code == 403
    message = pull.get_json()["error"]
    assert "/api/pull needs an admin key" in message and "has role user" in message
    assert reached(fake, "/api/pull") == []


FORM = (b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\nRIFF....\r\n--XyZ--\r\n")


@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/images/edits"])
def test_a_form_is_relayed_as_sent_within_the_keys_models(client, make_key, fake, path):
    headers = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    open_key, _ = make_key("any model")
    response = client.post(path, data=FORM, headers={**headers, **auth_header(open_key)})
    # Ollama's answers: no model "whisper" here; edits take JSON.
    assert response.status_code == (404 if "audio" in path else 400)
    assert reached(fake, path)[-1].body == FORM
    assert reached(fake, path)[-1].headers["Content-Type"] == headers["Content-Type"]

    limited, _ = make_key("some models", models="llama3.2")
    refused = client.post(path, data=FORM, headers={**headers, **auth_header(limited)})
    assert refused.status_code == 403
    assert "may not use model 'whisper'" in refused.get_json()["error"]["message"]
    assert len(reached(fake, path)) == 1
