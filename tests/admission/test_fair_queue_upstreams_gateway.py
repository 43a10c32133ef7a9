"""The fair queue in front of two upstreams serving one model: no request waits for a
busy upstream while the other has a free slot, and a waiting request runs on whichever
frees a slot first. Pinned requests stay on their upstream's queue.

Each test drives two gateway instances on one database: the one that keeps the slots
busy knows they are, the other sees them busy only through the shared queue (as a
request on another worker or machine would), so it is the one asked.
"""
import concurrent.futures
import json
import time

import pytest
import requests

from tests.fake_ollama import FakeOllama
from tests.gateway_process import GatewayProcess, wait_for

pytestmark = pytest.mark.gateway


class _Unloadable(dict):
    """A fake's loaded models that never change: gpu2 never has the model loaded, so
    every gateway prefers gpu1 while it is free (the loaded-first preference)."""

    def __setitem__(self, key, value):
        pass


@pytest.fixture(scope="module")
def fakes():
    servers = [FakeOllama().start(), FakeOllama().start()]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def pair(fakes, database, tmp_path):
    """Two gateway instances, one worker each, upstreams gpu1 and gpu2 capped at 1."""
    for fake in fakes:
        fake.reset()
    fakes[0]._loaded["llama3.2:latest"] = time.time() + 3600
    fakes[1]._loaded = _Unloadable()
    upstreams = ",".join(f"gpu{i}={f.url}" for i, f in enumerate(fakes, 1))
    settings = {"workers": 1, "upstreams": upstreams, "upstream_max_concurrent": 1,
                "upstream_refresh_seconds": 0.5, "queue_per_key": 100}
    with GatewayProcess(database, fakes[0].url, **settings) as one, \
            GatewayProcess(database, fakes[0].url, **settings) as two:
        one.start(tmp_path / "one.log")
        two.start(tmp_path / "two.log")
        key = one.add_key("--name", "agent", "--rate-limit", "none")["key"]
        assert wait_for(lambda: _served_by(two, key, fakes) == 0, 30)  # gpu1 preferred
        yield one, two, key
        assert wait_for(lambda: json.loads(one.cli("queue", "--json").stdout) == [], 30)


def generate(gateway, key, tokens=1, query=""):
    return requests.post(f"{gateway.url}/api/generate{query}", timeout=120,
                         headers={"Authorization": f"Bearer {key}"},
                         json={"model": "llama3.2", "prompt": "x", "stream": False,
                               "options": {"num_predict": tokens}})


def generations(fake):
    return sum(r.path == "/api/generate" for r in fake.requests)


def _served_by(gateway, key, fakes):
    """Which fake (0 or 1) answered one quick request."""
    before = [generations(f) for f in fakes]
    assert generate(gateway, key).status_code == 200
    return [generations(f) - b for f, b in zip(fakes, before, strict=True)].index(1)


def test_a_busy_upstream_is_not_waited_for_while_the_other_is_free(pair, fakes):
    one, two, key = pair
    fakes[0].token_delay = 0.15  # gpu1 busy for 6 s
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(generate, one, key, 40)
        assert wait_for(lambda: fakes[0].running == 1, 30)
        for _ in range(3):
            started, before = time.monotonic(), generations(fakes[1])
            answer = generate(two, key)
            assert answer.status_code == 200
            assert generations(fakes[1]) == before + 1  # gpu2 answered it
            assert "X-Queue-Wait" not in answer.headers  # it never waited
            assert time.monotonic() - started < 3
        assert fakes[0].running == 1  # gpu1 was busy all along
        assert busy.result().status_code == 200
    assert fakes[0].most_running == 1 and fakes[1].most_running == 1


def test_a_waiting_request_runs_where_a_slot_frees_first(pair, fakes):
    one, two, key = pair
    fakes[0].token_delay = 0.15  # gpu1 busy for 6 s, gpu2 for 1.2 s
    fakes[1].token_delay = 0.03
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        long = pool.submit(generate, one, key, 40)
        assert wait_for(lambda: fakes[0].running == 1, 30)
        short = pool.submit(generate, one, key, 40)  # gpu1 full: to gpu2
        assert wait_for(lambda: fakes[1].running == 1, 30)
        started, before = time.monotonic(), generations(fakes[1])
        answer = generate(two, key)
        elapsed = time.monotonic() - started
        assert answer.status_code == 200
        assert generations(fakes[1]) == before + 1  # gpu2 freed first and ran it
        assert float(answer.headers["X-Queue-Wait"]) > 0  # after a wait ...
        assert elapsed < 4.5  # ... for gpu2's slot, not gpu1's
        assert fakes[0].running == 1
        assert short.result().status_code == 200 and long.result().status_code == 200
    assert fakes[0].most_running == 1 and fakes[1].most_running == 1  # caps held


def test_a_request_pinned_to_a_busy_upstream_waits_for_it(pair, fakes):
    one, two, key = pair
    fakes[0].token_delay = 0.1  # gpu1 busy for 3 s
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(generate, one, key, 30)
        assert wait_for(lambda: fakes[0].running == 1, 30)
        before = [generations(f) for f in fakes]
        answer = generate(two, key, query="?upstream=gpu1")
        assert answer.status_code == 200
        assert busy.result().status_code == 200
        # It waited for the busy one's slot and ran on gpu1, though gpu2 was free.
        assert [generations(f) for f in fakes] == [before[0] + 1, before[1]]
        assert float(answer.headers["X-Queue-Wait"]) > 1
    assert fakes[0].most_running == 1
