"""The OpenAI API (/v1) through the gateway, with the official `openai` client.

In-process: the client talks to the gateway through httpx's WSGI transport, and the
gateway to the fake Ollama on a real socket (tests/fake_ollama_v1.py). Streaming and
hang-ups over real sockets are in tests/proxy/test_openai_gateway.py.
"""
import dataclasses
import json

import httpx
import openai
import pytest
import requests

from app import create_app
from app.store.models import UsageRecord

CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def gateway_app(settings, migrated):
    def make(**overrides):
        app = create_app(dataclasses.replace(settings, **overrides))
        app.config["TESTING"] = True
        return app

    return make


@pytest.fixture
def app(gateway_app):
    return gateway_app()


def client_for(app, secret):
    return openai.OpenAI(base_url="http://gateway/v1", api_key=secret, max_retries=0,
                         http_client=httpx.Client(transport=httpx.WSGITransport(app=app)))


@pytest.fixture
def user(app, make_key):
    secret, _ = make_key()
    return client_for(app, secret)


def recorded(app):
    assert app.extensions["usage"].write_pending()
    return list(UsageRecord.select().order_by(UsageRecord.id))


def without_ids(events):
    """Decoded SSE events minus what differs between two identical requests."""
    decoded = []
    for event in events:
        data = event.removeprefix("data: ")
        if data == "[DONE]":
            decoded.append(data)
            continue
        obj = json.loads(data)
        decoded.append({k: v for k, v in obj.items() if k not in ("id", "created")})
    return decoded


def sse_events(raw):
    return [e for e in raw.decode().split("\n\n") if e]


# --- what the client gets ----------------------------------------------------------------------

def test_chat_completions_answer_as_openai_does(user, fake):
    answer = user.chat.completions.create(model="llama3.2", messages=CHAT)
    assert answer.choices[0].message.content == "word0 word1 word2 word3 word4"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (2, 5)
    assert fake.requests[-1].path == "/v1/chat/completions"


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "llama3.2", "messages": CHAT, "stream": True}),
    ("/v1/completions", {"model": "llama3.2", "prompt": "hi", "stream": True}),
])
def test_a_stream_reaches_the_client_exactly_as_ollama_sends_it_without_usage(
        app, make_key, fake, path, body):
    secret, _ = make_key()
    direct = requests.post(fake.url + path, json=body, timeout=60).content
    through = app.test_client().post(path, json=body, buffered=True, headers={
        "Authorization": f"Bearer {secret}"}).data
    # The gateway asked Ollama for usage, and took back out everything that added.
    assert fake.requests[-1].json()["stream_options"] == {"include_usage": True}
    assert b'"usage"' not in through
    assert without_ids(sse_events(through)) == without_ids(sse_events(direct))
    [row] = recorded(app)
    assert (row.prompt_tokens, row.completion_tokens, row.aborted) == (
        2 if "chat" in path else 1, 5, False)


@pytest.mark.parametrize("spelling", [
    {"Stream": True}, {"ſtream": True}, {"stream": False, "STREAM": True},
    {"stream": True, "stream_options": {"include_usage": True, "Include_usage": False}},
    {"stream": True, "Stream_Options": {"include_usage": False}},
], ids=["Stream", "long-s", "last-wins", "usage-unasked-twice", "options-spelled"])
def test_a_stream_in_any_spelling_go_reads_is_asked_for_its_usage(app, make_key, fake,
                                                                   spelling):
    """Go's decoder matches field names in any case (Unicode folding) and keeps the last:
    a stream the gateway did not recognise would run without usage, and charge nothing."""
    secret, _ = make_key()
    body = json.dumps({"model": "llama3.2", "messages": CHAT, **spelling})  # in this order
    app.test_client().post("/v1/chat/completions", buffered=True, data=body,
                           content_type="application/json",
                           headers={"Authorization": f"Bearer {secret}"}).close()
    sent = fake.requests[-1].json()
    assert [v for k, v in sent.items() if k.casefold() == "stream_options"] == [
        {"include_usage": True}]


def test_a_whole_stream_without_ollamas_counts_is_charged_its_estimate(app, make_key, fake,
                                                                      monkeypatch):
    """Were a spelling ever to slip past the gateway, Ollama would stream without usage:
    the answer is then charged as a cut-off one (estimated prompt, a token an event), so
    a quota key never gets a request for nothing."""
    from app.proxy import sse

    monkeypatch.setattr(sse, "ask_for_usage", lambda body: None)
    secret, _ = make_key(token_quota="1000/day")
    app.test_client().post("/v1/chat/completions", buffered=True,
                           json={"model": "llama3.2", "messages": CHAT, "stream": True},
                           headers={"Authorization": f"Bearer {secret}"}).close()
    [row] = recorded(app)
    assert row.prompt_estimated is True
    assert row.prompt_tokens and row.prompt_tokens > 0
    assert row.completion_tokens and row.completion_tokens >= 5


def test_a_client_that_asks_for_usage_gets_ollamas_usage_chunk(user, app, fake):
    parts = list(user.chat.completions.create(model="llama3.2", messages=CHAT, stream=True,
                                              stream_options={"include_usage": True}))
    assert parts[-1].choices == [] and parts[-1].usage.completion_tokens == 5
    assert [r.completion_tokens for r in recorded(app)] == [5]


def test_completions_embeddings_and_responses_work(user, fake):
    assert user.completions.create(model="llama3.2", prompt="hi").choices[0].text.startswith(
        "word0")
    vectors = user.embeddings.create(model="nomic-embed-text", input=["a", "b"]).data
    assert [v.index for v in vectors] == [0, 1] and len(vectors[0].embedding) == 16
    response = user.responses.create(model="llama3.2", input="hello there")
    assert response.output_text.startswith("word0") and response.usage.output_tokens == 5
    events = list(user.responses.create(model="llama3.2", input="hello", stream=True))
    assert events[-1].type == "response.completed"


THINK = [b'"low"', b'"medium"', b'"high"', b'"max"', b"true", b"false"]


@pytest.mark.parametrize("path, field", [("/api/chat", b"think"), ("/api/generate", b"think"),
                                         ("/v1/chat/completions", b"reasoning_effort")])
def test_think_levels_and_logprobs_reach_ollama_byte_for_byte_and_come_back(
        app, make_key, fake, path, field):
    secret, _ = make_key()
    client = app.test_client()
    fake.tokens = 2
    for value in THINK if field == b"think" else [b'"low"', b'"medium"', b'"high"', b'"none"']:
        raw = (b'{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],'
               b'"prompt":"hi","stream":false,"%s":%s,"logprobs":true,"top_logprobs":3}'
               % (field, value))
        answer = client.post(path, data=raw, headers={"Authorization": f"Bearer {secret}",
                                                      "Content-Type": "application/json"})
        assert answer.status_code == 200
        assert fake.requests[-1].body == raw  # nothing to change: sent as it came
        data = answer.get_json()
        logprobs = (data["choices"][0]["logprobs"]["content"] if path.startswith("/v1/")
                    else data["logprobs"])
        assert [entry["token"] for entry in logprobs] == ["word0", " word1"]
        assert len(logprobs[0]["top_logprobs"]) == 3
    raw = raw.replace(b'"stream":false', b'"stream":true')
    streamed = client.post(path, data=raw, headers={"Authorization": f"Bearer {secret}",
                                                    "Content-Type": "application/json"})
    sent = fake.requests[-1].json()
    if path.startswith("/v1/"):  # the gateway asks for usage: the rest as it came
        assert sent.pop("stream_options") == {"include_usage": True}
    assert sent == json.loads(raw)
    assert streamed.get_data().count(b'"top_logprobs":[') == 2  # one a token, relayed


def test_usage_of_each_endpoint_is_recorded(user, app, fake):
    user.embeddings.create(model="nomic-embed-text", input=["one two", "three"])
    user.responses.create(model="llama3.2", input="a b c")
    list(user.responses.create(model="llama3.2", input="a b", stream=True))
    rows = recorded(app)
    assert [(r.prompt_tokens, r.completion_tokens) for r in rows] == [(3, None), (3, 5), (2, 5)]


# --- refusals, in OpenAI's shape, as the client's exceptions -------------------------------------

def test_a_bad_key_raises_authentication_error(app, fake):
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(app, "ogw_" + "x" * 43).chat.completions.create(model="llama3.2",
                                                                  messages=CHAT)
    assert caught.value.body == {"message": "invalid API key", "type": "authentication_error",
                                 "param": None, "code": "invalid_api_key"}
    assert fake.requests == []


def test_a_model_outside_the_allow_list_raises_permission_denied(app, make_key, fake):
    secret, _ = make_key(models="qwen*")
    narrow = client_for(app, secret)
    with pytest.raises(openai.PermissionDeniedError):
        narrow.chat.completions.create(model="llama3.2", messages=CHAT)
    with pytest.raises(openai.PermissionDeniedError):
        narrow.models.retrieve("llama3.2:latest")
    assert [m.id for m in narrow.models.list()] == ["qwen2.5:0.5b"]
    assert narrow.models.retrieve("qwen2.5:0.5b").id == "qwen2.5:0.5b"


def test_over_the_rate_limit_raises_rate_limit_error_with_retry_after(app, make_key, fake):
    secret, _ = make_key(rate_limit="1/hour")
    limited = client_for(app, secret)
    limited.chat.completions.create(model="llama3.2", messages=CHAT)
    with pytest.raises(openai.RateLimitError) as caught:
        limited.chat.completions.create(model="llama3.2", messages=CHAT)
    assert int(caught.value.response.headers["Retry-After"]) > 0
    assert caught.value.body["code"] == "rate_limit_exceeded"


def test_an_unknown_model_is_ollamas_own_404(user, fake):
    with pytest.raises(openai.NotFoundError) as caught:
        user.chat.completions.create(model="nope", messages=CHAT)
    assert 'model "nope" not found' in caught.value.message


def test_ollama_failing_mid_stream_ends_with_an_error_the_client_raises(user, fake):
    fake.fail_after_tokens = 2
    stream = user.chat.completions.create(model="llama3.2", messages=CHAT, stream=True)
    with pytest.raises(openai.APIError, match="stopped answering in the middle"):
        list(stream)


def test_a_wrong_method_is_an_openai_shaped_405(app, make_key):
    secret, _ = make_key()
    answer = app.test_client().get("/v1/chat/completions",
                                   headers={"Authorization": f"Bearer {secret}"})
    assert answer.status_code == 405
    assert answer.get_json()["error"]["type"] == "invalid_request_error"


# --- model policy ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["refuse", "clamp"])
def test_a_cap_on_answer_length_holds_on_both_apis(gateway_app, make_key, fake, mode):
    app = gateway_app(model_policy=mode)
    secret, _ = make_key(max_predict=3)
    client = client_for(app, secret)
    native = app.test_client()
    over = {"model": "llama3.2", "prompt": "hi", "stream": False, "options": {"num_predict": 50}}
    if mode == "refuse":
        with pytest.raises(openai.PermissionDeniedError, match="max_tokens"):
            client.chat.completions.create(model="llama3.2", messages=CHAT, max_tokens=50)
        answer = native.post("/api/generate", json=over,
                             headers={"Authorization": f"Bearer {secret}"})
        assert answer.status_code == 403 and "num_predict" in answer.get_json()["error"]
    else:
        answer = client.chat.completions.create(model="llama3.2", messages=CHAT, max_tokens=50)
        assert answer.usage.completion_tokens == 3
        assert fake.requests[-1].json()["max_tokens"] == 3
        native.post("/api/generate", json=over, headers={"Authorization": f"Bearer {secret}"})
        assert fake.requests[-1].json()["options"] == {"num_predict": 3}
    # Asking for no limit at all is clamped in both modes: the cap cannot be sidestepped.
    assert client.chat.completions.create(model="llama3.2", messages=CHAT).usage \
        .completion_tokens == 3
    assert fake.requests[-1].json()["max_tokens"] == 3


@pytest.mark.parametrize("mode, status, sent", [("refuse", 403, None), ("clamp", 200, 2048)])
def test_a_cap_on_context_size(gateway_app, make_key, fake, mode, status, sent):
    app = gateway_app(model_policy=mode)
    secret, _ = make_key(max_ctx=2048)
    answer = app.test_client().post("/api/chat", headers={"Authorization": f"Bearer {secret}"},
                                    json={"model": "llama3.2", "messages": CHAT, "stream": False,
                                          "options": {"num_ctx": 32768, "temperature": 0}})
    assert answer.status_code == status
    if sent:
        assert fake.requests[-1].json()["options"] == {"num_ctx": 2048, "temperature": 0}
    else:
        assert "num_ctx" in answer.get_json()["error"] and fake.requests == []


@pytest.mark.parametrize("mode, status", [("refuse", 403), ("clamp", 200)])
def test_a_key_may_be_denied_keep_alive(gateway_app, make_key, fake, mode, status):
    app = gateway_app(model_policy=mode)
    secret, _ = make_key(keep_alive="deny")
    answer = app.test_client().post("/api/generate", headers={
        "Authorization": f"Bearer {secret}"}, json={"model": "llama3.2", "prompt": "hi",
                                                    "stream": False, "keep_alive": -1})
    assert answer.status_code == status
    if status == 200:
        assert "keep_alive" not in fake.requests[-1].json()
