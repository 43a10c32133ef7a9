"""GPU-time quotas: their syntax, the boundary (at the quota refused, just under it
admitted), reservations, another key's time apart, and the quota.exceeded event's kind."""
import math
import time

import pytest

from app.accounting.usage import Record
from app.admission import gpu_quota
from app.config import UpstreamSpec
from app.errors import RateLimited
from app.keys import registry as keystore
from app.limits import format_gpu_quota, parse_gpu_quota, quota_period
from app.store.models import GpuReservation, GpuUsage
from app.webhooks.outbox import usage_event_data


@pytest.mark.parametrize("text, parsed", [
    ("90s/day", (90, "day")), ("30m/day", (1800, "day")), ("2h/month", (7200, "month")),
    ("2H / Day", (7200, "day")), ("24h/day", (86400, "day")), ("1s per month", (1, "month")),
    ("none", None), ("off", None),
])
def test_gpu_quotas_are_time_per_day_or_month(text, parsed):
    assert parse_gpu_quota(text) == parsed


@pytest.mark.parametrize("text", ["2x/day", "2h/week", "2h", "2/day", "0s/day", "25h/day",
                                  "745h/month", "-1h/day", "1.5h/day", ""])
def test_anything_else_is_refused_with_the_forms_it_takes(text):
    with pytest.raises(ValueError, match=r"GPU quota|at least 1 s"):
        parse_gpu_quota(text)


@pytest.mark.parametrize("seconds, shown", [(90, "90s/day"), (1800, "30m/day"),
                                            (7200, "2h/day"), (5400, "90m/day"),
                                            (None, "none")])
def test_gpu_quotas_print_in_their_largest_whole_unit(seconds, shown):
    assert format_gpu_quota(seconds, "day") == shown


def _charged(key, seconds, now):
    GpuUsage.create(key_id=key.id, period_start=quota_period("day", now)[0], seconds=seconds)


@pytest.mark.parametrize("used, admitted", [(9.999, True), (10.0, False), (10.5, False)])
def test_a_key_at_its_gpu_quota_is_refused_and_just_under_it_admitted(migrated, make_key,
                                                                      used, admitted):
    _, row = make_key(gpu_quota="10s/day")
    key = keystore.KeyInfo.from_row(row)
    now = time.time()
    _charged(key, used, now)
    if admitted:
        assert gpu_quota.check(key, now).remaining == pytest.approx(10 - used)
        return
    with pytest.raises(RateLimited) as refused:
        gpu_quota.check(key, now)
    end = quota_period("day", now)[1]
    assert refused.value.refusal == "gpu_quota"
    assert refused.value.headers["Retry-After"] == str(math.ceil(end - now))
    assert refused.value.headers["X-GPU-Quota-Reset"] == str(end)
    assert refused.value.headers["X-GPU-Quota-Remaining"] == "0.000"
    assert "GPU quota used up" in refused.value.message and "10s/day" in refused.value.message


def test_reservations_count_until_they_lapse_and_another_keys_time_never(migrated, make_key):
    _, row = make_key(gpu_quota="10s/day")
    _, other_row = make_key(gpu_quota="10s/day")
    key, other = keystore.KeyInfo.from_row(row), keystore.KeyInfo.from_row(other_row)
    now = time.time()
    _charged(other, 50.0, now)  # another key's: not this one's
    GpuReservation.create(key_id=other.id, period_start=quota_period("day", now)[0],
                          seconds=9.0, holder="test:2", expires_at=now + 60)  # nor this
    _charged(key, 6.0, now)
    first = gpu_quota.reserve(key, 3.999, "test:1", 60, now)
    assert first.standing.used == 6.0 and first.standing.reserved == pytest.approx(3.999)
    second = gpu_quota.reserve(key, 5.0, "test:1", 60, now)  # 9.999 < 10: admitted
    assert second.standing.reserved == pytest.approx(8.999)
    with pytest.raises(RateLimited):
        gpu_quota.check(key, now)  # 6 + 8.999 >= 10
    # A lease that ends now has lapsed (as reserve() deletes it): it counts no more.
    GpuReservation.update(expires_at=now).where(GpuReservation.id == second.id).execute()
    assert gpu_quota.check(key, now).reserved == pytest.approx(3.999)


def test_the_estimate_is_the_keys_recent_gpu_time_for_that_model_else_the_default(
        migrated, make_key):
    from app.accounting.usage import UsageWriter

    _, row = make_key(gpu_quota="1h/day")
    key = keystore.KeyInfo.from_row(row)
    spec = UpstreamSpec("gpu1", "http://gpu1:11434", max_concurrent=4, gpu_cost=0.5)
    assert gpu_quota.estimate(key, "llama3.2:latest", spec, 60.0) == 60.0 / 4 * 0.5
    writer = UsageWriter()
    for seconds in (1.0, 3.0):
        writer.add(Record(at=time.time(), endpoint="/api/chat", status=200, latency_ms=5,
                          key_id=key.id, model="llama3.2:latest", upstream="gpu1",
                          gpu_seconds=seconds))
    writer.add(Record(at=time.time(), endpoint="/api/chat", status=200, latency_ms=5,
                      key_id=key.id + 1, model="llama3.2:latest", upstream="gpu1",
                      gpu_seconds=100.0))  # another key's
    writer.add(Record(at=time.time(), endpoint="/api/chat", status=200, latency_ms=5,
                      key_id=key.id, model="llama3.2:latest", upstream="gpu2",
                      gpu_seconds=100.0))  # another upstream's (a slower GPU)
    writer.stop()
    assert gpu_quota.estimate(key, "llama3.2:latest", spec, 60.0) == 3.0  # the longest
    assert gpu_quota.estimate(key, "qwen2.5:0.5b", spec, 60.0) == 7.5


def test_requests_refused_or_cut_short_do_not_make_the_estimate_cheap(migrated, make_key):
    """Twenty requests Ollama refuses at once (a bad option: 400 in a millisecond) or the
    client cuts off must not make the next reservations near zero."""
    from app.accounting.usage import UsageWriter

    _, row = make_key(gpu_quota="1h/day")
    key = keystore.KeyInfo.from_row(row)
    spec = UpstreamSpec("gpu1", "http://gpu1:11434", max_concurrent=4)
    writer = UsageWriter()

    def record(seconds, **fields):
        writer.add(Record(**{"at": time.time(), "endpoint": "/api/chat", "status": 200,
                             "latency_ms": 5, "key_id": key.id, "model": "llama3.2:latest",
                             "upstream": "gpu1", "gpu_seconds": seconds, **fields}))

    record(3.0)
    for _ in range(gpu_quota.RECENT_REQUESTS):
        record(0.001, status=400)
        record(0.002, aborted=True)
    writer.stop()
    assert gpu_quota.estimate(key, "llama3.2:latest", spec, 60.0) == 3.0


def test_a_key_at_its_quota_by_charged_time_is_refused_at_once_not_after_settling(
        migrated, make_key):
    """Only a refusal owed to reservations may pass once they settle (reserve() waits up to
    SETTLE_SECONDS for those); a key whose charged time alone reached its quota will not."""
    _, row = make_key(gpu_quota="10s/day")
    key = keystore.KeyInfo.from_row(row)
    now = time.time()
    _charged(key, 10.0, now)
    with pytest.raises(RateLimited) as at_quota:
        gpu_quota.check(key, now)
    assert at_quota.value.reserved_only is False
    _, row = make_key(gpu_quota="10s/day")
    reserved = keystore.KeyInfo.from_row(row)
    _charged(reserved, 9.0, now)
    gpu_quota.reserve(reserved, 1.0, "test:1", 60, now)
    with pytest.raises(RateLimited) as by_reservation:
        gpu_quota.check(reserved, now)
    assert by_reservation.value.reserved_only is True


def test_last_periods_gpu_time_is_not_counted_once_the_period_ends(migrated, make_key):
    """Used up yesterday (and on the last day of last month): at midnight UTC, the
    period's first second, the key runs again with its whole quota."""
    for quota, period in (("10s/day", "day"), ("10s/month", "month")):
        _, row = make_key(gpu_quota=quota)
        key = keystore.KeyInfo.from_row(row)
        start = quota_period(period, time.time())[0]
        GpuUsage.create(key_id=key.id, period_start=quota_period(period, start - 1)[0],
                        seconds=50.0)
        current = gpu_quota.check(key, start)
        assert (current.used, current.remaining) == (0.0, 10.0), period
        with pytest.raises(RateLimited):
            gpu_quota.check(key, start - 1)  # the second before: still last period's


def test_a_monthly_quotas_reservations_count_all_month(migrated, make_key):
    """Reservations are made for the key's own period: a month's, not the day's (which a
    monthly standing would not see after the month's first day)."""
    _, row = make_key(gpu_quota="10s/month")
    key = keystore.KeyInfo.from_row(row)
    now = quota_period("month", time.time())[0] + 10 * 86400 + 3600  # the 11th, 01:00
    first = gpu_quota.reserve(key, 6.0, "test:1", 60, now)
    assert gpu_quota.standing(key, now).reserved == pytest.approx(6.0)
    gpu_quota.reserve(key, 5.0, "test:1", 60, now)  # 6 < 10: admitted
    with pytest.raises(RateLimited):
        gpu_quota.check(key, now)  # 11 >= 10
    assert first.standing.remaining == pytest.approx(4.0)


def test_the_estimate_is_the_longest_of_the_last_requests_not_the_first(migrated, make_key):
    """A long request more than RECENT_REQUESTS requests ago no longer sets the estimate:
    the newest ones do."""
    from app.accounting.usage import UsageWriter

    _, row = make_key(gpu_quota="1h/day")
    key = keystore.KeyInfo.from_row(row)
    spec = UpstreamSpec("gpu1", "http://gpu1:11434", max_concurrent=1)
    writer = UsageWriter()
    start = time.time() - 3600
    seconds = [50.0] + [2.0] * gpu_quota.RECENT_REQUESTS
    for i, gpu_time in enumerate(seconds):
        writer.add(Record(at=start + i, endpoint="/api/chat", status=200, latency_ms=5,
                          key_id=key.id, model="llama3.2:latest", upstream="gpu1",
                          gpu_seconds=gpu_time))
    writer.stop()
    assert gpu_quota.estimate(key, "llama3.2:latest", spec, 60.0) == 2.0


@pytest.mark.parametrize("refusal, kind", [("quota", "tokens"), ("gpu_quota", "gpu_time"),
                                           ("rate", None), (None, None)])
def test_quota_exceeded_says_which_quota_ran_out(refusal, kind):
    data = usage_event_data(Record(at=0.0, endpoint="/api/chat", status=429 if refusal else 200,
                                   latency_ms=1, refusal=refusal, gpu_seconds=None))
    assert data.get("kind") == kind
    assert "gpu_seconds" in data
