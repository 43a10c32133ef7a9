"""GPU-time quotas as gunicorn runs them: a key is refused once it used its time, with
Retry-After at the period's end and X-GPU-Quota-* headers; `keys add/update --gpu-quota`
and the admin API set it, and refuse what is not a GPU quota with a clear error."""
import json
import math
import time

import pytest
import requests

from tests.gateway_process import GatewayProcess, wait_for

pytestmark = pytest.mark.gateway

GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False,
            "options": {"num_predict": 8}}


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def gpu_standing(gw, key):
    answer = requests.get(gw.url + "/api/stats", headers=bearer(key), timeout=60)
    assert answer.status_code == 200
    return answer.json()["gpu_quota"]


def test_a_key_is_refused_once_it_used_its_gpu_time_until_the_day_ends(database, fake,
                                                                       tmp_path):
    """1 s a day, one slot, requests of about 0.3 s one after the other: admitted while
    the charged time is under 1 s, so at most one request past it; then 429 until
    midnight UTC, and /api/stats says so."""
    fake.token_delay = 0.04
    with GatewayProcess(database, fake.url, workers=2, upstream_max_concurrent=1,
                        slot_lease_seconds=600) as gw:
        gw.start(tmp_path / "gpu-quota.log")
        created = gw.add_key("--name", "budget", "--rate-limit", "none", "--gpu-quota", "1s/day")
        assert created["gpu_quota"] == "1s/day"
        statuses, answer = [], None
        for _ in range(20):
            answer = requests.post(gw.url + "/api/generate", json=GENERATE,
                                   headers=bearer(created["key"]), timeout=60)
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                break
            assert answer.headers["X-GPU-Quota-Limit"] == "1"
        midnight = (int(time.time()) // 86400 + 1) * 86400
        assert statuses[-1] == 429 and set(statuses[:-1]) == {200} and len(statuses) >= 3
        assert "GPU quota used up" in answer.json()["error"]
        assert abs(int(answer.headers["Retry-After"]) - math.ceil(midnight - time.time())) <= 2
        assert answer.headers["X-GPU-Quota-Reset"] == str(midnight)
        assert answer.headers["X-GPU-Quota-Remaining"] == "0.000"
        assert "X-Quota-Limit" not in answer.headers  # the token quota's: none here
        figures = gpu_standing(gw, created["key"])
        assert figures["reserved"] == 0 and figures["limit"] == 1
        each = [end - start for _, start, end in fake.occupancy]
        admitted = len(statuses) - 1
        assert figures["used"] == pytest.approx(sum(each[:admitted]), rel=0.05)
        # Admitted while under the quota: past it by less than the last request's time.
        assert 1.0 <= figures["used"] < 1.0 + each[admitted - 1]
        assert len(fake.occupancy) == admitted  # the refused one never reached Ollama
        again = requests.post(gw.url + "/api/generate", json=GENERATE,
                              headers=bearer(created["key"]), timeout=60)
        assert again.status_code == 429
        rows = json.loads(gw.cli("usage", "--key", created["prefix"], "--since", "1d",
                                 "--json").stdout)
        assert rows[0]["gpu_quota"]["used"] == figures["used"]
        text = gw.cli("usage", "--key", created["prefix"], "--since", "1d").stdout
        assert "GPU quota:" in text and "left of 1.00s" in text
        # `none` clears it: the key runs again.
        assert gw.cli("keys", "update", created["prefix"], "--gpu-quota", "none", "--json")
        assert wait_for(lambda: requests.post(
            gw.url + "/api/generate", json=GENERATE, headers=bearer(created["key"]),
            timeout=60).status_code == 200, 30)


@pytest.mark.parametrize("value", ["2x/day", "90", "25h/day"])
def test_keys_add_and_update_refuse_a_malformed_gpu_quota(database, fake, tmp_path, value):
    with GatewayProcess(database, fake.url, workers=1) as gw:
        refused = gw.cli("keys", "add", "--name", "bad-gpu", "--gpu-quota", value, check=False)
        assert refused.returncode == 1
        assert "GPU quota" in refused.stderr and "Traceback" not in refused.stderr
        created = gw.add_key("--name", "good-gpu", "--gpu-quota", "30m/day")
        changed = gw.cli("keys", "update", created["prefix"], "--gpu-quota", value, check=False)
        assert changed.returncode == 1 and "GPU quota" in changed.stderr
        shown = json.loads(gw.cli("keys", "show", created["prefix"], "--json").stdout)
    assert shown["gpu_quota"] == "30m/day"  # unchanged by the refused update
