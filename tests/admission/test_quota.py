"""Token quota reservations, the prompt estimate they start from, and quota.warning."""
import datetime
import threading
import time

import pytest

from app.admission import estimate, quota
from app.admission.quota import Standing
from app.limits import quota_period
from app.store import db as database
from app.store.db import db
from app.store.models import QuotaReservation, TokenUsage
from tests.conftest import auth_header


@pytest.mark.parametrize("payload, tokens", [
    (None, 0),
    ({}, 0),
    ({"prompt": "abcd"}, 1),
    ({"prompt": "abcde"}, 2),  # a started token counts
    ({"system": "abcd", "prompt": "abcd"}, 2),
    ({"messages": [{"role": "user", "content": "abcd" * 3}]}, 3 + estimate.MESSAGE_TOKENS),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "abcdefgh"},
                                                {"type": "image_url", "image_url": "x"}]}]},
     2 + estimate.IMAGE_TOKENS + estimate.MESSAGE_TOKENS),
    ({"prompt": "", "images": ["aGVsbG8=", "aGVsbG8="]}, 2 * estimate.IMAGE_TOKENS),
    ({"input": ["abcd", "abcd"]}, 2),
    ({"prompt": "a", "tools": [{"name": "f"}]}, 1 + 4),  # its JSON: 15 characters
    ({"prompt": "a " * 40}, 40),  # 80 characters, but 40 words: a token each at least
    ({"prompt": "天空为什么是蓝色的"}, 9),  # no spaces: a token a character at least
])
def test_prompt_tokens_are_about_four_characters_each(payload, tokens):
    assert estimate.prompt_tokens(payload) == tokens


def test_one_keys_reservations_are_taken_one_at_a_time(settings, migrated, make_key):
    """Another transaction holding the key's lock (PostgreSQL: its advisory lock; SQLite:
    the write lock) keeps a reservation waiting: admission reads what it committed."""
    _, key = make_key(token_quota="100/day")
    other = database.open_database(settings.resolved_database_url, max_connections=1)
    done = threading.Event()

    def reserve():
        with db.connection_context():
            quota.reserve(key, 1, 5, "test:1", 60)
        done.set()

    thread = threading.Thread(target=reserve)
    try:
        with other.atomic():
            if database.is_postgres(other):
                other.execute_sql("SELECT pg_advisory_xact_lock(%s, %s)",
                                  (quota.LOCK_SPACE, key.id))
            thread.start()
            assert not done.wait(1.0)  # waiting for the lock, however long it takes
        assert done.wait(30)
    finally:
        thread.join(30)
        other.close_all()
    assert quota.standing(key).reserved == 6


def test_a_lapsed_reservation_no_longer_counts(migrated, make_key):
    _, key = make_key(token_quota="100/day")
    now = time.time()
    start, end = quota_period("day", now)
    for expires_at, tokens in ((now - 1, 40), (now + 60, 7)):  # a crashed worker's, a live one
        QuotaReservation.create(key_id=key.id, period_start=start, tokens=tokens,
                                holder="gone:1", expires_at=expires_at)
    QuotaReservation.create(key_id=key.id + 1, period_start=start, tokens=50,
                            holder="other:1", expires_at=now + 60)  # another key's
    assert quota.standing(key, now) == Standing(100, 0, 7, end)


def test_a_monthly_quotas_reservations_count_all_month(migrated, make_key):
    """Reserved for the key's own period, the month's: a monthly standing sees them on the
    15th too, not only on the month's first day (when the day's start is the month's)."""
    _, key = make_key(token_quota="100/month")
    now = datetime.datetime(2030, 1, 15, 12, tzinfo=datetime.timezone.utc).timestamp()
    start, end = quota_period("month", now)
    first, _ = quota.reserve(key, 1, 5, "test:1", 60, now=now)
    assert QuotaReservation.get_by_id(first.id).period_start == start
    assert quota.standing(key, now) == Standing(100, 0, 6, end)
    second, send = quota.reserve(key, 1, None, "test:2", 60, now=now)  # what is left: 94
    assert (second.tokens, send) == (94, 93)
    assert quota.standing(key, now) == Standing(100, 0, 100, end)


@pytest.mark.parametrize("cap, clamp", [(None, False), (32000, True)])
def test_an_uncapped_request_is_capped_at_what_neither_charges_nor_reservations_hold(
        migrated, make_key, cap, clamp):
    """100 - 30 charged - 10 reserved by a running request - a 2-token prompt: 58 (for a
    request with no cap, and a clamped one asking more)."""
    _, key = make_key(token_quota="100/day")
    now = time.time()
    TokenUsage.create(key_id=key.id, period_start=quota_period("day", now)[0], tokens=30)
    quota.reserve(key, 1, 9, "test:1", 60, now=now)
    reservation, send = quota.reserve(key, 2, cap, "test:2", 60, now=now, clamp=clamp)
    assert (reservation.tokens, send) == (60, 58)
    assert reservation.standing == Standing(100, 30, 70, quota_period("day", now)[1])
    assert reservation.standing.remaining == 0


def test_a_quota_key_without_a_cap_on_v1_gets_max_tokens_of_what_is_left(client, make_key,
                                                                            fake):
    secret, _ = make_key(token_quota="50/day")
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    answer = client.post("/v1/chat/completions", json=body, headers=auth_header(secret))
    assert answer.status_code == 200
    prompt = estimate.prompt_tokens(body)
    assert prompt == 1 + estimate.MESSAGE_TOKENS
    assert fake.requests[-1].json()["max_tokens"] == 50 - prompt
    assert (answer.headers["X-Quota-Limit"], answer.headers["X-Quota-Remaining"]) == ("50", "0")


def test_a_request_held_only_by_a_running_requests_reservation_waits_for_it_to_settle(
        migrated, make_key, monkeypatch):
    """One request after the other: the previous one's reservation is settled by the usage
    writer a moment after its answer ended. The next waits for that, not a 429."""
    _, key = make_key(token_quota="100/day")
    previous, _ = quota.reserve(key, 1, None, "test:1", 60)  # uncapped: holds all 100
    settled = threading.Timer(0.3, lambda: QuotaReservation.delete_by_id(previous.id))
    settled.start()
    try:
        started = time.monotonic()
        reservation, send = quota.reserve(key, 1, None, "test:2", 60)
    finally:
        settled.join(30)
    assert 0.25 < time.monotonic() - started < quota.SETTLE_SECONDS
    assert (reservation.tokens, send) == (100, 99)


def test_a_request_still_held_by_reservations_after_the_wait_is_refused(
        migrated, make_key, monkeypatch):
    _, key = make_key(token_quota="100/day")
    monkeypatch.setattr(quota, "SETTLE_SECONDS", 0.3)
    quota.reserve(key, 1, None, "test:1", 60)
    started = time.monotonic()
    with pytest.raises(quota.RateLimited) as refused:
        quota.reserve(key, 1, 5, "test:2", 60)
    assert time.monotonic() - started >= 0.3
    assert "100 are reserved by requests running now" in refused.value.message


def test_a_quota_used_up_by_charged_tokens_is_refused_without_waiting(migrated, make_key):
    _, key = make_key(token_quota="100/day")
    TokenUsage.create(key_id=key.id, period_start=quota_period("day", time.time())[0],
                      tokens=100)
    started = time.monotonic()
    with pytest.raises(quota.RateLimited):
        quota.reserve(key, 1, 5, "test:1", 60)
    assert time.monotonic() - started < quota.SETTLE_SECONDS / 2


def test_a_used_up_quotas_retry_after_is_rounded_up_to_the_periods_end(migrated, make_key):
    """49.75 s before midnight UTC: Retry-After says 50 (49 would bring the client back
    before the day's quota is renewed), and the headers say where the key stands."""
    _, key = make_key(token_quota="100/day")
    midnight = datetime.datetime(2030, 1, 16, tzinfo=datetime.timezone.utc).timestamp()
    now = midnight - 49.75
    TokenUsage.create(key_id=key.id, period_start=quota_period("day", now)[0], tokens=100)
    with pytest.raises(quota.RateLimited) as refused:
        quota.check(key, now)
    assert refused.value.headers == {"Retry-After": "50", "X-Quota-Limit": "100",
                                     "X-Quota-Remaining": "0",
                                     "X-Quota-Reset": str(int(midnight))}
    assert "retry in 50 s" in refused.value.message
    assert refused.value.reserved_only is False
