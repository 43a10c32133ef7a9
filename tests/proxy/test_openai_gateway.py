"""The official `openai` client through a running gateway (gunicorn, gevent, two workers)."""
import httpx
import openai
import pytest

from tests.admission.test_quota_gateway import settled
from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.gateway
CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def gateway(database, fake_ollama, tmp_path_factory):
    with GatewayProcess(database, fake_ollama.url, workers=2) as gw:
        yield gw.start(tmp_path_factory.mktemp("log") / "gateway.log")


def client(gateway, key):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture
def user(gateway, fake):
    return client(gateway, gateway.add_key("--name", "openai-user")["key"])


def test_chat_streaming_and_not(user, fake):
    answer = user.chat.completions.create(model="llama3.2", messages=CHAT)
    assert answer.choices[0].message.content == "word0 word1 word2 word3 word4"
    parts = list(user.chat.completions.create(model="llama3.2", messages=CHAT, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == \
        answer.choices[0].message.content
    assert all(p.usage is None and p.choices for p in parts)  # no usage chunk it did not ask for
    asked = list(user.chat.completions.create(model="llama3.2", messages=CHAT, stream=True,
                                              stream_options={"include_usage": True}))
    assert asked[-1].usage.completion_tokens == 5


def test_completions_embeddings_models_and_responses(user, fake):
    assert user.completions.create(model="llama3.2", prompt="hi").choices[0].text
    assert all(p.usage is None for p in user.completions.create(model="llama3.2", prompt="hi",
                                                                stream=True))
    assert len(user.embeddings.create(model="nomic-embed-text", input=["a", "b"]).data) == 2
    assert "llama3.2:latest" in [m.id for m in user.models.list()]
    assert user.models.retrieve("llama3.2:latest").owned_by == "library"
    assert user.responses.create(model="llama3.2", input="hi").output_text.startswith("word0")
    assert list(user.responses.create(model="llama3.2", input="hi", stream=True))[-1].type == \
        "response.completed"


def test_refusals_are_the_clients_exceptions(gateway, fake):
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "ogw_" + "x" * 43).models.list()
    narrow = client(gateway, gateway.add_key("--name", "narrow", "--models", "qwen*")["key"])
    with pytest.raises(openai.PermissionDeniedError):
        narrow.chat.completions.create(model="llama3.2", messages=CHAT)
    limited = client(gateway, gateway.add_key("--name", "limited", "--rate-limit",
                                               "1/hour")["key"])
    limited.models.list()
    with pytest.raises(openai.RateLimitError) as caught:
        limited.models.list()
    assert int(caught.value.response.headers["Retry-After"]) > 0


def test_a_client_that_leaves_a_stream_stops_ollama(gateway, fake):
    fake.token_delay, fake.tokens = 0.2, 200
    key = gateway.add_key("--name", "leaver")["key"]
    stream = client(gateway, key).chat.completions.create(model="llama3.2", messages=CHAT,
                                                          stream=True)
    next(iter(stream))
    stream.close()
    assert fake.wait_for_cancellation(timeout=30)


def test_the_openai_client_retries_a_429_after_retry_after(gateway, fake):
    key = gateway.add_key("--name", "patient", "--rate-limit", "1/second")["key"]
    patient = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=3,
                            timeout=60, http_client=httpx.Client(timeout=60))
    assert [len(patient.models.list().data) for _ in range(3)] == [3, 3, 3]


# What Codex sends to a custom provider with `wire_api = "responses"` (plain JSON).
CODEX_TOOLS = [
    {"type": "function", "name": "shell", "description": "Runs a shell command.",
     "strict": False, "parameters": {"type": "object", "properties": {
         "command": {"type": "array", "items": {"type": "string"}}},
         "required": ["command"], "additionalProperties": False}},
    {"type": "function", "name": "apply_patch", "description": "Edits files.",
     "strict": False, "parameters": {"type": "object", "properties": {
         "input": {"type": "string"}}, "required": ["input"]}}]


def codex(openai_client, model="llama3.2"):
    return openai_client.responses.create(
        model=model, instructions="You are Codex, a coding agent. " * 50, stream=True,
        input=[{"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "list the files here"}]}],
        tools=CODEX_TOOLS, tool_choice="auto", parallel_tool_calls=False,
        reasoning={"effort": "medium", "summary": "auto"},
        include=["reasoning.encrypted_content"], store=False,
        prompt_cache_key="0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b")


def test_codexs_request_runs_within_the_allow_list_and_is_charged_the_final_counts(gateway,
                                                                                   fake):
    # Codex sets no max_output_tokens: the gateway caps the answer at what is left of the
    # quota, and the fake writes that many tokens. A small quota keeps the stream short
    # (100,000 tokens took over a minute on a busy machine, past the client's timeout).
    created = gateway.add_key("--name", "codex", "--models", "llama3.2",
                              "--token-quota", "2000/day")
    events = list(codex(client(gateway, created["key"])))
    assert [e.type for e in events][-1] == "response.completed"
    done = events[-1].response
    assert done.reasoning.effort == "medium" and [t.name for t in done.tools] == [
        "shell", "apply_patch"]
    sent = fake.requests[-1].json()
    assert (sent["include"], sent["prompt_cache_key"], sent["reasoning"]) == (
        ["reasoning.encrypted_content"], "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        {"effort": "medium", "summary": "auto"})
    assert "authorization" not in fake.requests[-1].headers
    settled(gateway, created["key"], done.usage.input_tokens + done.usage.output_tokens)
    with pytest.raises(openai.PermissionDeniedError):
        codex(client(gateway, created["key"]), model="qwen2.5:0.5b")
