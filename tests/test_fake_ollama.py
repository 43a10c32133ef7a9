"""Tests for the fake Ollama server used by the integration tests."""

import hashlib
import json
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from tests.fake_ollama import DEFAULT_MODELS, FakeOllama, fake_text
from tests.gateway_process import free_port, kill_session, wait_for


@pytest.fixture
def fake():
    with FakeOllama() as server:
        yield server


def post(fake, path, body, **kw):
    return requests.post(fake.url + path, json=body, timeout=60, **kw)


def test_root_answers_ollama_is_running_for_get_and_head(fake):
    r = requests.get(fake.url, timeout=60)
    assert (r.status_code, r.text) == (200, "Ollama is running")
    assert r.headers["Content-Type"].startswith("text/plain")
    head = requests.head(fake.url, timeout=60)
    assert head.status_code == 200 and head.content == b""


def test_version_and_tags_list_the_models(fake):
    assert requests.get(fake.url + "/api/version", timeout=60).json()["version"].count(".") == 2
    models = requests.get(fake.url + "/api/tags", timeout=60).json()["models"]
    assert [m["name"] for m in models] == DEFAULT_MODELS
    assert set(models[0]) == {"name", "model", "modified_at", "size", "digest", "details"}
    assert set(models[0]["details"]) == {
        "parent_model",
        "format",
        "family",
        "families",
        "parameter_size",
        "quantization_level",
    }


def test_generate_without_stream_returns_the_whole_text_and_counts(fake):
    r = post(
        fake,
        "/api/generate",
        {"model": "llama3.2", "prompt": "why is the sky blue", "stream": False},
    )
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json; charset=utf-8"
    body = r.json()
    assert body["response"] == fake_text(5) == "word0 word1 word2 word3 word4"
    assert body["done"] is True and body["done_reason"] == "stop"
    assert (body["eval_count"], body["prompt_eval_count"]) == (5, 5)
    assert body["context"] and body["total_duration"] >= body["load_duration"] > 0


def test_generate_stream_sends_each_line_as_its_own_chunk(fake):
    fake.token_delay = 0.3
    r = post(fake, "/api/generate", {"model": "llama3.2", "prompt": "hi"}, stream=True)
    assert r.headers["Content-Type"] == "application/x-ndjson"
    assert r.headers["Transfer-Encoding"] == "chunked"
    chunks, generating = [], []
    for chunk in r.raw.read_chunked():
        chunks.append(chunk)
        generating.append(fake.active_streams)
    lines = [json.loads(c) for c in chunks]
    assert all(c.endswith(b"\n") and c.count(b"\n") == 1 for c in chunks)
    assert "".join(line["response"] for line in lines) == fake_text(5)
    assert [line["done"] for line in lines] == [False] * 5 + [True]
    final = lines[-1]
    assert final["response"] == "" and final["eval_count"] == 5 and final["prompt_eval_count"] == 1
    assert {"total_duration", "load_duration", "prompt_eval_duration", "eval_duration"} <= set(
        final
    )
    assert generating[0] == 1  # the first line came while the rest was still being made
    assert wait_for(lambda: fake.active_streams == 0, 30)


def test_num_predict_sets_the_token_count_and_reports_length(fake):
    body = post(
        fake,
        "/api/generate",
        {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": 3}},
    ).json()
    assert (body["response"], body["eval_count"], body["done_reason"]) == (
        fake_text(3),
        3,
        "length",
    )


def test_empty_prompt_is_the_load_model_call(fake):
    body = post(fake, "/api/generate", {"model": "llama3.2"}).json()
    assert body["done"] is True and body["done_reason"] == "load" and body["response"] == ""
    assert [m["name"] for m in requests.get(fake.url + "/api/ps", timeout=60).json()["models"]] == [
        "llama3.2:latest"
    ]


def test_chat_streams_assistant_messages_and_answers_whole_without_stream(fake):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    lines = [
        json.loads(x)
        for x in post(
            fake, "/api/chat", {"model": "qwen2.5:0.5b", "messages": msgs}, stream=True
        ).iter_lines()
    ]
    assert all(line["message"]["role"] == "assistant" for line in lines)
    assert "".join(line["message"]["content"] for line in lines) == fake_text(5)
    assert lines[-1]["done"] is True and lines[-1]["prompt_eval_count"] == 4
    whole = post(
        fake, "/api/chat", {"model": "qwen2.5:0.5b", "messages": msgs, "stream": False}
    ).json()
    assert (
        whole["message"] == {"role": "assistant", "content": fake_text(5)}
        and whole["eval_count"] == 5
    )


def test_embed_and_legacy_embeddings(fake):
    body = post(fake, "/api/embed", {"model": "nomic-embed-text", "input": ["a b", "c"]}).json()
    assert body["model"] == "nomic-embed-text" and len(body["embeddings"]) == 2
    assert (
        abs(sum(x * x for x in body["embeddings"][0]) - 1) < 1e-6 and body["prompt_eval_count"] == 3
    )
    single = post(fake, "/api/embed", {"model": "nomic-embed-text", "input": "a b"}).json()
    assert single["embeddings"] == body["embeddings"][:1]
    assert (
        len(
            post(fake, "/api/embeddings", {"model": "nomic-embed-text", "prompt": "x"}).json()[
                "embedding"
            ]
        )
        > 0
    )


def test_unknown_model_gets_ollamas_404_texts(fake):
    r = post(fake, "/api/generate", {"model": "nope", "prompt": "x"})
    assert (r.status_code, r.json()) == (404, {"error": "model 'nope' not found"})
    r = post(fake, "/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert (r.status_code, r.json()) == (
        404,
        {"error": 'model "nope" not found, try pulling it first'},
    )
    assert post(fake, "/api/show", {"model": "nope"}).status_code == 404


def test_missing_model_and_bad_json_are_400(fake):
    r = post(fake, "/api/chat", {"messages": []})
    assert (r.status_code, r.json()) == (400, {"error": "model is required"})
    r = requests.post(fake.url + "/api/generate", data=b"{not json", timeout=60)
    assert r.status_code == 400 and "invalid character" in r.json()["error"]
    r = requests.post(fake.url + "/api/generate", data=b"", timeout=60)
    assert (r.status_code, r.json()) == (400, {"error": "missing request body"})


def test_unknown_path_is_gos_plain_text_404(fake):
    r = requests.get(fake.url + "/api/nothing", timeout=60)
    assert (r.status_code, r.text, r.headers["Content-Type"]) == (
        404,
        "404 page not found",
        "text/plain",
    )


def test_blob_upload_reads_a_chunked_body_and_checks_the_digest(fake):
    data = b"gguf" * 50_000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    url = f"{fake.url}/api/blobs/{digest}"
    assert requests.head(url, timeout=60).status_code == 404
    r = requests.post(url, data=(data[i : i + 4096] for i in range(0, len(data), 4096)), timeout=60)
    assert r.status_code == 201 and fake.requests[-1].headers["transfer-encoding"] == "chunked"
    assert requests.head(url, timeout=60).status_code == 200 and fake.blobs == {digest: len(data)}
    bad = "sha256:" + "0" * 64
    r = requests.post(f"{fake.url}/api/blobs/{bad}", data=b"other", timeout=60)
    assert r.status_code == 400
    assert (
        r.json()["error"]
        == f'digest mismatch, expected "{bad}", got "sha256:{hashlib.sha256(b"other").hexdigest()}"'
    )


def test_pull_streams_status_and_adds_the_model_then_copy_and_delete(fake):
    statuses = [
        json.loads(x)["status"] for x in post(fake, "/api/pull", {"model": "phi3"}).iter_lines()
    ]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "phi3:latest" in fake.models
    assert (
        post(fake, "/api/copy", {"source": "phi3", "destination": "phi3-copy"}).status_code == 200
    )
    assert (
        requests.delete(fake.url + "/api/delete", json={"model": "phi3"}, timeout=60).status_code
        == 200
    )
    assert (
        requests.delete(fake.url + "/api/delete", json={"model": "phi3"}, timeout=60).status_code
        == 404
    )
    assert fake.models[-1] == "phi3-copy:latest"


def test_requests_are_recorded_with_headers_and_body(fake):
    post(
        fake, "/api/generate?x=1", {"model": "llama3.2", "prompt": "hi"}, headers={"X-Trace": "abc"}
    )
    rec = fake.requests[-1]
    assert (rec.method, rec.path, rec.json()["prompt"]) == ("POST", "/api/generate?x=1", "hi")
    assert rec.headers["x-trace"] == rec.headers["X-Trace"] == "abc"


def test_client_closing_mid_stream_is_recorded_as_a_cancellation(fake):
    fake.token_delay, fake.tokens = 5.0, 50
    r = post(fake, "/api/generate", {"model": "llama3.2", "prompt": "hi"}, stream=True)
    first = next(r.iter_lines())
    assert json.loads(first)["response"] == "word0" and fake.active_streams == 1
    closed = time.monotonic()
    r.close()
    assert fake.wait_for_cancellation(30)
    # Noticed while sleeping, not at the next write five seconds later.
    assert fake.cancellations[0] - closed < 4
    assert wait_for(lambda: fake.active_streams == 0, 30)


def test_fail_after_tokens_ends_the_stream_without_a_done_line(fake):
    fake.fail_after_tokens = 2
    s = socket.create_connection(("127.0.0.1", fake.port), timeout=60)
    body = json.dumps({"model": "llama3.2", "prompt": "hi"}).encode()
    s.sendall(
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    raw = b""
    while chunk := s.recv(65536):
        raw += chunk
    s.close()
    assert raw.count(b'"done":false') == 2 and b'"done":true' not in raw
    assert not raw.endswith(b"0\r\n\r\n")  # no terminating chunk
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        list(
            post(
                fake, "/api/generate", {"model": "llama3.2", "prompt": "hi"}, stream=True
            ).iter_lines()
        )
    assert fake.cancellations == []


def test_reset_restores_knobs_and_forgets_requests(fake):
    fake.tokens, fake.token_delay, fake.fail_after_tokens = 9, 1.0, 1
    fake.models.append("extra:latest")
    requests.get(fake.url, timeout=60)
    fake.reset()
    assert (fake.tokens, fake.token_delay, fake.fail_after_tokens, fake.requests) == (
        5,
        0.0,
        None,
        [],
    )
    assert fake.models == DEFAULT_MODELS
    assert (fake.tool_call, fake.anthropic_ping) == (None, False)


def test_official_ollama_client_talks_to_the_fake(fake):
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=fake.url)
    assert client.generate(model="llama3.2", prompt="hi").response == fake_text(5)
    parts = list(client.generate(model="llama3.2", prompt="hi", stream=True))
    assert "".join(p.response for p in parts) == fake_text(5) and parts[-1].done
    chat = client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert chat.message.content == fake_text(5) and chat.eval_count == 5
    streamed = client.chat(
        model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(p.message.content for p in streamed) == fake_text(5)
    assert [m.model for m in client.list().models] == DEFAULT_MODELS
    assert client.show("llama3.2").details.family == "llama"
    assert len(client.embed(model="nomic-embed-text", input=["a", "b"]).embeddings) == 2
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="missing", prompt="hi")
    assert err.value.status_code == 404 and err.value.error == "model 'missing' not found"


def sse_events(body: bytes):
    """(event, data) of an Anthropic stream; each event is `event:` then `data:` lines."""
    out = []
    for block in body.decode().split("\n\n"):
        if block:
            event, data = block.split("\n")
            assert event.startswith("event: ") and data.startswith("data: ")
            out.append((event[len("event: "):], data[len("data: "):]))
    return out


def test_messages_stream_as_ollamas_anthropic_middleware_writes_them(fake):
    fake.tokens = 5
    body = {"model": "llama3.2", "max_tokens": 5, "stream": True,
            "thinking": {"type": "enabled", "budget_tokens": 2},
            "tools": [{"name": "read", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "one two"}]}
    fake.tool_call = {"name": "read", "input": {"path": "a"}}
    answer = post(fake, "/v1/messages", body)
    assert answer.headers["Content-Type"] == "text/event-stream"
    events = sse_events(answer.content)
    assert b'": ' not in answer.content and b', "' not in answer.content  # Go's compact JSON
    data = [json.loads(d) for _, d in events]
    assert [e for e, _ in events] == [
        "message_start", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert all(e == d["type"] for (e, _), d in zip(events, data, strict=True))
    assert data[0]["message"]["usage"]["output_tokens"] == 0
    assert data[0]["message"]["usage"]["input_tokens"] != 2  # an estimate, not the count
    assert [d["delta"]["type"] for d in data if d["type"] == "content_block_delta"] == [
        "thinking_delta"] * 3 + ["text_delta"] * 2 + ["input_json_delta"]
    assert [d["index"] for d in data if d["type"] == "content_block_start"] == [0, 1, 2]
    assert data[10]["content_block"] == {"type": "tool_use", "id": "call_fake",
                                         "name": "read", "input": {}}
    assert data[11]["delta"]["partial_json"] == '{"path":"a"}'
    assert data[-2] == {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                        "usage": {"input_tokens": 2, "output_tokens": 5}}
    whole = post(fake, "/v1/messages", {**body, "stream": False}).json()
    assert [b["type"] for b in whole["content"]] == ["thinking", "text", "tool_use"]
    assert whole["usage"] == {"input_tokens": 2, "output_tokens": 5}
    fake.tool_call, fake.anthropic_ping = None, True  # Ollama never pings; the knob does
    events = sse_events(post(fake, "/v1/messages", {**body, "thinking": None}).content)
    assert [e for e, _ in events][:3] == ["message_start", "ping", "content_block_start"]
    assert json.loads(events[-2][1])["delta"] == {"stop_reason": "max_tokens"}


def test_messages_errors_in_anthropics_shape(fake):
    ok = {"model": "llama3.2", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    for change, status, kind, message in [
            ({"model": ""}, 400, "invalid_request_error", "model is required"),
            ({"max_tokens": 0}, 400, "invalid_request_error",
             "max_tokens is required and must be positive"),
            ({"messages": []}, 400, "invalid_request_error", "messages is required"),
            ({"model": "nosuch"}, 404, "not_found_error",
             'model "nosuch" not found, try pulling it first')]:
        answer = post(fake, "/v1/messages", {**ok, **change})
        assert answer.status_code == status
        error = answer.json()
        assert error["type"] == "error"
        assert error["error"] == {"type": kind, "message": message}
        assert error["request_id"].startswith("req_")
        # gin's AbortWithStatusJSON for the middleware's own checks; json.Encoder after
        assert answer.content.endswith(b"\n") == (status == 404)


def test_responses_stream_go_maps_with_sorted_keys_and_echo_tools_and_reasoning(fake):
    tools = [{"type": "function", "name": "shell", "parameters": {"type": "object"}}]
    body = {"model": "llama3.2", "input": "hi", "stream": True, "tools": tools,
            "reasoning": {"effort": "high"}}
    events = [block for block in post(fake, "/v1/responses", body).text.split("\n\n") if block]
    data = [block.split("\n")[1][len("data: "):] for block in events]
    for text in data:  # responses.go builds each event as a map[string]any
        assert list(json.loads(text)) == sorted(json.loads(text))
    done = json.loads(data[-1])
    assert (done["type"], done["sequence_number"]) == ("response.completed", len(data) - 1)
    assert done["response"]["tools"] == tools
    assert done["response"]["reasoning"] == {"effort": "high", "summary": None}
    assert list(done["response"])[-1] == "usage"  # after the echoed instructions and tools
    whole = post(fake, "/v1/responses", {**body, "stream": False}).json()
    assert list(whole)[:3] == ["id", "object", "created_at"]  # a struct: its field order


def test_status_answers_whether_cloud_models_are_off(fake):
    answer = requests.get(fake.url + "/api/status", timeout=60)
    assert answer.content == b'{"cloud":{"disabled":false,"source":"none"}}'


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/v1/chat/completions"])
def test_logprobs_come_back_in_ollamas_shape_only_when_asked(fake, path):
    fake.tokens = 2
    body = {"model": "llama3.2", "prompt": "hi", "stream": False,
            "messages": [{"role": "user", "content": "hi"}]}
    plain = post(fake, path, body).json()
    assert "logprobs" not in json.dumps(plain)
    answer = post(fake, path, {**body, "logprobs": True, "top_logprobs": 2}).json()
    logprobs = (answer["choices"][0]["logprobs"]["content"] if path.startswith("/v1/")
                else answer["logprobs"])
    assert [entry["token"] for entry in logprobs] == ["word0", " word1"]
    assert logprobs[0]["bytes"] == list(b"word0")
    assert [t["token"] for t in logprobs[1]["top_logprobs"]] == [" word1", "alt1"]
    streamed = post(fake, path, {**body, "stream": True, "logprobs": True})
    lines = [line for line in streamed.content.split(b"\n") if b"logprobs" in line]
    assert len(lines) == 2  # one a token
    assert b'"top_logprobs"' not in streamed.content  # none asked


def test_module_entry_point_serves_api_and_v1_and_stops_on_ctrl_c():
    """`python -m tests.fake_ollama`, as the README's Quick start runs it."""
    port = free_port()
    root = pathlib.Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_ollama", "--port", str(port)],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline() == f"fake Ollama 0.6.8 listening on http://127.0.0.1:{port}\n"
        url = f"http://127.0.0.1:{port}"
        assert requests.get(url + "/api/version", timeout=60).json() == {"version": "0.6.8"}
        models = requests.get(url + "/v1/models", timeout=60).json()["data"]
        assert [m["id"] for m in models] == DEFAULT_MODELS
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        kill_session(proc)
        proc.stdout.close()
