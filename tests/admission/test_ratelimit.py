"""Per-key limits: exact counts per window, concurrency slots, nothing consumed on refusal."""
import threading
import time

import pytest

from app.admission.ratelimit import Limiter
from app.errors import RateLimited
from app.keys.registry import KeyInfo
from app.store.db import db
from app.store.models import ConcurrencySlot, GpuReservation, QuotaReservation, RateCounter
from tests.gateway_process import wait_for

T0 = 1_800_000_000.0  # a minute boundary: 1_800_000_000 % 60 == 0


@pytest.fixture
def limiter():
    limiter = Limiter(lease_seconds=60)
    yield limiter
    # Slots a test left held, as a crashed worker would: nobody renews them now (else the
    # keeper goes on renewing them in this process after the test database is gone).
    with limiter._lock:
        limiter._held.clear()
    assert wait_for(lambda: limiter._keeper is None, 30), "the slot keeper never stopped"


def key_info(make_key, **options):
    _, row = make_key(**options)
    return KeyInfo.from_row(row)


def admitted(limiter, key, attempts, now):
    results = []
    for _ in range(attempts):
        try:
            results.append(limiter.admit(key, now=now))
        except RateLimited as exc:
            results.append(exc)
    return results


def test_a_key_gets_exactly_its_limit_per_window_then_429(limiter, make_key):
    key = key_info(make_key, rate_limit="5/minute")
    results = admitted(limiter, key, 8, now=T0 + 10)
    ok = [r for r in results if not isinstance(r, RateLimited)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert [a.remaining for a in ok] == [4, 3, 2, 1, 0]
    assert len(refused) == 3
    assert refused[0].status == 429
    assert refused[0].headers["Retry-After"] == "50"
    assert refused[0].headers["X-RateLimit-Remaining"] == "0"
    assert refused[0].headers["X-RateLimit-Reset"] == str(int(T0 + 60))


def test_retry_after_is_rounded_up_to_the_windows_end(limiter, make_key):
    """49.75 s left: Retry-After says 50, so a client that waits it is in the next window
    (49 would bring it back 0.75 s early, to another 429)."""
    key = key_info(make_key, rate_limit="1/minute")
    limiter.admit(key, now=T0 + 10.25)
    with pytest.raises(RateLimited) as refused:
        limiter.admit(key, now=T0 + 10.25)
    assert refused.value.headers["Retry-After"] == "50"
    assert refused.value.headers["X-RateLimit-Reset"] == str(int(T0 + 60))
    with pytest.raises(RateLimited) as refused:
        limiter.admit(key, now=T0 + 59.5)
    assert refused.value.headers["Retry-After"] == "1"


def test_the_next_window_starts_afresh(limiter, make_key):
    key = key_info(make_key, rate_limit="2/minute")
    admitted(limiter, key, 3, now=T0 + 59)
    assert limiter.admit(key, now=T0 + 60).remaining == 1


def test_a_steady_client_under_the_limit_is_never_refused(limiter, make_key):
    # go-ollama-api refused a steady 8/minute client at request 11 on a 10/minute key.
    key = key_info(make_key, rate_limit="10/minute")
    for request in range(80):  # 8 a minute for 10 minutes
        limiter.admit(key, now=T0 + request * 7.5)


def test_old_windows_are_deleted_when_a_new_one_starts(limiter, make_key):
    key = key_info(make_key, rate_limit="5/minute")
    for minute in range(4):
        limiter.admit(key, now=T0 + minute * 60)
    assert RateCounter.select().where(RateCounter.key == key.id).count() == 1


def test_unlimited_keys_are_not_counted(limiter, make_key):
    key = key_info(make_key, rate_limit="none")
    admission = limiter.admit(key, now=T0)
    assert admission.headers() == {}
    assert RateCounter.select().count() == 0


def test_concurrent_admissions_never_exceed_the_limit(limiter, make_key, database_url):
    """Threads each with their own connection race for 37 admissions; exactly 37 win."""
    key = key_info(make_key, rate_limit="37/hour")
    wins, losses = [], []

    def hammer():
        with db.connection_context():
            for result in admitted(limiter, key, 8, now=T0):
                (losses if isinstance(result, RateLimited) else wins).append(result)

    threads = [threading.Thread(target=hammer) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 37
    assert len(losses) == 80 - 37


def test_a_burst_on_one_key_is_counted_in_few_statements_and_exactly(
        limiter, make_key, monkeypatch):
    """While one key's count is running (a slow database here), its next requests gather
    and are counted by one statement; the first `limit` of them are admitted, no more."""
    key = key_info(make_key, rate_limit="25/hour")
    statements = []
    add = limiter._add

    def slow_add(key, window, n):
        statements.append(n)
        time.sleep(0.05)
        with db.connection_context():
            return add(key, window, n)

    monkeypatch.setattr(limiter, "_add", slow_add)
    wins, losses = [], []
    barrier = threading.Barrier(40)

    def request():
        barrier.wait(30)
        (losses if isinstance(r := admitted(limiter, key, 1, now=T0)[0], RateLimited)
         else wins).append(r)

    threads = [threading.Thread(target=request) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(statements) == 40 and len(statements) < 40
    assert len(wins) == 25 and len(losses) == 15
    assert sorted(a.remaining for a in wins) == list(range(25))
    assert all(r.headers["X-RateLimit-Remaining"] == "0" for r in losses)
    assert limiter.peek(key, now=T0).remaining == 0  # and the window stays full
    assert limiter._counting.idle()


def test_a_burst_on_two_keys_counts_each_keys_requests_against_its_own_limit(
        limiter, make_key, monkeypatch):
    """Requests of two keys gather while a count runs (a slow database here): each key's
    are counted in its own window, so each gets exactly its limit, whichever came first."""
    mine = key_info(make_key, rate_limit="4/hour")
    other = key_info(make_key, rate_limit="6/hour")
    add = limiter._add

    def slow_add(key, window, n):
        time.sleep(0.05)
        with db.connection_context():
            return add(key, window, n)

    monkeypatch.setattr(limiter, "_add", slow_add)
    wins = {mine.id: [], other.id: []}
    barrier = threading.Barrier(20)

    def request(key):
        barrier.wait(30)
        result = admitted(limiter, key, 1, now=T0)[0]
        if not isinstance(result, RateLimited):
            wins[key.id].append(result)

    threads = [threading.Thread(target=request, args=(key,))
               for key in [mine, other] * 10]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(a.remaining for a in wins[mine.id]) == [0, 1, 2, 3]
    assert sorted(a.remaining for a in wins[other.id]) == [0, 1, 2, 3, 4, 5]
    assert (limiter.peek(mine, now=T0).remaining, limiter.peek(other, now=T0).remaining) == (
        0, 0)
    assert limiter._counting.idle()


def test_a_key_cannot_exceed_its_concurrent_requests(limiter, make_key):
    key = key_info(make_key, rate_limit="100/minute", max_concurrent=2)
    first, second = limiter.admit(key, now=T0), limiter.admit(key, now=T0)
    with pytest.raises(RateLimited, match="too many concurrent requests"):
        limiter.admit(key, now=T0)
    limiter.release(first)
    third = limiter.admit(key, now=T0)
    assert {second.slot_id, third.slot_id} == {s.id for s in ConcurrencySlot.select()}


def test_another_keys_slots_are_absent_from_this_keys_concurrency(limiter, make_key):
    """Slots are counted per key: another key holding two leaves this key its one, and
    this key at its one is refused while the other's stay as they are."""
    mine = key_info(make_key, max_concurrent=1)
    other = key_info(make_key, max_concurrent=2)
    theirs = [limiter.admit(other, now=T0), limiter.admit(other, now=T0)]
    held = limiter.admit(mine, now=T0)
    with pytest.raises(RateLimited, match="too many concurrent requests"):
        limiter.admit(mine, now=T0)  # exactly at its limit of 1
    slots = {(s.key_id, s.id) for s in ConcurrencySlot.select()}
    assert slots == {(other.id, a.slot_id) for a in theirs} | {(mine.id, held.slot_id)}
    limiter.release(theirs[0])
    with pytest.raises(RateLimited, match="too many concurrent requests"):
        limiter.admit(mine, now=T0)  # the other key's freed slot is not this key's


def test_a_concurrency_refusal_does_not_consume_the_rate_limit(limiter, make_key):
    key = key_info(make_key, rate_limit="3/minute", max_concurrent=1)
    held = limiter.admit(key, now=T0)
    for _ in range(5):
        with pytest.raises(RateLimited, match="concurrent"):
            limiter.admit(key, now=T0)
    limiter.release(held)
    assert limiter.admit(key, now=T0).remaining == 1  # only 2 of 3 used, not 7


def test_a_rate_refusal_takes_no_concurrency_slot(limiter, make_key):
    """Refused at its rate limit, a request holds no slot: the next window's is free."""
    key = key_info(make_key, rate_limit="1/minute", max_concurrent=1)
    limiter.release(limiter.admit(key, now=T0))
    with pytest.raises(RateLimited, match="rate limit exceeded"):
        limiter.admit(key, now=T0 + 30)
    assert ConcurrencySlot.select().count() == 0
    admission = limiter.admit(key, now=T0 + 60)
    assert [s.id for s in ConcurrencySlot.select()] == [admission.slot_id]
    limiter.release(admission)


def test_release_is_idempotent(limiter, make_key):
    key = key_info(make_key, max_concurrent=1)
    admission = limiter.admit(key, now=T0)
    limiter.release(admission)
    limiter.release(admission)
    assert ConcurrencySlot.select().count() == 0


def test_a_crashed_workers_slot_lapses_after_its_lease(limiter, make_key):
    key = key_info(make_key, max_concurrent=1)
    limiter.admit(key, now=T0)  # never released: its worker "crashed"
    with pytest.raises(RateLimited):
        limiter.admit(key, now=T0 + 59)
    limiter.admit(key, now=T0 + 61)


def test_renewing_a_lease_keeps_a_long_request_counted(limiter, make_key):
    key = key_info(make_key, max_concurrent=1)
    admission = limiter.admit(key, now=time.time() - 50)  # taken 50 s ago: 10 s left
    limiter.renew([admission.slot_id])
    with pytest.raises(RateLimited):
        limiter.admit(key, now=time.time() + 30)  # without the renewal this would pass


def test_renewing_a_reservation_renews_its_own_tables_row_only(limiter, make_key):
    """A GPU reservation and another key's token reservation with the same id: renewing
    the first leaves the second (a crashed worker's) to lapse at its time."""
    mine = key_info(make_key, gpu_quota="1h/day")
    other = key_info(make_key, token_quota="100/day")
    now = time.time()
    gpu = GpuReservation.create(key_id=mine.id, period_start=0, seconds=1.0,
                                holder=limiter.holder, expires_at=now + 5)
    tokens = QuotaReservation.create(key_id=other.id, period_start=0, tokens=6,
                                     holder="gone:1", expires_at=now + 5)
    assert gpu.id == tokens.id  # each table's first row
    limiter.renew([], [(GpuReservation, gpu.id)])
    assert GpuReservation.get_by_id(gpu.id).expires_at >= now + limiter.lease_seconds
    assert QuotaReservation.get_by_id(tokens.id).expires_at == now + 5
