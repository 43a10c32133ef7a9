"""Token quotas as gunicorn runs them: reservations hold a burst, hang-ups are charged,
and a key sees where it stands (X-Quota-*, /api/stats, `ollama-gw usage`)."""
import concurrent.futures
import json
import time

import pytest
import requests

from app.admission import estimate
from tests.gateway_process import GatewayProcess, wait_for

pytestmark = pytest.mark.gateway
# Gateways here keep reservations leased for 600 s: one left behind would not lapse within
# the tests' waits, so a reservation not settled with its charge shows.


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def quota_of(gw, key_prefix):
    """The key's token_quota as `ollama-gw usage --key KEY --json` shows it."""
    rows = json.loads(gw.cli("usage", "--key", key_prefix, "--since", "1d", "--json").stdout)
    if rows:
        return rows[0]["token_quota"]
    return None


def usage_row(gw, key_prefix):
    rows = json.loads(gw.cli("usage", "--key", key_prefix, "--since", "1d", "--json").stdout)
    return rows[0] if rows else None


def own_stats(gw, key):
    answer = requests.get(gw.url + "/api/stats", headers=bearer(key), timeout=60)
    assert answer.status_code == 200
    return answer


def settled(gw, key, used):
    """Once the key's tokens are charged and nothing is reserved: its /api/stats answer."""
    def check():
        answer = own_stats(gw, key)
        figures = answer.json()["token_quota"]
        return answer if (figures["used"], figures["reserved"]) == (used, 0) else None

    assert wait_for(check, 60), own_stats(gw, key).json()["token_quota"]
    return check()


def midnight():
    return (int(time.time()) // 86400 + 1) * 86400


def test_a_burst_is_charged_at_most_one_request_past_the_quota(database, fake, tmp_path):
    with GatewayProcess(database, fake.url, workers=2, slot_lease_seconds=600) as gw:
        gw.start(tmp_path / "burst.log")
        created = gw.add_key("--name", "burst", "--rate-limit", "none",
                             "--token-quota", "100/day")
        fake.token_delay = 0.05  # the requests overlap: each runs for a quarter second
        body = {"model": "llama3.2", "prompt": "hi", "stream": False,
                "options": {"num_predict": 5}}  # 1 prompt + 5 = 6 tokens, as estimated

        def one(_):
            return requests.post(gw.url + "/api/generate", json=body,
                                 headers=bearer(created["key"]), timeout=120).status_code

        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            statuses = list(pool.map(one, range(30)))
        assert set(statuses) == {200, 429}
        served = statuses.count(200)
        assert wait_for(lambda: quota_of(gw, created["prefix"])["reserved"] == 0, 60)
        charged = quota_of(gw, created["prefix"])["used"]
    assert charged == 6 * served
    # Admitted while charged + reserved < 100: the last one admitted may pass it by its own 6.
    assert 100 <= charged <= 100 + 6


def test_a_hang_up_before_the_final_object_charges_the_estimated_prompt(
        database, fake, tmp_path):
    with GatewayProcess(database, fake.url, workers=1, slot_lease_seconds=600) as gw:
        gw.start(tmp_path / "hangup.log")
        created = gw.add_key("--name", "hangs-up", "--rate-limit", "none",
                             "--token-quota", "100000/day")
        fake.token_delay = 0.1
        body = {"model": "llama3.2", "prompt": "word " * 3000, "options": {"num_predict": 50}}
        answer = requests.post(gw.url + "/api/generate", json=body,
                               headers=bearer(created["key"]), stream=True, timeout=120)
        lines = answer.iter_lines()
        for _ in range(3):
            assert json.loads(next(lines))["done"] is False
        answer.close()  # gone before the final object, with Ollama's counts in it
        assert fake.wait_for_cancellation(60)
        assert wait_for(lambda: (usage_row(gw, created["prefix"]) or {}).get("requests") == 1
                        and quota_of(gw, created["prefix"])["reserved"] == 0, 60)
        row = usage_row(gw, created["prefix"])
    prompt = estimate.prompt_tokens(body)
    assert prompt == 3750  # 15,000 characters; Ollama would have counted 3,000 words
    assert row["aborted"] == 1
    assert (row["prompt_tokens"], row["prompt_tokens_estimated"]) == (prompt, prompt)
    assert 3 <= row["completion_tokens"] < 50
    assert row["token_quota"]["used"] == prompt + row["completion_tokens"]


def test_quota_headers_and_stats_are_exact_at_the_boundary(database, fake, tmp_path):
    with GatewayProcess(database, fake.url, workers=2, slot_lease_seconds=600) as gw:
        gw.start(tmp_path / "boundary.log")
        created = gw.add_key("--name", "edge", "--rate-limit", "none",
                             "--token-quota", "20/day")
        key = created["key"]
        reset = midnight()
        first = requests.post(gw.url + "/api/generate", headers=bearer(key), timeout=60, json={
            "model": "llama3.2", "prompt": "hi", "stream": False,
            "options": {"num_predict": 18}})  # 1 + 18: the quota less one
        assert first.status_code == 200
        assert (first.headers["X-Quota-Limit"], first.headers["X-Quota-Remaining"],
                first.headers["X-Quota-Reset"]) == ("20", "1", str(reset))
        stats = settled(gw, key, 19)
        assert stats.json()["token_quota"] == {"limit": 20, "used": 19, "reserved": 0,
                                               "left": 1, "resets_at": reset}
        assert stats.headers["X-Quota-Remaining"] == "1"
        assert stats.json()["prompt_tokens_estimated"] == 0

        # used == quota - 1: admitted; an embedding of one token brings it to the quota.
        second = requests.post(gw.url + "/api/embed", headers=bearer(key), timeout=60,
                               json={"model": "nomic-embed-text", "input": "one"})
        assert second.status_code == 200
        assert second.headers["X-Quota-Remaining"] == "0"
        stats = settled(gw, key, 20)
        assert stats.json()["token_quota"] == {"limit": 20, "used": 20, "reserved": 0,
                                               "left": 0, "resets_at": reset}

        # used == quota: refused before Ollama hears of it, and says when it resets.
        asked = len(fake.requests)
        refused = requests.post(gw.url + "/api/generate", headers=bearer(key), timeout=60,
                                json={"model": "llama3.2", "prompt": "hi", "stream": False})
        assert refused.status_code == 429
        assert "token quota used up" in refused.json()["error"]
        assert abs(int(refused.headers["Retry-After"]) - (reset - time.time())) <= 5
        assert (refused.headers["X-Quota-Limit"], refused.headers["X-Quota-Remaining"],
                refused.headers["X-Quota-Reset"]) == ("20", "0", str(reset))
        assert len(fake.requests) == asked
        bodiless = requests.get(gw.url + "/api/tags", headers=bearer(key), timeout=60)
        assert (bodiless.status_code, bodiless.headers["X-Quota-Remaining"]) == (429, "0")


def test_another_keys_reservation_is_absent_from_this_keys_figures(database, fake, tmp_path):
    with GatewayProcess(database, fake.url, workers=2, slot_lease_seconds=600) as gw:
        gw.start(tmp_path / "others.log")
        mine = gw.add_key("--name", "mine", "--rate-limit", "none", "--token-quota", "500/day")
        other = gw.add_key("--name", "other", "--rate-limit", "none",
                           "--token-quota", "500/day")
        fake.tokens, fake.token_delay = 50, 0.2
        running = requests.post(gw.url + "/api/generate", headers=bearer(other["key"]),
                                json={"model": "llama3.2", "prompt": "hi"}, stream=True,
                                timeout=120)
        try:
            # Under way: its reservation is held. The iterator is kept: one dropped closes
            # the connection, and the gateway would end the request.
            lines = running.iter_lines()
            next(lines)
            theirs = own_stats(gw, other["key"])
            assert theirs.json()["token_quota"]["reserved"] == 500  # 1 + 499 left to answer
            assert theirs.headers["X-Quota-Remaining"] == "0"
            ours = own_stats(gw, mine["key"])
            assert ours.json()["token_quota"] == {"limit": 500, "used": 0, "reserved": 0,
                                                  "left": 500, "resets_at": midnight()}
            assert ours.headers["X-Quota-Remaining"] == "500"
            assert quota_of(gw, mine["prefix"]) is None  # no usage rows: nothing to show
        finally:
            running.close()


def test_a_hang_up_while_ollama_reads_the_prompt_charges_it(database, fake, tmp_path):
    with GatewayProcess(database, fake.url, workers=1, slot_lease_seconds=600) as gw:
        gw.start(tmp_path / "early.log")
        created = gw.add_key("--name", "early", "--rate-limit", "none",
                             "--token-quota", "100000/day")
        fake.first_byte_delay = 60  # Ollama still evaluating the prompt: not a byte yet
        body = {"model": "llama3.2", "prompt": "word " * 400, "options": {"num_predict": 10}}
        with pytest.raises(requests.ReadTimeout):
            requests.post(gw.url + "/api/generate", json=body, headers=bearer(created["key"]),
                          timeout=2)
        assert fake.wait_for_cancellation(60)
        assert wait_for(lambda: (usage_row(gw, created["prefix"]) or {}).get("requests") == 1
                        and quota_of(gw, created["prefix"])["reserved"] == 0, 60)
        row = usage_row(gw, created["prefix"])
    prompt = estimate.prompt_tokens(body)
    assert (row["prompt_tokens"], row["prompt_tokens_estimated"]) == (prompt, prompt) == (
        500, 500)
    assert row["aborted"] == 1 and row["completion_tokens"] == 0
    assert row["token_quota"]["used"] == prompt
