"""/v1/messages, images and audio as gunicorn serves them: the answer cap, the token quota
and the upstream's slot hold for them as for the other model-running endpoints."""
import concurrent.futures
import json

import pytest
import requests

from tests.admission.test_fair_queue_gateway import waiting
from tests.admission.test_quota_gateway import bearer, quota_of, settled
from tests.fake_ollama_v1 import ESTIMATE_OFF_BY
from tests.gateway_process import GatewayProcess, wait_for
from tests.proxy.test_v1_messages import FORM

pytestmark = pytest.mark.gateway


@pytest.fixture(scope="module")
def gateway(database, fake_ollama, tmp_path_factory):
    """Two workers, an upstream serving one request at a time; reservations held 600 s,
    so one never settled shows within the tests' waits."""
    with GatewayProcess(database, fake_ollama.url, workers=2, upstream_max_concurrent=1,
                        slot_lease_seconds=600) as gw:
        yield gw.start(tmp_path_factory.mktemp("log") / "gateway.log")


def messages(gateway, key, max_tokens, stream=False, text="hi"):
    return requests.post(gateway.url + "/v1/messages?beta=true", headers=bearer(key),
                         stream=stream, timeout=120,
                         json={"model": "llama3.2", "max_tokens": max_tokens, "stream": stream,
                               "system": [{"type": "text", "text": "be brief"}],
                               "messages": [{"role": "user", "content": text}]})


def test_a_capped_quota_key_is_clamped_and_charged_ollamas_final_counts(gateway, fake):
    created = gateway.add_key("--name", "claude", "--rate-limit", "none",
                              "--token-quota", "100/day", "--max-predict", "50")
    answer = messages(gateway, created["key"], 32000, stream=True)
    events = [json.loads(line[len(b"data: "):]) for line in answer.iter_lines()
              if line.startswith(b"data: ")]
    assert answer.status_code == 200
    assert fake.requests[-1].json()["max_tokens"] == 50
    assert events[0]["message"]["usage"] == {"input_tokens": 3 + ESTIMATE_OFF_BY,
                                             "output_tokens": 0}
    assert events[-2]["usage"] == {"input_tokens": 3, "output_tokens": 50}
    settled(gateway, created["key"], 3 + 50)  # the final message_delta's, not message_start's


def test_a_burst_is_charged_at_most_one_request_past_the_quota(gateway, fake):
    created = gateway.add_key("--name", "burst", "--rate-limit", "none",
                              "--token-quota", "100/day")
    fake.token_delay = 0.01
    # Reserved: 6 estimated prompt + 5; charged: 3 counted + 5.
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda _: messages(gateway, created["key"], 5).status_code,
                                 range(20)))
    assert set(statuses) == {200, 429}
    assert wait_for(lambda: quota_of(gateway, created["prefix"])["reserved"] == 0, 60)
    charged = quota_of(gateway, created["prefix"])["used"]
    # Each charged 3 + 5, or 3 + less: one admitted near the end has its answer cap
    # lowered to what is left (/v1/messages is clamped, never refused), at least 1.
    assert 4 * statuses.count(200) <= charged <= 8 * statuses.count(200)
    assert charged <= 100 + 8  # the last one admitted may pass it by its own usage


def test_messages_wait_for_the_upstreams_slot(gateway, fake):
    key = gateway.add_key("--name", "streams", "--rate-limit", "none")["key"]
    fake.token_delay = 0.05
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: messages(gateway, key, 10, stream=True), range(2)))
        bodies = [answer.content for answer in answers]
    assert [answer.status_code for answer in answers] == [200, 200]
    assert all(b"event: message_stop" in body for body in bodies)
    assert fake.most_running == 1  # never both at once
    assert any(float(answer.headers.get("X-Queue-Wait", 0)) > 0 for answer in answers)


@pytest.mark.parametrize("path, form", [("/v1/images/generations", False),
                                        ("/v1/images/edits", True),
                                        ("/v1/audio/transcriptions", True)])
def test_images_and_audio_wait_for_the_upstreams_slot(gateway, fake, path, form):
    key = gateway.add_key("--name", "pictures", "--rate-limit", "none")["key"]
    fake.tokens, fake.token_delay = 1000, 0.05
    running = messages(gateway, key, 1000, stream=True)
    try:
        lines = running.iter_lines()  # kept: a generator let go of closes the connection
        assert next(lines) == b"event: message_start"  # it holds the upstream's only slot
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            if form:
                waiter = pool.submit(requests.post, gateway.url + path, data=FORM, timeout=120,
                                     headers={**bearer(key), "Content-Type":
                                              "multipart/form-data; boundary=XyZ"})
            else:
                waiter = pool.submit(requests.post, gateway.url + path, timeout=120,
                                     headers=bearer(key), json={"model": "llama3.2",
                                                                "prompt": "a cat"})
            assert wait_for(lambda: waiting(gateway) == 1, 60)
            assert path not in [r.path for r in fake.requests]
            fake.token_delay = 0.0  # the fake's image steps are tokens: not 1000 x 50 ms
            running.close()  # its slot is given back: the waiting one goes
            # Relayed: the fake's own answer (no model "whisper"; edits take JSON there).
            assert waiter.result().status_code == {"/v1/images/generations": 200,
                                                    "/v1/images/edits": 400}.get(path, 404)
        assert [r.path for r in fake.requests][-1] == path
    finally:
        running.close()
