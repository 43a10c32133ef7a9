"""The fair queue as users meet it: gunicorn workers and gateway instances sharing one
database, a slow fake Ollama, clients that pile up, hang up and abort."""
import concurrent.futures
import json
import random
import socket
import threading
import time

import pytest
import requests

from tests.gateway_process import GatewayProcess, wait_for
from tests.tcp_proxy import proxied_database

pytestmark = pytest.mark.gateway


@pytest.fixture(scope="module")
def gateway(database, fake_ollama, tmp_path_factory):
    """Two workers, and an upstream that serves two requests at once."""
    with GatewayProcess(database, fake_ollama.url, workers=2, upstream_max_concurrent=2,
                        queue_per_key=500, queue_fair="requests") as gw:
        yield gw.start(tmp_path_factory.mktemp("log") / "gateway.log")


def new_key(gateway, name):
    return gateway.add_key("--name", name, "--rate-limit", "none")["key"]


def generate(url, key, tokens=5, timeout=120):
    return requests.post(url + "/api/generate", timeout=timeout,
                         headers={"Authorization": f"Bearer {key}"},
                         json={"model": "llama3.2", "prompt": "x", "stream": False,
                               "options": {"num_predict": tokens}})


def queue_rows(gateway):
    return json.loads(gateway.cli("queue", "--json").stdout)


def queue_is_empty(gateway):
    return queue_rows(gateway) == []


def waiting(gateway):
    return sum(row["waiting"] for row in queue_rows(gateway))


def test_every_worker_and_instance_keeps_the_upstreams_cap(gateway, fake, database, tmp_path):
    """Two gateways x two workers (one on SQLite: one machine) share one cap of 2."""
    fake.token_delay = 0.02
    instances = [gateway]
    with GatewayProcess(database, fake.url, workers=2, upstream_max_concurrent=2,
                        queue_fair="requests") as second:
        if database.startswith("postgresql"):
            instances.append(second.start(tmp_path / "second.log"))
        keys = [new_key(gateway, "one"), new_key(gateway, "two")]

        def call(i):
            return generate(instances[i % len(instances)].url, keys[i % 2])

        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(call, range(24)))
    assert [r.status_code for r in answers] == [200] * 24
    assert fake.most_running == 2  # never more, and the cap was used
    assert any(float(r.headers.get("X-Queue-Wait", 0)) > 0 for r in answers)
    assert all("queue;dur=" in r.headers["Server-Timing"]
               for r in answers if "X-Queue-Wait" in r.headers)
    assert wait_for(lambda: queue_is_empty(gateway), 30)


def test_a_rate_limited_burst_at_a_capped_upstream_is_counted_exactly(gateway, fake):
    """12 requests at once from a key allowing 5 a day, at an upstream serving 2 at once:
    exactly 5 are answered, never more than 2 at a time; the 7 others are refused by the
    rate limit, not by the queue, and nothing is left in the queue."""
    fake.token_delay = 0.02
    key = gateway.add_key("--name", "burst", "--rate-limit", "5/day")["key"]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: generate(gateway.url, key), range(12)))
    assert sorted(r.status_code for r in answers) == [200] * 5 + [429] * 7
    assert all(r.json()["error"].startswith("rate limit exceeded")
               for r in answers if r.status_code == 429)
    assert fake.most_running <= 2
    assert wait_for(lambda: queue_is_empty(gateway), 30)


def test_a_light_key_is_served_before_a_greedy_keys_backlog(gateway, fake):
    # 5 tokens: about half a second a request, so that the backlog builds up faster than
    # two slots drain it even on a busy machine (at a quarter second it did not, once).
    fake.token_delay = 0.1
    greedy, light = new_key(gateway, "greedy"), new_key(gateway, "light")
    finished = []
    lock = threading.Lock()

    def greedy_call(_):
        answer = generate(gateway.url, greedy)
        with lock:
            finished.append("greedy")
        return answer.status_code

    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        backlog = [pool.submit(greedy_call, i) for i in range(30)]
        assert wait_for(lambda: waiting(gateway) >= 12, 60)
        with lock:
            before = len(finished)
        assert generate(gateway.url, light).status_code == 200
        with lock:
            overtaken_by = len(finished) - before
        assert [f.result() for f in backlog] == [200] * 30
    # Fair: the light key's request waits for a running one to finish, not for the
    # backlog (first come, first served it would wait for 12 or more).
    assert overtaken_by <= 4, f"{overtaken_by} greedy requests finished first"
    assert wait_for(lambda: queue_is_empty(gateway), 30)


def open_request(gateway, key, tokens=5):
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
    body = json.dumps({"model": "llama3.2", "prompt": "x",
                       "options": {"num_predict": tokens}}).encode()
    sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def test_a_client_that_hangs_up_while_waiting_leaves_the_queue_at_once(gateway, fake):
    fake.token_delay = 0.2
    key = new_key(gateway, "hang-up")
    # Busy for 200 s (closed below): no slot frees while the test looks, so an entry the
    # hang-up left behind stays waiting, never granted out of sight.
    busy = [open_request(gateway, key, tokens=1000) for _ in range(2)]
    try:
        assert wait_for(lambda: fake.running == 2, 30)
        leaving = open_request(gateway, key)
        assert wait_for(lambda: waiting(gateway) == 1, 30)
        leaving.close()
        assert wait_for(lambda: waiting(gateway) == 0, 30)
        assert fake.running == 2 and sum(row["running"] for row in queue_rows(gateway)) == 2
        generates = sum(r.path.startswith("/api/generate") for r in fake.requests)
        assert generates == 2  # Ollama never saw the request that left
    finally:
        for sock in busy:
            sock.close()
    assert wait_for(lambda: queue_is_empty(gateway), 30)


def test_time_to_first_byte_counts_from_arrival_including_the_wait_for_a_slot(gateway, fake):
    fake.token_delay = 0.2
    busy_key = new_key(gateway, "slot-holder")
    created = gateway.add_key("--name", "first-byte", "--rate-limit", "none")
    busy = [open_request(gateway, busy_key, tokens=1000) for _ in range(2)]
    try:
        assert wait_for(lambda: fake.running == 2, 30)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(generate, gateway.url, created["key"], 1)
            assert wait_for(lambda: waiting(gateway) == 1, 30)  # it waits for a slot
            busy.pop().close()
            answer = answer.result(timeout=120)
    finally:
        for sock in busy:
            sock.close()
    assert answer.status_code == 200
    queued_ms = float(answer.headers["X-Queue-Wait"]) * 1000
    assert queued_ms >= 200  # at least the `ollama-gw queue` that saw it waiting

    [entry] = access_log_entries(gateway, created["prefix"])
    assert queued_ms <= entry["ttfb_ms"] <= entry["ms"], entry
    assert wait_for(lambda: queue_is_empty(gateway), 30)


def test_time_to_first_byte_counts_from_arrival_including_reading_the_body(gateway, fake):
    """The gateway's own time before it can send (here: a body that comes late) counts."""
    created = gateway.add_key("--name", "slow-body", "--rate-limit", "none")
    body = json.dumps({"model": "llama3.2", "prompt": "x", "stream": False,
                       "options": {"num_predict": 1}}).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=60) as sock:
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nAuthorization: Bearer "
                     + created["key"].encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
        sent_headers = time.monotonic()
        time.sleep(0.5)  # the stimulus, not a wait for something: the body comes late
        sock.sendall(body)
        late_ms = (time.monotonic() - sent_headers) * 1000
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    [entry] = access_log_entries(gateway, created["prefix"])
    # Half the delay: margin for a busy machine; counted from the body it would be ~5 ms.
    assert late_ms / 2 <= entry["ttfb_ms"] <= entry["ms"], entry


def access_log_entries(gateway, key_prefix):
    """The access log's entries for the key, once its requests' lines are written."""
    def logged():
        return [json.loads(line[line.index("{"):]) for line in gateway.log().splitlines()
                if f'"key":"{key_prefix}"' in line]

    assert wait_for(logged, 30)
    return logged()


def test_requests_aborted_at_random_points_leave_no_slot_or_entry_behind(gateway, fake):
    fake.token_delay = 0.01
    key = new_key(gateway, "aborts")
    rng = random.Random(11)

    def abort(_):
        sock = open_request(gateway, key, tokens=rng.randint(1, 30))
        try:
            threading.Event().wait(rng.uniform(0, 0.4))
        finally:
            sock.close()

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(abort, range(300)))
    assert wait_for(lambda: queue_is_empty(gateway), 60)
    assert wait_for(lambda: fake.running == 0, 30)
    # Both slots are free: two requests at once run at once.
    fake.token_delay = 0.0
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: generate(gateway.url, key, timeout=30), range(2)))
    assert [r.status_code for r in answers] == [200, 200]
    assert all("X-Queue-Wait" not in r.headers for r in answers)


def test_a_request_waiting_through_a_database_outage_is_served_once_it_is_back(
        own_postgres, fake, tmp_path):
    """The waiting worker's keeper outlives its connections dropping (PostgreSQL's LISTEN).

    Two instances on one PostgreSQL database (PostgreSQL alone: on SQLite no connection
    can drop): the first reaches it through a proxy, and has a request waiting; the
    second runs the request that holds the upstream's one slot. The proxy cuts the
    first's connections, as a restarting server would, and lets them through again;
    then the running request ends, the second instance grants the slot and NOTIFYs,
    and the waiting request must start at once, not when its wait times out.
    """
    fake.token_delay = 0.1
    with proxied_database(own_postgres) as (proxy, through_proxy), \
            GatewayProcess(through_proxy, fake.url, workers=1, upstream_max_concurrent=1,
                           queue_max_wait_seconds=120) as waiter, \
            GatewayProcess(own_postgres, fake.url, workers=1,
                           upstream_max_concurrent=1) as runner:
        runner.start(tmp_path / "runner.log")
        waiter.start(tmp_path / "waiter.log")
        busy = open_request(runner, new_key(runner, "busy"), tokens=1200)  # 2 minutes
        patient = new_key(runner, "patient")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            try:
                assert busy.recv(1)  # running: the slot is taken
                answer = pool.submit(generate, waiter.url, patient, 1, 150)
                assert wait_for(lambda: waiting(runner) == 1, 30)
                proxy.cut()
                assert wait_for(lambda: "queue keeper" in waiter.log()
                                or "queue-keeper" in waiter.log(), 30), waiter.log()
                proxy.restore()
            finally:
                busy.close()  # the slot is given back, and granted to the waiting request
            ended = time.monotonic()
            served = answer.result()
        assert served.status_code == 200, served.text
        assert time.monotonic() - ended < 10  # its wait times out after 120 s
