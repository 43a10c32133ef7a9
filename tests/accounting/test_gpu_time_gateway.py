"""GPU time as gunicorn runs it: recorded seconds agree with the fake Ollama's own log of
the slots it gave out (÷ slots), on /api and /v1, and show in `usage`, /api/stats and
/metrics; gpu_cost, parallel and model loads count as documented."""
import concurrent.futures
import json
import re
import subprocess
import sys

import pytest
import requests

from tests.gateway_process import GatewayProcess, wait_for

pytestmark = pytest.mark.gateway

GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": True, "options": {"num_predict": 8}}
CHAT_V1 = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
           "max_tokens": 8, "stream": True}


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def gpu_used(gw, prefix, requests_made):
    """The key's GPU seconds from `usage --json`, once its requests are all recorded."""
    def row():
        rows = json.loads(gw.cli("usage", "--key", prefix, "--since", "1d", "--json").stdout)
        return rows[0] if rows and rows[0]["requests"] == requests_made else None

    assert wait_for(row, 60)
    return row()["gpu_seconds"]


def send(gw, key, path, body, count, parallel):
    def one(_):
        answer = requests.post(gw.url + path, json=body, headers=bearer(key), timeout=120)
        return answer.status_code, len(answer.content)

    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(one, range(count)))
    assert [status for status, _ in results] == [200] * count


def with_config(gw, tmp_path, table):
    """Point the gateway and its CLI at a config file whose upstream is `table` (TOML)."""
    path = tmp_path / "config.toml"
    path.write_text(f"[[upstreams]]\n{table}\n")
    gw.env.pop("OLLAMA_URL", None)
    gw.env["OLLAMA_GW_CONFIG"] = str(path)


@pytest.mark.parametrize("path, body", [("/api/generate", GENERATE),
                                        ("/v1/chat/completions", CHAT_V1)],
                         ids=["api", "v1"])
def test_gpu_seconds_agree_with_the_upstreams_slot_log(database, fake, tmp_path, path, body):
    """Three slots, six at once: each request's time held ÷ 3, summed, is the fake's log
    of slot-seconds ÷ 3 within 5 %; /metrics says the same."""
    fake.num_parallel, fake.token_delay = 3, 0.05  # each request holds its slot ~0.4 s
    with GatewayProcess(database, fake.url, workers=2, upstream_max_concurrent=3,
                        metrics_public="true") as gw:
        gw.start(tmp_path / "gpu.log")
        created = gw.add_key("--name", "gpu", "--rate-limit", "none")
        send(gw, created["key"], path, body, 12, 6)
        recorded = gpu_used(gw, created["prefix"], 12)
        truth = fake.slot_seconds(path) / 3
        assert len([o for o in fake.occupancy if o[0] == path]) == 12
        assert truth == pytest.approx(recorded, rel=0.05), (recorded, truth)
        sample = re.compile(r'^ollama_gw_gpu_seconds_total\{key="%s",model="llama3.2:latest",'
                            r'upstream="127.0.0.1:%d"\} (\S+)$' % (created["prefix"], fake.port),
                            re.M)

        def scraped():
            found = sample.search(requests.get(gw.url + "/metrics", timeout=30).text)
            return found and float(found.group(1)) == pytest.approx(recorded, abs=0.01)

        assert wait_for(scraped, 30)


def test_another_keys_gpu_time_is_absent_from_a_keys_stats(database, fake, tmp_path):
    fake.token_delay = 0.02
    with GatewayProcess(database, fake.url, workers=1) as gw:
        gw.start(tmp_path / "apart.log")
        mine = gw.add_key("--name", "mine", "--rate-limit", "none")
        other = gw.add_key("--name", "other", "--rate-limit", "none")
        send(gw, mine["key"], "/api/generate", GENERATE, 1, 1)
        send(gw, other["key"], "/api/generate", {**GENERATE, "model": "qwen2.5:0.5b"}, 3, 1)
        used = gpu_used(gw, mine["prefix"], 1)
        others = gpu_used(gw, other["prefix"], 3)
        assert others > 2 * used > 0
        stats = requests.get(gw.url + "/api/stats", headers=bearer(mine["key"]),
                             timeout=30).json()
    assert stats["gpu_seconds"] == pytest.approx(used, abs=0.002)
    assert list(stats["gpu_seconds_by_model"]) == ["llama3.2:latest"]
    assert stats["gpu_seconds_by_upstream"] == {f"127.0.0.1:{fake.port}": pytest.approx(
        used, abs=0.002)}


def test_gpu_cost_multiplies_and_parallel_divides_an_uncapped_upstream(database, fake,
                                                                        tmp_path):
    """No cap (max_concurrent 0), parallel 4, gpu_cost 0.5: a request alone at the fake
    held its slot for T; it is charged T / 4 × 0.5."""
    fake.token_delay = 0.05
    with GatewayProcess(database, fake.url, workers=1) as gw:
        with_config(gw, tmp_path, f'url = "{fake.url}"\nname = "small"\nmax_concurrent = 0\n'
                                  "parallel = 4\ngpu_cost = 0.5")
        gw.start(tmp_path / "cost.log")
        created = gw.add_key("--name", "cost", "--rate-limit", "none")
        send(gw, created["key"], "/api/generate", GENERATE, 3, 1)
        recorded = gpu_used(gw, created["prefix"], 3)
    assert recorded == pytest.approx(fake.slot_seconds() / 4 * 0.5, rel=0.05)


@pytest.mark.parametrize("charge", ["request", "spread"])
def test_a_model_load_is_charged_to_the_request_that_caused_it_or_spread(database, fake,
                                                                        tmp_path, charge):
    """The first request loads the model (1 s); with spread (over 2) the next two pay
    half of it each and the first pays none."""
    fake.load_delay, fake.token_delay = 1.0, 0.01
    with GatewayProcess(database, fake.url, workers=1, upstream_max_concurrent=1,
                        gpu_load_charge=charge, gpu_load_spread_requests=2) as gw:
        gw.start(tmp_path / "load.log")
        created = gw.add_key("--name", "loader", "--rate-limit", "none")
        send(gw, created["key"], "/api/generate", GENERATE, 4, 1)
        gpu_used(gw, created["prefix"], 4)
        records = _records(gw, created["id"])
    loads = [load for _, load in records]
    held = [end - start for _, start, end in fake.occupancy]
    if charge == "request":
        assert loads[0] == pytest.approx(1.0, abs=0.1) and loads[1:] == [0.0, 0.0, 0.0]
        assert [gpu for gpu, _ in records] == pytest.approx(held, rel=0.05, abs=0.01)
    else:
        assert loads[0] == 0.0 and loads[3] == 0.0
        assert loads[1] == pytest.approx(0.5, abs=0.05) == loads[2]
        assert records[0][0] == pytest.approx(held[0] - 1.0, abs=0.05)
        assert records[1][0] == pytest.approx(held[1] + 0.5, abs=0.05)
    assert sum(gpu for gpu, _ in records) == pytest.approx(sum(held), rel=0.05)


def _records(gw, key_id):
    """(gpu_seconds, load_seconds) of the key's usage rows, in order, read as the gateway's
    CLI opens the database."""
    script = ("from app.store.models import UsageRecord as R; from cli.context import open_db; "
              "open_db(); import json; print(json.dumps([(r.gpu_seconds, r.load_seconds) "
              f"for r in R.select().where(R.key_id == {int(key_id)}).order_by(R.id)]))")
    result = subprocess.run([sys.executable, "-c", script], env=gw.env, capture_output=True,
                            text=True, timeout=60, check=True)
    return [tuple(row) for row in json.loads(result.stdout)]
