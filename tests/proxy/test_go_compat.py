"""go-ollama-api's README examples, as `requests` calls, against a running gateway.

Its clients must keep working unchanged: `GET /health?apikey=…`, `POST /generate` with
the key in the body, streaming, and the 10-per-minute limit of console-made keys.
Where it was wrong (500 on upstream trouble, fields dropped) ollama-gw does better.
"""
import datetime
import json
import re
import subprocess
import sys
import time

import pytest
import requests

from tests import leak_check
from tests.gateway_process import GatewayProcess, kill_session, wait_for

pytestmark = pytest.mark.gateway
SECRET = re.compile(r"ogw_[A-Za-z0-9_-]{43}")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway(request, tmp_path_factory, fake_ollama):
    tmp = tmp_path_factory.mktemp("go")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp}/go.db"
    else:
        from tests.conftest import reset_postgres
        url = request.getfixturevalue("postgres_url")
        reset_postgres(url)
    with GatewayProcess(url, fake_ollama.url, workers=2) as gw:
        gw.start(tmp / "gateway.log")
        yield gw


def console_key(gateway):
    """A key made the go-ollama-api way: `generatekey` at the console."""
    result = subprocess.run([sys.executable, "-m", "cli", "shell"], input="generatekey\n",
                            env=gateway.env, capture_output=True, text=True, timeout=120)
    [secret] = SECRET.findall(result.stdout)
    leak_check.remember_secrets([secret])
    return secret


def test_health_with_a_key_answers_its_shape(gateway):
    key = console_key(gateway)
    answer = requests.get(f"{gateway.url}/health?apikey={key}", timeout=60)
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "API is healthy" and set(body) == {"status", "timestamp"}
    stamp = datetime.datetime.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%SZ")
    assert abs(stamp - datetime.datetime.utcnow()).total_seconds() < 120

    wrong = requests.get(f"{gateway.url}/health?apikey=your-api-key", timeout=60)
    assert wrong.status_code == 401 and "error" in wrong.json()
    assert "your-api-key" not in wrong.text
    plain = requests.get(f"{gateway.url}/health", timeout=60).json()  # load balancers
    assert plain["database"] == "ok" and "upstreams" in plain


def test_generate_with_the_key_in_the_body(gateway, fake_ollama):
    key = console_key(gateway)
    fake_ollama.reset()
    answer = requests.post(f"{gateway.url}/generate", timeout=60, json={
        "apikey": key, "model": "llama3.2", "prompt": "Hello, how are you?",
        "stream": False, "images": [], "raw": False,
        "options": {"temperature": 0.2}, "system": "be brief"})
    assert answer.status_code == 200
    assert answer.json()["done"] is True and answer.json()["response"]
    [sent] = [r for r in fake_ollama.requests if r.path == "/api/generate"]
    forwarded = sent.json()
    assert "apikey" not in forwarded and key not in sent.body.decode()
    # go-ollama-api dropped every field but its six; they all reach Ollama here.
    assert forwarded["options"] == {"temperature": 0.2} and forwarded["system"] == "be brief"


def test_generate_with_images_and_streaming(gateway, fake_ollama):
    key = console_key(gateway)
    with_image = requests.post(f"{gateway.url}/generate", timeout=60, json={
        "apikey": key, "model": "llama3.2", "prompt": "What do you see in this image?",
        "stream": False, "images": ["aGVsbG8="], "raw": False})
    assert with_image.status_code == 200
    streamed = requests.post(f"{gateway.url}/generate", timeout=60, stream=True, json={
        "apikey": key, "model": "llama3.2", "prompt": "Write a long story",
        "stream": True, "images": [], "raw": False})
    assert streamed.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in streamed.iter_lines() if line]
    assert len(lines) > 2 and lines[-1]["done"] is True
    assert "".join(line["response"] for line in lines[:-1])


def test_errors_keep_their_meaning(gateway):
    key = console_key(gateway)
    missing = requests.post(f"{gateway.url}/generate", timeout=60,
                            json={"model": "llama3.2", "prompt": "hi"})
    assert missing.status_code == 401 and "missing API key" in missing.json()["error"]
    invalid = requests.post(f"{gateway.url}/generate", timeout=60,
                            json={"apikey": "your-api-key", "model": "llama3.2", "prompt": "hi"})
    assert invalid.status_code == 401 and invalid.json()["error"] == "invalid API key"
    unknown = requests.post(f"{gateway.url}/generate", timeout=60, json={
        "apikey": key, "model": "nonexistent-model", "prompt": "hi", "stream": False})
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "model 'nonexistent-model' not found"}
    broken = requests.post(f"{gateway.url}/generate", data="{not json", timeout=60,
                           headers={"Content-Type": "application/json", "X-API-Key": key})
    assert broken.status_code == 400
    # Without a key anywhere the gateway cannot know who asks: no key, no further work.
    assert requests.post(f"{gateway.url}/generate", data="{not json",
                         timeout=60).status_code == 401


def test_a_console_key_gets_ten_requests_a_minute(gateway):
    key = console_key(gateway)
    body = {"apikey": key, "model": "llama3.2", "prompt": "hi", "stream": False}
    for _ in range(3):  # a window that ends mid-burst would let an eleventh through: retry
        minute = int(time.time() // 60)
        statuses = [requests.post(f"{gateway.url}/generate", json=body, timeout=60).status_code
                    for _ in range(11)]
        if int(time.time() // 60) == minute:
            break
        body["apikey"] = console_key(gateway)  # a fresh key: this one's window was split
    assert statuses == [200] * 10 + [429]
    refused = requests.post(f"{gateway.url}/generate", json=body, timeout=60)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) <= 60


def test_its_command_line_flags_start_the_gateway(fake_ollama, tmp_path):
    """`./server -port 8080 -ollama-url …` becomes `ollama-gw serve -port … -ollama-url …`."""
    gw = GatewayProcess(f"sqlite:///{tmp_path}/flags.db", "http://127.0.0.1:9", workers=1)
    env = {k: v for k, v in gw.env.items() if k not in ("OLLAMA_URL", "OLLAMA_GW_BIND")}
    key = console_key(gw)
    with open(tmp_path / "flags.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "-port", str(gw.port),
             "-ollama-url", fake_ollama.url], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        assert wait_for(lambda: _answers(gw.url), 90), (tmp_path / "flags.log").read_text()
        answer = requests.post(f"{gw.url}/generate", timeout=60, json={
            "apikey": key, "model": "llama3.2", "prompt": "hi", "stream": False})
        assert answer.status_code == 200 and answer.json()["done"] is True
    finally:
        kill_session(proc)


def _answers(url):
    try:
        return requests.get(url + "/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False
