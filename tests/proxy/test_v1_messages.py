"""Anthropic's Messages API (/v1/messages) under a key's limits: the answer cap clamped
(never refused: clients send max_tokens 32000 on every request), the token quota reserved
and charged with Ollama's final counts; and the endpoints not counted in tokens (images,
audio) refused to quota keys."""
import pytest

from app.accounting.usage import token_counts
from app.admission import estimate
from app.proxy.relay import answer_finished
from app.store.models import TokenUsage
from tests.conftest import auth_header
from tests.fake_ollama_v1 import ESTIMATE_OFF_BY

# What Claude Code sends, in small (/work/shared/clients/claude-code.md).
MESSAGES = {"model": "llama3.2", "max_tokens": 32000,
            "system": [{"type": "text", "text": "You are a careful helper."},
                       {"type": "text", "text": "Answer briefly.",
                        "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "say hi"}]}]}


def sent(fake):
    return [r for r in fake.requests if r.path.split("?")[0] == "/v1/messages"][-1].json()


def charged(client, key):
    assert client.application.extensions["usage"].write_pending()
    return sum(row.tokens for row in TokenUsage.select().where(TokenUsage.key_id == key.id))


@pytest.mark.parametrize("mode", ["refuse", "clamp"])
def test_a_keys_max_predict_clamps_max_tokens_and_the_thinking_budget_in_either_mode(
        make_client, make_key, fake, mode):
    client = make_client(model_policy=mode)
    secret, _ = make_key(max_predict=50)
    body = {**MESSAGES, "thinking": {"type": "enabled", "budget_tokens": 10000}}
    answer = client.post("/v1/messages?beta=true", json=body, headers=auth_header(secret))
    assert answer.status_code == 200
    assert sent(fake)["max_tokens"] == 50
    assert sent(fake)["thinking"] == {"type": "enabled", "budget_tokens": 50}
    assert answer.get_json()["usage"]["output_tokens"] == 50

    within = {**MESSAGES, "max_tokens": 50, "thinking": {"type": "adaptive"}}
    assert client.post("/v1/messages", json=within, headers=auth_header(secret)).status_code \
        == 200
    assert sent(fake) == within  # nothing to change: sent as it came


def test_the_prompt_estimate_counts_system_blocks_tools_and_tool_calls():
    tool_use = {"type": "tool_use", "id": "t1", "name": "read", "input": {"path": "a.txt"}}
    body = {"model": "m", "max_tokens": 5, "system": [{"type": "text", "text": "abcd " * 8}],
            "messages": [{"role": "assistant", "content": [tool_use]},
                         {"role": "user", "content": [{"type": "tool_result",
                                                       "tool_use_id": "t1",
                                                       "content": "efgh " * 4}]}]}
    assert estimate.prompt_tokens(body) == (
        10  # the system block's 40 characters
        + estimate.text_tokens('{"path": "a.txt"}')  # the tool call's input
        + 5  # the tool result's 20 characters
        + 2 * estimate.MESSAGE_TOKENS)


def test_a_quota_key_reserves_and_is_charged_ollamas_final_counts(client, make_key, fake):
    secret, key = make_key(token_quota="1000/day")
    for stream in (True, False):
        body = {**MESSAGES, "max_tokens": 7, "stream": stream}
        before = charged(client, key)
        answer = client.post("/v1/messages", json=body, headers=auth_header(secret))
        assert answer.status_code == 200
        text = answer.get_data()
        answer.close()  # the record is taken as the server closes the answer
        if stream:
            assert b'"output_tokens":0' in text and b"message_delta" in text
        # The fake counts the words of the system blocks and the text (9), and 7 answered.
        # message_start's estimate (ESTIMATE_OFF_BY more) is not what is charged.
        assert charged(client, key) - before == 9 + 7
    assert ESTIMATE_OFF_BY > 0


def test_the_counts_are_the_final_message_deltas_not_message_starts_estimate():
    tail = (b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
            b'{"input_tokens":1009,"output_tokens":0}}}\n\n'
            b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
            b'"end_turn"},"usage":{"input_tokens":9,"output_tokens":1}}\n\n'
            b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert token_counts(tail, 6, True) == (9, 1, None)
    # A client that stops reading at message_stop (before the stream's end) had it all.
    assert answer_finished(tail)
    assert not answer_finished(tail[:tail.index(b"event: message_stop")])


def test_a_quota_key_without_max_tokens_gets_what_is_left(client, make_key, fake):
    secret, _ = make_key(token_quota="300/day")
    body = {key: value for key, value in MESSAGES.items() if key != "max_tokens"}
    answer = client.post("/v1/messages", json=body, headers=auth_header(secret))
    assert answer.status_code == 200
    assert sent(fake)["max_tokens"] == 300 - estimate.prompt_tokens(body)
    assert answer.headers["X-Quota-Remaining"] == "0"  # all of it reserved while it ran


def test_count_tokens_answers_what_a_quota_reserves_for_the_same_body(client, make_key, fake):
    secret, _ = make_key(token_quota="5000/day")
    body = {**{k: v for k, v in MESSAGES.items() if k != "max_tokens"},
            "tools": [{"name": "read", "description": "reads a file",
                       "input_schema": {"type": "object", "properties": {
                           "path": {"type": "string"}}}}],
            "messages": [*MESSAGES["messages"],
                         {"role": "assistant", "content": [
                             {"type": "thinking", "thinking": "let me look"},
                             {"type": "tool_use", "id": "t1", "name": "read",
                              "input": {"path": "a.txt"}}]},
                         {"role": "user", "content": [
                             {"type": "tool_result", "tool_use_id": "t1", "content": "hello"},
                             {"type": "image", "source": {"type": "base64",
                                                          "media_type": "image/png",
                                                          "data": "iVBORw0KGgo="}}]}]}
    counted = client.post("/v1/messages/count_tokens", json=body, headers=auth_header(secret))
    assert counted.status_code == 200
    tokens = counted.get_json()["input_tokens"]
    assert counted.get_json() == {"input_tokens": tokens}
    assert tokens > estimate.IMAGE_TOKENS
    assert fake.requests == []  # answered by the gateway
    # The reservation for the same body leaves the answer exactly what the estimate does not.
    assert client.post("/v1/messages", json=body, headers=auth_header(secret)).status_code \
        == 200
    assert sent(fake)["max_tokens"] == 5000 - tokens


def test_a_quota_key_is_clamped_to_what_is_left_so_claude_codes_32000_fits(client, make_key,
                                                                          fake):
    secret, _ = make_key(token_quota="300/day")
    prompt = estimate.prompt_tokens(MESSAGES)
    answer = client.post("/v1/messages", json=MESSAGES, headers=auth_header(secret))
    assert answer.status_code == 200
    assert sent(fake)["max_tokens"] == 300 - prompt  # not 32000: the reservation fits
    assert answer.headers["X-Quota-Remaining"] == "0"
    exactly = {**MESSAGES, "max_tokens": 300 - prompt}  # what is left: sent as it came
    fresh, _ = make_key(token_quota="300/day")
    assert client.post("/v1/messages", json=exactly, headers=auth_header(fresh)).status_code \
        == 200
    assert sent(fake) == exactly


UNCOUNTED = ["/v1/images/generations", "/v1/images/edits", "/v1/audio/transcriptions"]
FORM = (b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\nRIFF....\r\n--XyZ--\r\n")


@pytest.mark.parametrize("path", UNCOUNTED)
@pytest.mark.parametrize("form", [False, True], ids=["json", "form"])
def test_endpoints_not_counted_in_tokens_are_refused_to_quota_keys(client, make_key, fake,
                                                                    path, form):
    quota_key, _ = make_key(token_quota="1000000/month")
    free_key, _ = make_key()

    def post(secret):
        if form or path == "/v1/audio/transcriptions":  # it takes only a form
            return client.post(path, data=FORM, headers={
                **auth_header(secret), "Content-Type": "multipart/form-data; boundary=XyZ"})
        return client.post(path, json={"model": "llama3.2", "prompt": "a cat"},
                           headers=auth_header(secret))

    refused = post(quota_key)
    assert refused.status_code == 403
    error = refused.get_json()["error"]
    assert error["type"] == "permission_error"
    assert "not counted in tokens" in error["message"] and "token quota" in error["message"]
    assert fake.requests == []
    answer = post(free_key)
    if form and path == "/v1/images/generations":  # it takes JSON only: the gateway's 400
        assert answer.status_code == 400 and fake.requests == []
        return
    # Relayed: the fake Ollama's own answer (no model "whisper"; edits want an image).
    assert answer.status_code in (200, 400, 404)
    assert [r.path for r in fake.requests] == [path]
