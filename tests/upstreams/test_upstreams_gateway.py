"""A running gateway in front of two Ollama servers: spread, failover, recovery, one view.

Each worker's monitor keeps the view fresh (every 0.5 s here); the tests wait on what a
user would see, with generous deadlines.
"""
import concurrent.futures
import json

import ollama
import pytest
import requests

from tests.fake_ollama import FakeOllama
from tests.gateway_process import GatewayProcess, wait_for

pytestmark = pytest.mark.gateway


@pytest.fixture
def fakes():
    servers = [FakeOllama(models=["llama3.2:latest", "qwen2.5:0.5b"]).start(),
               FakeOllama(models=["llama3.2:latest", "phi3:latest"]).start()]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def gateway(fakes, tmp_path):
    upstreams = ",".join(f"gpu{i}={f.url}" for i, f in enumerate(fakes, 1))
    with GatewayProcess(f"sqlite:///{tmp_path}/multi.db", fakes[0].url, workers=2,
                        upstreams=upstreams, upstream_refresh_seconds=0.5) as gw:
        yield gw.start(tmp_path / "multi.log")


def chat(gateway, key):
    return ollama.Client(host=gateway.url, headers={"Authorization": f"Bearer {key}"},
                         timeout=60)


def generations(fake):
    return [r for r in fake.requests if r.path == "/api/generate"]


def test_requests_for_a_model_both_have_are_spread_over_both(gateway, fakes):
    client = chat(gateway, gateway.add_key("--name", "spread", "--rate-limit", "none")["key"])
    for fake in fakes:
        fake.token_delay = 0.05
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda _: client.generate(model="llama3.2", prompt="x"), range(24)))
    assert len(generations(fakes[0])) >= 3 and len(generations(fakes[1])) >= 3


def test_a_model_only_one_has_goes_there(gateway, fakes):
    client = chat(gateway, gateway.add_key("--name", "routed")["key"])
    assert wait_for(lambda: client.generate(model="phi3", prompt="x").done, 30)
    assert generations(fakes[1]) and not generations(fakes[0])


def test_a_stopped_server_is_failed_over_and_used_again_once_it_returns(gateway, fakes):
    key = gateway.add_key("--name", "steady", "--rate-limit", "none")["key"]
    client = chat(gateway, key)
    fakes[0].stop()
    answers = [client.generate(model="llama3.2", prompt="x").done for _ in range(10)]
    assert answers == [True] * 10  # every one answered, by gpu2
    with pytest.raises(ollama.ResponseError) as caught:  # only gpu1 has qwen
        client.generate(model="qwen2.5:0.5b", prompt="x")
    assert caught.value.status_code == 502
    fakes[0].start()

    def qwen_answers_again():
        try:
            return client.generate(model="qwen2.5:0.5b", prompt="x").done
        except ollama.ResponseError:
            return False

    assert wait_for(qwen_answers_again, 90, interval=0.5)


def test_an_upstream_slower_than_read_timeout_is_a_504_never_sent_to_the_second(fakes,
                                                                                tmp_path):
    """Ollama had the request and may be generating: sending it again would run it twice."""
    upstreams = ",".join(f"gpu{i}={f.url}" for i, f in enumerate(fakes, 1))
    with GatewayProcess(f"sqlite:///{tmp_path}/slow.db", fakes[0].url, workers=1,
                        upstreams=upstreams, read_timeout=1) as gw:
        gw.start(tmp_path / "slow.log")
        key = gw.add_key("--name", "patient", "--rate-limit", "none")["key"]
        for fake in fakes:
            fake.first_byte_delay = 30  # until the gateway hangs up
        answer = requests.post(gw.url + "/api/generate", timeout=120,
                               headers={"Authorization": f"Bearer {key}"},
                               json={"model": "llama3.2", "prompt": "x", "stream": False})
        assert answer.status_code == 504 and "read_timeout" in answer.json()["error"]
        assert sorted(len(generations(fake)) for fake in fakes) == [0, 1]


def test_one_model_list_and_one_status_command_for_all(gateway, fakes):
    client = chat(gateway, gateway.add_key("--name", "lister")["key"])
    assert sorted(m.model for m in client.list().models) == [
        "llama3.2:latest", "phi3:latest", "qwen2.5:0.5b"]
    fakes[1].stop()
    shown = json.loads(gateway.cli("upstreams", "--json").stdout)
    assert [(u["name"], u["status"]) for u in shown] == [("gpu1", "healthy"),
                                                         ("gpu2", "unreachable")]
    assert shown[0]["models"] == ["llama3.2:latest", "qwen2.5:0.5b"]
    assert wait_for(lambda: json.loads(gateway.cli("upstreams", "--json").stdout)[0]
                    ["in_flight"] is not None, 30)  # the workers have reported


def test_one_upstream_shows_its_requests_in_flight(database, tmp_path):
    """The default set-up: one Ollama. A stream in flight is 1, and 0 once it ends."""
    with FakeOllama(token_delay=0.1) as fake, GatewayProcess(
            database, fake.url, workers=2,
            upstream_refresh_seconds=0.5) as gw:
        gw.start(tmp_path / "one.log")
        key = gw.add_key("--name", "streamer", "--rate-limit", "none")["key"]

        def in_flight():
            return json.loads(gw.cli("upstreams", "--json").stdout)[0]["in_flight"]

        assert wait_for(lambda: in_flight() == 0, 60, interval=0.5)  # reported, idle
        with requests.post(gw.url + "/api/generate", stream=True, timeout=60,
                           headers={"Authorization": f"Bearer {key}"},
                           json={"model": "llama3.2", "prompt": "x",
                                 "options": {"num_predict": 3000}}) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator closes the connection
            assert next(lines)  # the stream has begun
            assert wait_for(lambda: in_flight() == 1, 60, interval=0.5)
            assert next(lines)  # still in flight: the gateway did not count a finished one
        assert wait_for(lambda: in_flight() == 0, 60, interval=0.5)
