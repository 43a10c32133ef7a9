"""Token quota reservations, the prompt estimate they start from, and quota.warning."""
import time

import pytest

from app import estimate, quota
from app.limits import quota_period
from app.models import QuotaReservation
from app.quota import Standing


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
