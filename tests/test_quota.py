"""Token quota reservations, the prompt estimate they start from, and quota.warning."""
import threading
import time

import pytest

from app import db as database
from app import estimate, quota
from app.db import db
from app.limits import quota_period
from app.models import QuotaReservation
from app.quota import Standing
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
