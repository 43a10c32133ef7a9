"""GPU time in-process: the time a request held its slot (Ollama's total_duration, else
the gateway's clock up to Ollama's last byte), the model load within it, the share of
the GPU it was, loads spread over the next requests, and how the seconds are shown."""
import pytest

from app.accounting import gpu
from app.accounting.usage import Record
from app.config import UpstreamSpec
from app.proxy.relay import RelayOutcome

SPEC = UpstreamSpec("gpu1", "http://gpu1:11434", max_concurrent=2, gpu_cost=0.5)


def record(**fields):
    return Record(**{"at": 0.0, "endpoint": "/api/chat", "status": 200, "latency_ms": 1,
                     "model": "llama3.2:latest", "upstream": "gpu1", **fields})


def outcome(**fields):
    return RelayOutcome(**{"status": 200, "started": 100.0, "sent_at": 100.0,
                           "complete": True, **fields})


def test_a_v1_request_holds_its_slot_until_ollamas_last_byte_not_the_clients():
    """A slow client reading the answer for 30 s after Ollama sent its last byte does
    not hold Ollama's slot: 1.5 s is charged, not 31.5."""
    slow = outcome(last_byte_at=101.5)
    assert gpu.held("/v1/chat/completions", slow, ended=131.5) == (1.5, 0.0)
    assert gpu.held("/v1/chat/completions", outcome(), ended=102.0) == (2.0, 0.0)


def test_ollamas_durations_are_nanoseconds_and_its_load_is_within_its_total():
    tail = (b'{"done":false}\n{"done":true,"total_duration":2500000000,'
            b'"load_duration":750000000}\n')
    assert gpu.held("/api/chat", outcome(tail=tail, last_byte_at=110.0), 120.0) == (2.5, 0.75)
    odd = b'{"done":true,"total_duration":1000000000,"load_duration":3000000000}\n'
    assert gpu.held("/api/chat", outcome(tail=odd), 120.0) == (1.0, 1.0)


def test_a_load_is_never_charged_as_more_than_the_time_held():
    assert gpu.gpu_seconds(record(), SPEC, 2.0, load_seconds=5.0) == (0.5, 0.5)


def test_a_request_never_sent_or_without_an_upstream_used_no_gpu():
    assert gpu.gpu_seconds(record(), SPEC, None) == (None, None)
    assert gpu.gpu_seconds(record(), None, 2.0) == (None, None)
    assert gpu.held("/api/chat", outcome(sent_at=None), 120.0) == (None, 0.0)
    meter = gpu.Meter([SPEC], load_charge="spread", spread_requests=2)
    refused = record(status=429)
    meter.charge(refused, outcome(sent_at=None, complete=False), 120.0)
    assert (refused.gpu_seconds, refused.load_seconds) == (None, None)


def test_a_spread_load_is_shared_by_the_next_requests_of_that_model_on_that_upstream():
    """Spread over 2: a load of 1 s on gpu1 is paid half each by gpu1's next two requests
    of that model; gpu2's requests, and another model's, pay none of it."""
    spreader = gpu.LoadSpreader(2)
    assert spreader.charge("gpu1", "llama3.2:latest", 1.0) == 0.0
    assert spreader.charge("gpu2", "llama3.2:latest", 0.0) == 0.0
    assert spreader.charge("gpu1", "qwen2.5:0.5b", 0.0) == 0.0
    assert [spreader.charge("gpu1", "llama3.2:latest", 0.0) for _ in range(3)] == [
        0.5, 0.5, 0.0]


@pytest.mark.parametrize("seconds, text", [
    (0.84, "0.84s"), (9.99, "9.99s"), (9.996, "10.0s"), (10.0, "10.0s"), (59.9, "59.9s"),
    (59.96, "1m00s"), (60.0, "1m00s"),
    (245.0, "4m05s"), (3599.0, "59m59s"), (3600.0, "1h00m"), (7380.0, "2h03m")])
def test_gpu_seconds_show_in_the_unit_people_read_at_each_boundary(seconds, text):
    assert gpu.shown(seconds) == text
