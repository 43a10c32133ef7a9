"""Codex's compressed /v1/responses bodies, transcriptions and images through a gunicorn-run
gateway: the model inside a zstd or gzip body or a form is checked against the key's
allow-list, and what is relayed is recorded (exact usage where Ollama reports it)."""
import gzip
import io
import json

import openai
import pytest
import requests
import zstandard

from tests.admission.test_quota_gateway import bearer
from tests.gateway_process import GatewayProcess, wait_for

pytestmark = pytest.mark.gateway

# A Codex request as it sends one to a custom provider with wire_api = "responses".
CODEX = {
    "model": "llama3.2", "instructions": "You are a coding agent.",
    "input": [{"type": "message", "role": "user",
               "content": [{"type": "input_text", "text": "list the files"}]}],
    "tools": [{"type": "function", "name": "shell", "description": "Run a command",
               "strict": False, "parameters": {"type": "object", "properties": {
                   "command": {"type": "array", "items": {"type": "string"}}}}}],
    "tool_choice": "auto", "parallel_tool_calls": False,
    "reasoning": {"effort": "medium", "summary": "auto"}, "store": False, "stream": True,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "0b9c6d4e-1f2a-4b3c-8d5e-6f7a8b9c0d1e",
}
COMPRESS = {"zstd": lambda data: zstandard.ZstdCompressor().compress(data),
            "gzip": gzip.compress}


@pytest.fixture(scope="module")
def gateway(database, fake_ollama, tmp_path_factory):
    with GatewayProcess(database, fake_ollama.url, workers=2) as gw:
        yield gw.start(tmp_path_factory.mktemp("log") / "gateway.log")


def rows(gateway, prefix, count):
    """The key's usage by model once `count` requests are recorded."""
    def check():
        found = json.loads(gateway.cli("usage", "--key", prefix, "--by", "model", "--since",
                                       "1d", "--json").stdout)
        return found if sum(r["requests"] for r in found) == count else None

    assert wait_for(check, 60)
    return {row["model"]: row for row in check()}


@pytest.mark.parametrize("coding", ["zstd", "gzip"])
def test_a_compressed_codex_request_is_checked_relayed_and_counted(gateway, fake, coding):
    created = gateway.add_key("--name", f"codex {coding}", "--models", "llama3.2")
    headers = {**bearer(created["key"]), "Content-Type": "application/json",
               "Content-Encoding": coding}
    answer = requests.post(gateway.url + "/v1/responses", headers=headers, timeout=60,
                           data=COMPRESS[coding](json.dumps(CODEX).encode()))
    assert answer.status_code == 200, answer.text
    events = [json.loads(line[len(b"data: "):]) for line in answer.content.splitlines()
              if line.startswith(b"data: ")]
    usage = events[-1]["response"]["usage"]
    assert events[-1]["type"] == "response.completed"
    received = [r for r in fake.requests if r.path == "/v1/responses"][-1]
    assert received.json() == CODEX
    assert "content-encoding" not in received.headers
    assert received.headers["content-length"] == str(len(received.body))

    refused = requests.post(gateway.url + "/v1/responses", headers=headers, timeout=60,
                            data=COMPRESS[coding](json.dumps(
                                {**CODEX, "model": "qwen2.5:0.5b"}).encode()))
    assert refused.status_code == 403
    assert "may not use model 'qwen2.5:0.5b'" in refused.json()["error"]["message"]
    assert len([r for r in fake.requests if r.path == "/v1/responses"]) == 1

    recorded = rows(gateway, created["prefix"], 2)
    ran = recorded["llama3.2:latest"]
    assert (ran["requests"], ran["prompt_tokens"], ran["completion_tokens"]) == (
        1, usage["input_tokens"], usage["output_tokens"])
    assert recorded["qwen2.5:0.5b"]["refused"] == 1  # the model read inside the body


def test_the_openai_sdk_transcribes_and_draws_within_the_keys_models(gateway, fake):
    created = gateway.add_key("--name", "media", "--models", "llama3.2")
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=created["key"],
                           max_retries=0)
    audio = ("speech.wav", io.BytesIO(b"RIFF\x24\x00\x00\x00WAVEfmt "), "audio/wav")
    text = client.audio.transcriptions.create(model="llama3.2", file=audio)
    assert text.text == "word0 word1 word2 word3 word4"
    sent = [r for r in fake.requests if r.path == "/v1/audio/transcriptions"][-1]
    assert b'name="model"\r\n\r\nllama3.2' in sent.body and b"WAVEfmt " in sent.body

    picture = client.images.generate(model="llama3.2", prompt="a lighthouse")
    assert picture.data[0].b64_json

    with pytest.raises(openai.PermissionDeniedError, match="may not use model 'whisper'"):
        client.audio.transcriptions.create(model="whisper", file=audio)
    with pytest.raises(openai.PermissionDeniedError, match="may not use model 'x/flux2'"):
        client.images.generate(model="x/flux2", prompt="a lighthouse")
    with pytest.raises(openai.PermissionDeniedError, match="may not use model 'x/flux2'"):
        client.images.edit(model="x/flux2", prompt="paint it red",
                           image=("a.png", io.BytesIO(b"\x89PNG\r\n"), "image/png"))
    assert len([r for r in fake.requests if r.path.startswith(("/v1/audio", "/v1/images"))]) \
        == 2

    recorded = rows(gateway, created["prefix"], 5)
    assert recorded["llama3.2:latest"]["requests"] == 2
    assert recorded["llama3.2:latest"]["prompt_tokens"] in (0, None)
