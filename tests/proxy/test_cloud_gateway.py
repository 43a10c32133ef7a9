"""Cloud models and web search through a gunicorn-run gateway: keys made with the CLI, the
setting changed by a restart, usage read back as an admin reads it (stats, CLI, metrics)."""
import json
import re

import pytest
import requests

from tests.gateway_process import GatewayProcess, wait_for

pytestmark = pytest.mark.gateway
CLOUD_MODEL = "gpt-oss:120b-cloud"


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def generate(gw, key, model):
    return requests.post(gw.url + "/api/generate", headers=bearer(key), timeout=30,
                         json={"model": model, "prompt": "hi", "stream": False})


def metric(text, name, **labels):
    """The value of a sample of `name` with at least `labels`, 0 if there is none."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}{{(.*)}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_cloud_permission_and_usage_through_the_gateway(database, fake, tmp_path):
    fake.models.append(CLOUD_MODEL)
    with GatewayProcess(database, fake.url, workers=2, metrics_public="true") as gw:
        gw.start(tmp_path / "cloud.log")
        user = gw.add_key("--name", "cloud-user")
        allowed = gw.add_key("--name", "cloud-allowed", "--cloud", "allow")
        admin = gw.add_key("--name", "cloud-admin", "--role", "admin")
        assert (user["cloud"], allowed["cloud"], admin["cloud"]) == ("default", "allow",
                                                                     "default")

        refused = generate(gw, user["key"], CLOUD_MODEL)
        assert refused.status_code == 403
        assert "is a cloud model" in refused.json()["error"]
        assert "--cloud allow" in refused.json()["error"]
        for key in (allowed, admin):
            assert generate(gw, key["key"], CLOUD_MODEL).status_code == 200
        assert generate(gw, allowed["key"], "llama3.2").status_code == 200
        search = requests.post(gw.url + "/api/experimental/web_search", timeout=30,
                               headers=bearer(user["key"]), json={"query": "x"})
        assert search.status_code == 403
        assert [r.json()["model"] for r in fake.requests if r.path == "/api/generate"] == [
            CLOUD_MODEL, CLOUD_MODEL, "llama3.2"]  # the refused ones never reached Ollama
        assert not [r for r in fake.requests if r.path.startswith("/api/experimental/")]

        def own_cloud(key):
            return requests.get(gw.url + "/api/stats", headers=bearer(key["key"]),
                                timeout=30).json()["cloud"]

        # Records are written within a quarter second, by whichever worker served them.
        assert wait_for(lambda: own_cloud(allowed)["last_5h"]["requests"] == 1, 30)
        assert own_cloud(allowed)["last_7d"]["tokens"] == 1 + 5  # 1 prompt, 5 answer tokens
        assert own_cloud(user)["last_5h"]["requests"] == 0  # refused: it never ran there
        assert wait_for(lambda: own_cloud(admin)["last_5h"]["requests"] == 1, 30)
        everyone = requests.get(gw.url + "/api/admin/stats", headers=bearer(admin["key"]),
                                timeout=30).json()
        assert everyone["cloud"]["last_5h"]["requests"] == 2
        assert everyone["total_requests"] >= 5  # local and cloud, refusals included

        rows = {r["key_prefix"]: r for r in json.loads(
            gw.cli("usage", "--by", "key", "--since", "1d", "--json").stdout)}
        assert (rows[allowed["prefix"]]["requests"], rows[allowed["prefix"]]["cloud_requests"],
                rows[allowed["prefix"]]["cloud_tokens"]) == (2, 1, 6)
        assert rows[user["prefix"]]["cloud_requests"] == 0
        windows = json.loads(gw.cli("usage", "cloud", "--key", allowed["prefix"],
                                    "--json").stdout)
        assert windows["last_5h"]["requests"] == 1
        assert "last 5h 2 requests, 12 tokens" in gw.cli("usage").stdout

        def metrics():
            return requests.get(gw.url + "/metrics", timeout=30).text

        assert wait_for(lambda: metric(metrics(), "ollama_gw_cloud_requests_total",
                                       endpoint="/api/generate", status="200") == 2, 30)
        text = metrics()
        assert metric(text, "ollama_gw_cloud_tokens_total", model=CLOUD_MODEL) == 12
        assert metric(text, "ollama_gw_tokens_total", model="llama3.2:latest") == 6
        assert metric(text, "ollama_gw_cloud_tokens_total", model="llama3.2:latest") == 0

    # The setting changed, the keys untouched: the default keys follow it.
    with GatewayProcess(database, fake.url, workers=1, cloud_default="deny") as gw:
        gw.start(tmp_path / "deny.log")
        assert generate(gw, admin["key"], CLOUD_MODEL).status_code == 403
        assert generate(gw, allowed["key"], CLOUD_MODEL).status_code == 200
        gw.cli("keys", "update", user["prefix"], "--cloud", "allow")
        assert wait_for(lambda: generate(gw, user["key"], CLOUD_MODEL).status_code == 200, 30)
        gw.cli("keys", "update", user["prefix"], "--cloud", "default")
        assert wait_for(lambda: generate(gw, user["key"], CLOUD_MODEL).status_code == 403, 30)
        shown = json.loads(gw.cli("keys", "show", user["prefix"], "--json").stdout)
        assert shown["cloud"] == "default"
