"""Anthropic's official client, and Claude Code's request, through a real gateway.

Every refusal on /v1/messages comes in Anthropic's error shape, so the `anthropic` SDK
raises its matching exception; /v1/messages/count_tokens is answered by the gateway;
Claude Code's request (tests/proxy/data/claude_code_messages.json: system blocks with
cache_control, 25 tools, adaptive thinking, metadata, context_management, a system-role
message, max_tokens 32000) runs, streamed and not, charged exactly the counts of Ollama's
final message_delta, and the gateway's key never reaches Ollama.
"""
import json
import pathlib

import anthropic
import pytest
import requests

from app.admission import estimate
from tests.admission.test_quota_gateway import bearer, settled
from tests.fake_ollama_v1 import ESTIMATE_OFF_BY
from tests.gateway_process import GatewayProcess, free_port

pytestmark = pytest.mark.gateway

CLAUDE_CODE = json.loads((pathlib.Path(__file__).parent / "data" /
                          "claude_code_messages.json").read_text())
MAX_BODY = 64 * 1024
HI = {"model": "llama3.2", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def gateway(database, fake_ollama, tmp_path_factory):
    """One upstream slot and a queue wait of 1 s, so a held slot makes a 503 quickly."""
    with GatewayProcess(database, fake_ollama.url, workers=2, upstream_max_concurrent=1,
                        queue_max_wait_seconds=1, max_body_bytes=MAX_BODY) as gw:
        yield gw.start(tmp_path_factory.mktemp("log") / "gateway.log")


def sdk(gateway, key, bearer_token=False):
    """The client as Claude Code configures it (ANTHROPIC_AUTH_TOKEN: a bearer token) or
    as the SDK's default (x-api-key); no retries, so each refusal is seen once."""
    if bearer_token:
        return anthropic.Anthropic(base_url=gateway.url, auth_token=key, api_key=None,
                                   max_retries=0, timeout=60)
    return anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0, timeout=60)


def ran(fake):
    """What reached the fake Ollama's /v1 (not the gateway's health probes)."""
    return [r for r in fake.requests if r.path.startswith("/v1/")]


def user_key(gateway, *options):
    return gateway.add_key("--name", "claude", "--rate-limit", "none", *options)


def refusal(exc_info, status, kind):
    """The SDK's exception carries the gateway's answer in Anthropic's error shape."""
    exc = exc_info.value
    assert exc.status_code == status
    assert exc.body["type"] == "error"
    assert exc.body["error"]["type"] == kind
    assert set(exc.body["error"]) == {"type", "message"}
    return exc.body["error"]["message"]


@pytest.mark.parametrize("bearer_token", [False, True], ids=["x-api-key", "bearer"])
def test_a_wrong_key_is_an_authentication_error(gateway, fake, bearer_token):
    with pytest.raises(anthropic.AuthenticationError) as raised:
        sdk(gateway, "not-a-key", bearer_token).messages.create(**HI)
    assert refusal(raised, 401, "authentication_error") == "invalid API key"
    # No key at all: the SDK only sends what it is given.
    answer = requests.post(gateway.url + "/v1/messages", json=HI, timeout=60)
    assert answer.status_code == 401
    assert answer.json()["error"]["type"] == "authentication_error"
    assert ran(fake) == []


def test_a_model_outside_the_allow_list_is_a_permission_error(gateway, fake):
    key = user_key(gateway, "--models", "qwen2.5:0.5b")["key"]
    with pytest.raises(anthropic.PermissionDeniedError) as raised:
        sdk(gateway, key).messages.create(**HI)
    assert "may not use model 'llama3.2'" in refusal(raised, 403, "permission_error")
    with pytest.raises(anthropic.PermissionDeniedError) as raised:
        sdk(gateway, key).messages.count_tokens(model="llama3.2", messages=HI["messages"])
    refusal(raised, 403, "permission_error")
    assert ran(fake) == []


def test_the_rate_limit_is_a_rate_limit_error_with_retry_after(gateway, fake):
    key = gateway.add_key("--name", "slow", "--rate-limit", "1/minute")["key"]
    assert sdk(gateway, key).messages.create(**HI).usage.output_tokens == 5
    assert "x-api-key" not in ran(fake)[0].headers  # the SDK's default header stays here
    with pytest.raises(anthropic.RateLimitError) as raised:
        sdk(gateway, key).messages.create(**HI)
    refusal(raised, 429, "rate_limit_error")
    assert int(raised.value.response.headers["Retry-After"]) > 0
    assert len(ran(fake)) == 1


def test_a_spent_quota_is_a_rate_limit_error(gateway, fake):
    key = user_key(gateway, "--token-quota", "5/day")["key"]
    # Admitted while some is left, its max_tokens lowered to what is left (1): charged 6 + 1.
    first = sdk(gateway, key).messages.create(**{**HI, "messages": [
        {"role": "user", "content": "a b c d e f"}]})
    assert (first.usage.output_tokens, first.stop_reason) == (1, "max_tokens")
    settled(gateway, key, 7)
    with pytest.raises(anthropic.RateLimitError) as raised:
        sdk(gateway, key).messages.create(**HI)
    assert "quota" in refusal(raised, 429, "rate_limit_error")
    assert len(ran(fake)) == 1


def test_malformed_bodies_are_invalid_request_errors(gateway, fake):
    key = user_key(gateway)["key"]
    for body in (b'{"model": "llama3.2",', b'[1, 2]'):
        answer = requests.post(gateway.url + "/v1/messages", data=body, timeout=60,
                               headers={**bearer(key), "Content-Type": "application/json"})
        assert answer.status_code == 400
        assert answer.json()["type"] == "error"
        assert answer.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError) as raised:  # the gateway's own check
        sdk(gateway, key).messages.count_tokens(model="llama3.2", messages="hi")
    assert "messages" in refusal(raised, 400, "invalid_request_error")
    assert ran(fake) == []


def test_a_body_over_the_limit_is_request_too_large(gateway, fake):
    key = user_key(gateway)["key"]
    too_big = {**HI, "messages": [{"role": "user", "content": "a" * MAX_BODY}]}
    with pytest.raises(anthropic.APIStatusError) as raised:
        sdk(gateway, key).messages.create(**too_big)
    assert "max_body_bytes" in refusal(raised, 413, "request_too_large")
    assert ran(fake) == []


def test_ollamas_own_errors_are_relayed_as_they_are(gateway, fake):
    key = user_key(gateway)["key"]
    with pytest.raises(anthropic.NotFoundError) as raised:
        sdk(gateway, key).messages.create(**{**HI, "model": "nosuch"})
    exc = raised.value
    assert exc.body["error"] == {"type": "not_found_error",
                                 "message": 'model "nosuch" not found, try pulling it first'}
    assert exc.body["request_id"].startswith("req_")  # Ollama's own answer, untouched


def test_a_full_queue_is_overloaded_and_a_dead_upstream_an_api_error(gateway, fake, database,
                                                                      tmp_path):
    key = user_key(gateway)["key"]
    fake.tokens, fake.token_delay = 400, 0.05
    with sdk(gateway, key).messages.stream(**{**HI, "max_tokens": 400}) as running:
        next(iter(running))  # it holds the upstream's only slot
        with pytest.raises(anthropic.InternalServerError) as raised:  # waits 1 s, then 503
            sdk(gateway, key).messages.create(**HI)
        refusal(raised, 503, "overloaded_error")
    dead = f"http://127.0.0.1:{free_port()}"
    with GatewayProcess(database, dead, workers=1) as gw:
        gw.start(tmp_path / "dead.log")
        key = user_key(gw)["key"]
        with pytest.raises(anthropic.InternalServerError) as raised:
            sdk(gw, key).messages.create(**HI)
        refusal(raised, 502, "api_error")


def test_a_stream_ollama_breaks_off_ends_in_an_error_event(gateway, fake):
    key = user_key(gateway)["key"]
    fake.tokens, fake.fail_after_tokens = 10, 3
    with pytest.raises(anthropic.APIStatusError) as raised:
        with sdk(gateway, key).messages.stream(**{**HI, "max_tokens": 10}) as stream:
            for _ in stream:
                pass
    assert raised.value.body["error"]["type"] == "api_error"
    assert "stopped answering" in raised.value.body["error"]["message"]


def test_count_tokens_is_the_quota_estimate_and_never_reaches_ollama(gateway, fake):
    created = user_key(gateway, "--token-quota", "100000/day")
    key = created["key"]
    counted = sdk(gateway, key, bearer_token=True).messages.count_tokens(
        model=CLAUDE_CODE["model"], system=CLAUDE_CODE["system"],
        messages=CLAUDE_CODE["messages"], tools=CLAUDE_CODE["tools"],
        thinking={"type": "enabled", "budget_tokens": 2000})
    body = {k: CLAUDE_CODE[k] for k in ("model", "system", "messages", "tools")}
    assert counted.input_tokens == estimate.prompt_tokens(body)
    assert counted.input_tokens > estimate.prompt_tokens({**body, "tools": []}) + 25 * 40
    assert ran(fake) == []
    settled(gateway, key, 0)  # not charged
    answer = requests.get(gateway.url + "/v1/messages/count_tokens", headers=bearer(key),
                          timeout=60)
    assert answer.status_code == 405
    assert answer.json()["error"]["type"] == "invalid_request_error"


def claude_code(gateway, key, stream):
    """Claude Code's request as it sends it: ?beta=true, a bearer token, its headers."""
    return requests.post(
        gateway.url + "/v1/messages?beta=true", json={**CLAUDE_CODE, "stream": stream},
        stream=stream, timeout=120,
        headers={**bearer(key), "anthropic-version": "2023-06-01", "x-app": "cli",
                 "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
                 "x-claude-code-session-id": "4f1c2d3e"})


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_claude_codes_request_is_clamped_charged_exactly_and_keeps_the_key(gateway, fake,
                                                                          stream):
    created = user_key(gateway, "--token-quota", "100000/day", "--max-predict", "64")
    answer = claude_code(gateway, created["key"], stream)
    assert answer.status_code == 200
    got = ran(fake)[-1]
    assert got.path == "/v1/messages?beta=true"
    sent = got.json()
    assert sent == {**CLAUDE_CODE, "stream": stream, "max_tokens": 64}  # only the cap changed
    headers = {name.lower(): value for name, value in got.headers.items()}
    assert "authorization" not in headers and "x-api-key" not in headers
    assert created["key"] not in got.body.decode() + json.dumps(headers)
    assert headers["anthropic-beta"].startswith("claude-code-")
    if stream:
        events = [line for line in answer.iter_lines() if line]
        kinds = [line[len(b"event: "):].decode() for line in events
                 if line.startswith(b"event: ")]
        data = [json.loads(line[len(b"data: "):]) for line in events
                if line.startswith(b"data: ")]
        assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
        assert "thinking_delta" in {d.get("delta", {}).get("type") for d in data}
        usage = data[-2]["usage"]
        assert data[0]["message"]["usage"]["input_tokens"] == (usage["input_tokens"]
                                                               + ESTIMATE_OFF_BY)
    else:
        usage = answer.json()["usage"]
        assert [block["type"] for block in answer.json()["content"]] == ["thinking", "text"]
    assert usage["output_tokens"] == 64
    settled(gateway, created["key"], usage["input_tokens"] + usage["output_tokens"])


def test_the_sdk_streams_tool_use_and_thinking_through_the_gateway(gateway, fake):
    key = user_key(gateway)["key"]
    fake.tool_call = {"name": "Tool3", "input": {"path": "/tmp/a.txt"}}
    fake.anthropic_ping = True
    with sdk(gateway, key, bearer_token=True).messages.stream(
            model="llama3.2", max_tokens=6, messages=[{"role": "user", "content": "read it"}],
            tools=CLAUDE_CODE["tools"][:3], thinking={"type": "enabled", "budget_tokens": 3},
            metadata={"user_id": "u1"}) as stream:
        final = stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[2].input == {"path": "/tmp/a.txt"}
    assert final.stop_reason == "tool_use"
    assert final.usage.output_tokens == 6
