"""A gunicorn worker killed (kill -9) mid-request: its successor frees what it held.

One worker, an upstream serving two requests at once, leases of 60 s: each test kills
the worker at a fixed point of a request's life, then another key must be served, and
a key at its max_concurrent admitted, within seconds of gunicorn's next worker
answering, not after the lease (app/admission/holders.py).
"""
import concurrent.futures
import os
import signal
import time
from urllib.parse import urlsplit

import psycopg2
import pytest
import requests

from app.admission.fair_queue import _lock_id
from tests.admission.test_fair_queue_gateway import (
    generate,
    new_key,
    open_request,
    queue_is_empty,
    waiting,
)
from tests.gateway_process import GatewayProcess, wait_for

pytestmark = pytest.mark.gateway

SERVED_WITHIN = 5.0  # seconds; the lease is 60


@pytest.fixture(scope="module")
def gateway(database, fake_ollama, tmp_path_factory):
    with GatewayProcess(database, fake_ollama.url, workers=1, upstream_max_concurrent=2,
                        slot_lease_seconds=60, queue_per_key=500) as gw:
        yield gw.start(tmp_path_factory.mktemp("log") / "gateway.log")


def workers(gateway):
    """The pids of the gunicorn master's children: its workers."""
    with open(f"/proc/{gateway.proc.pid}/task/{gateway.proc.pid}/children") as children:
        return [int(pid) for pid in children.read().split()]


def answers_health(gateway):
    try:
        return requests.get(gateway.url + "/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def kill_the_worker(gateway):
    """kill -9 the gateway's worker; return once the worker gunicorn starts next answers."""
    (old,) = workers(gateway)
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: workers(gateway) not in ([], [old]) and answers_health(gateway),
                    60), f"no new worker answered:\n{gateway.log()}"


def read_until(sock, marker, seconds=30):
    """Read the answer on `sock` until `marker` has come (the stream has reached a point)."""
    sock.settimeout(seconds)
    received = b""
    while marker not in received:
        piece = sock.recv(65536)
        assert piece, f"the answer ended before {marker!r}: {received[-300:]!r}"
        received += piece


def add_capped_key(gateway, name):
    return gateway.add_key("--name", name, "--rate-limit", "none", "--max-concurrent", "1")["key"]


def served_after_the_kill(gateway, other, capped):
    """Another key's request and the capped key's, sent at once: (answers, seconds)."""
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(generate, gateway.url, key, 1, 30) for key in (other, capped)]
        answers = [call.result() for call in calls]
    return answers, time.monotonic() - started


def test_killed_while_streaming_the_upstream_and_the_keys_slot_come_back(gateway, fake):
    fake.token_delay = 0.2  # 300 tokens: a minute
    streamer, other = new_key(gateway, "streamer"), new_key(gateway, "other")
    capped = add_capped_key(gateway, "capped")
    socks = [open_request(gateway, key, tokens=300) for key in (streamer, capped)]
    try:
        for sock in socks:
            read_until(sock, b'"done":false')  # granted, streaming: both of the two slots
        kill_the_worker(gateway)
        answers, seconds = served_after_the_kill(gateway, other, capped)
    finally:
        for sock in socks:
            sock.close()
    # The capped key's slot was the dead worker's: 429 until the lease lapsed, before.
    assert [r.status_code for r in answers] == [200, 200]
    assert seconds < SERVED_WITHIN
    assert wait_for(lambda: queue_is_empty(gateway), 30)


def test_killed_while_its_request_waits_nothing_is_left_in_the_queue(gateway, fake):
    fake.token_delay = 0.2
    streamer, other = new_key(gateway, "streamer-2"), new_key(gateway, "other-2")
    capped = add_capped_key(gateway, "capped-2")
    socks = [open_request(gateway, streamer, tokens=300) for _ in range(2)]
    try:
        for sock in socks:
            read_until(sock, b'"done":false')
        socks.append(open_request(gateway, capped))
        assert wait_for(lambda: waiting(gateway) == 1, 30)  # its slot taken, in the queue
        kill_the_worker(gateway)
        answers, seconds = served_after_the_kill(gateway, other, capped)
    finally:
        for sock in socks:
            sock.close()
    assert [r.status_code for r in answers] == [200, 200]
    assert seconds < SERVED_WITHIN
    # The entry that was waiting went too: granted after the kill, it would hold one of
    # the two slots, and one of these two would wait for the other.
    assert [r.headers.get("X-Queue-Wait") for r in answers] == [None, None]
    assert wait_for(lambda: queue_is_empty(gateway), 30)


def test_killed_after_the_last_line_before_the_stream_ends(gateway, fake):
    """Leaving: the client has its whole answer, the worker has not given the slot back."""
    fake.token_delay, fake.end_delay = 0.01, 60
    streamer, other = new_key(gateway, "streamer-3"), new_key(gateway, "other-3")
    capped = add_capped_key(gateway, "capped-3")
    socks = [open_request(gateway, key, tokens=3) for key in (streamer, capped)]
    try:
        for sock in socks:
            read_until(sock, b'"done":true')
        kill_the_worker(gateway)
        fake.end_delay = 0
        answers, seconds = served_after_the_kill(gateway, other, capped)
    finally:
        for sock in socks:
            sock.close()
    assert [r.status_code for r in answers] == [200, 200]
    assert seconds < SERVED_WITHIN
    assert wait_for(lambda: queue_is_empty(gateway), 30)


def test_killed_while_entering_the_queue_a_row_written_after_its_death_goes_too(
        gateway, fake, database):
    """Entering, on PostgreSQL: the worker dies while its entry waits for the queue's lock.

    Its database session lives on, and writes the entry once the lock is free, after the
    next worker's first look: the living worker's sweep frees it, not the lease.
    """
    if not database.startswith("postgresql"):
        pytest.skip("SQLite: a statement dies with its process")
    upstream = urlsplit(fake.url).netloc  # the upstream's default name
    other, capped = new_key(gateway, "other-4"), add_capped_key(gateway, "capped-4")
    lock = psycopg2.connect(database)
    lock.autocommit = True
    locked = True
    try:
        lock.cursor().execute("SELECT pg_advisory_lock(%s)", (_lock_id(upstream),))
        entering = open_request(gateway, capped, tokens=1)

        def waiting_on_the_lock():
            cursor = lock.cursor()
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = "
                           "'advisory' AND query LIKE '%ollama_gw_queue_enter%'")
            return cursor.fetchone()[0] == 1

        assert wait_for(waiting_on_the_lock, 30)
        kill_the_worker(gateway)
        entering.close()
        freed_before = gateway.log().count("queue_entry row(s)")
        lock.cursor().execute("SELECT pg_advisory_unlock(%s)", (_lock_id(upstream),))
        locked = False
        # The dead worker's session wrote the entry, and a sweep freed it.
        assert wait_for(lambda: gateway.log().count("queue_entry row(s)") > freed_before, 10)
        answers, seconds = served_after_the_kill(gateway, other, capped)
    finally:
        if locked:
            lock.cursor().execute("SELECT pg_advisory_unlock_all()")
        lock.close()
    assert [r.status_code for r in answers] == [200, 200]
    assert seconds < SERVED_WITHIN
    assert wait_for(lambda: queue_is_empty(gateway), 30)
