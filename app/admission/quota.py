"""Token quotas held while requests run: each reserves what it may use before it starts.

A request to a quota key is admitted only while the tokens charged this period plus
those reserved by requests running now are under the quota; it then reserves its own
estimate (app/admission/estimate.py: the prompt, plus the answer's cap), all in one transaction
that the database serialises per key (PostgreSQL: an advisory lock; SQLite: its write
lock), so concurrent workers and instances cannot admit past the quota between them.
The usage writer deletes the reservation in the transaction that charges the real
tokens (app/accounting/usage.py), so a request is always counted once, by one or the other.
Reservations are leased like concurrency slots: the holder renews them while the
request runs (app/admission/ratelimit.py's keeper), and a crashed worker's rows lapse.

Old instances (before migration 0009) never read the reservations: they check charged
tokens alone, the looser bound they always had, and ignore the rows new ones write.
"""
import dataclasses
import math
import time

import peewee
from flask import g

from app.admission.model_policy import GENERATING, LENGTH_FIELDS
from app.errors import RateLimited
from app.limits import format_token_quota, quota_period
from app.store.db import db, is_postgres
from app.store.models import QuotaReservation

# PostgreSQL advisory locks (key space, key id): one per key serialises its reservations.
# The two-integer key space is apart from the fair queue's single bigint locks.
LOCK_SPACE = 0x6F67
# A request refused only because requests running now hold the rest of the quota waits
# this long for them to settle before its 429: a client sending one request after the
# other would otherwise find its previous request's reservation still there, for the
# moment until the usage writer replaces it with the real count (app/accounting/usage.py).
SETTLE_SECONDS, SETTLE_POLL = 2.0, 0.02
# Endpoints that run a model and so are charged tokens: they reserve before they run.
EMBEDDING = {"/api/embed", "/api/embeddings", "/v1/embeddings"}
CHARGED = GENERATING | EMBEDDING


@dataclasses.dataclass
class Standing:
    """Where a key stands in its quota period; becomes the X-Quota-* headers."""

    limit: int
    used: int
    reserved: int
    reset_at: int  # epoch seconds when the period ends

    @property
    def remaining(self):
        return max(0, self.limit - self.used - self.reserved)

    def headers(self):
        return {"X-Quota-Limit": str(self.limit), "X-Quota-Remaining": str(self.remaining),
                "X-Quota-Reset": str(self.reset_at)}

    def fields(self):
        """The key's quota as /api/stats and `ollama-gw usage` show it."""
        return {"limit": self.limit, "used": self.used, "reserved": self.reserved,
                "left": self.remaining, "resets_at": self.reset_at}


@dataclasses.dataclass
class Reservation:
    id: int
    tokens: int
    standing: Standing  # the key's, this reservation included


def standing(key, now=None):
    """The key's standing now: used and reserved read in one statement (one snapshot),
    so a request settled meanwhile is seen in exactly one of them."""
    now = time.time() if now is None else now
    start, end = quota_period(key.token_period, now)
    p = db.obj.param
    cursor = db.execute_sql(
        f'SELECT (SELECT "tokens" FROM "token_usage" WHERE "key_id" = {p} '
        f'AND "period_start" = {p}), (SELECT SUM("tokens") FROM "quota_reservation" '
        f'WHERE "key_id" = {p} AND "period_start" = {p} AND "expires_at" > {p})',
        (key.id, start, key.id, start, now))
    u, r = cursor.fetchone()
    return Standing(key.token_quota, int(u or 0), int(r or 0), end)


def check(key, now=None):
    """The key's standing, or 429 if charged and reserved tokens reach its quota."""
    now = time.time() if now is None else now
    current = standing(key, now)
    if current.used + current.reserved >= current.limit:
        retry = max(1, math.ceil(current.reset_at - now))
        reserved = (f" and {current.reserved} are reserved by requests running now"
                    if current.reserved else "")
        refusal = RateLimited(
            f"token quota used up: key allows "
            f"{format_token_quota(key.token_quota, key.token_period)} tokens (prompt + "
            f"completion, UTC {key.token_period}) and has used {current.used}{reserved}; "
            f"retry in {retry} s",
            headers={"Retry-After": str(retry), **current.headers()}, refusal="quota",
        )
        refusal.reserved_only = current.used < current.limit  # may pass once they settle
        raise refusal
    return current


def reserve(key, prompt, cap, holder, lease_seconds, now=None, clamp=False):
    """Admit a request of `prompt` estimated tokens and an answer of at most `cap` (None:
    no cap) for `key`, and reserve them; 429 if the quota is used up.

    Returns (Reservation, answer cap to send Ollama or None): with no cap of its own the
    answer is capped at what is left after the prompt, so it cannot run far past it; with
    `clamp` (an endpoint whose clients always ask a large cap: Claude Code's max_tokens
    32000) a cap above what is left is lowered to it too, so the reservation stays within
    the quota.
    """
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        try:
            return _reserve(key, prompt, cap, holder, lease_seconds,
                            time.time() if now is None else now, clamp)
        except RateLimited as refusal:
            if not refusal.reserved_only or time.monotonic() >= deadline:
                raise
        time.sleep(SETTLE_POLL)  # a yield under gevent; no transaction is open


def _reserve(key, prompt, cap, holder, lease_seconds, now, clamp=False):
    start, _ = quota_period(key.token_period, now)
    with db.atomic():
        if is_postgres():
            db.execute_sql("SET LOCAL synchronous_commit = off; "  # see ratelimit.ASYNC_COMMIT
                           "SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_SPACE, key.id))
        current = check(key, now)
        send = None
        left = max(1, current.limit - current.used - current.reserved - prompt)
        if cap is None or (clamp and cap > left):
            send = cap = left
        tokens = prompt + cap
        QuotaReservation.delete().where((QuotaReservation.key_id == key.id)
                                        & (QuotaReservation.expires_at <= now)).execute()
        reservation_id = QuotaReservation.insert(
            key_id=key.id, period_start=start, tokens=tokens, holder=holder,
            expires_at=now + lease_seconds).execute()
    current.reserved += tokens
    return Reservation(reservation_id, tokens, current), send


def answer_cap(key, path, payload):
    """The most tokens the answer may have: what the body asks (num_predict, max_tokens…),
    the key's --max-predict, the smaller of both; 0 for embeddings; None for no cap."""
    if path in EMBEDDING:
        return 0
    if path.startswith("/api/"):
        options = payload.get("options") if isinstance(payload, dict) else None
        asked = [options.get("num_predict")] if isinstance(options, dict) else []
    else:
        asked = [payload.get(f) for f in LENGTH_FIELDS.get(path, ())] if isinstance(
            payload, dict) else []
    caps = [n for n in asked if isinstance(n, int) and not isinstance(n, bool) and n > 0]
    if key.max_predict:
        caps.append(key.max_predict)
    return min(caps) if caps else None


def length_change(path, payload, cap):
    """The top-level body changes that set the answer's length to `cap`."""
    if path.startswith("/api/"):
        options = payload.get("options") if isinstance(payload.get("options"), dict) else {}
        return {"options": {**options, "num_predict": cap}}
    return {LENGTH_FIELDS[path][0]: cap}


def init_app(app):
    @app.after_request
    def _quota_headers(response):
        """Every answer to a quota key says where it stands, refusals included."""
        key = g.get("key")
        if key is not None and key.token_quota and "X-Quota-Limit" not in response.headers:
            try:
                current = g.get("quota_standing") or standing(key)
            except peewee.PeeweeException:
                return response  # the response itself already says what went wrong
            response.headers.update(current.headers())
        return response
