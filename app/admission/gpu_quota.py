"""GPU-time quotas (`--gpu-quota 2h/day`) held while requests run, as token quotas are.

A request of a GPU-quota key to an endpoint that runs a model is admitted only while the
GPU seconds charged this period plus those reserved by its requests running now are under
the quota; it then reserves an estimate of its own GPU time, all in one transaction the
database serialises per key (PostgreSQL: an advisory lock; SQLite: its write lock), so
workers and instances cannot admit past the quota between them. The usage writer deletes
the reservation in the transaction that charges the real GPU seconds
(app/accounting/usage.py), so a request counts once, by one or the other; the holder
renews the lease while the request runs, and a crashed worker's rows lapse.

The estimate is the longest GPU time of the key's last 20 requests of that model on that
upstream (the longest, not the average: a request longer than its estimate is what lets a
key past its quota), or, without any, gpu_quota_estimate_seconds of one slot (÷ the
upstream's slots × its gpu_cost). A request's real GPU time is known only when it ends, so a key can
go past its quota by what its requests running at the moment it reached the quota use
beyond their estimates (bench/gpu_quota_overshoot.py measures it); the next request is
refused until the period ends.

Older instances (before migration 0017) know no GPU quotas: they admit such keys' requests
unchecked and charge them nothing.
"""
import dataclasses
import math
import time

import peewee
from flask import g

from app.errors import RateLimited
from app.limits import format_gpu_quota, quota_period
from app.store.db import db, is_postgres
from app.store.models import GpuReservation, UsageLabel, UsageRecord

# PostgreSQL advisory locks (key space, key id): apart from token quotas' (0x6F67).
LOCK_SPACE = 0x6770
SETTLE_SECONDS, SETTLE_POLL = 2.0, 0.02  # as app/admission/quota.py, for the same reason
RECENT_REQUESTS = 20


@dataclasses.dataclass
class Standing:
    """Where a key stands in its GPU-quota period; becomes the X-GPU-Quota-* headers."""

    limit: int  # seconds
    used: float
    reserved: float
    reset_at: int

    @property
    def remaining(self):
        return max(0.0, self.limit - self.used - self.reserved)

    def headers(self):
        return {"X-GPU-Quota-Limit": str(self.limit),
                "X-GPU-Quota-Remaining": f"{self.remaining:.3f}",
                "X-GPU-Quota-Reset": str(self.reset_at)}

    def fields(self):
        """The key's GPU quota as /api/stats and `ollama-gw usage` show it (seconds)."""
        return {"limit": self.limit, "used": round(self.used, 3),
                "reserved": round(self.reserved, 3), "left": round(self.remaining, 3),
                "resets_at": self.reset_at}


@dataclasses.dataclass
class Reservation:
    id: int
    seconds: float
    standing: Standing


def standing(key, now=None):
    """The key's standing now, used and reserved read in one statement (one snapshot)."""
    now = time.time() if now is None else now
    start, end = quota_period(key.gpu_period, now)
    p = db.obj.param
    used, reserved = db.execute_sql(
        f'SELECT (SELECT "seconds" FROM "gpu_usage" WHERE "key_id" = {p} '
        f'AND "period_start" = {p}), (SELECT SUM("seconds") FROM "gpu_reservation" '
        f'WHERE "key_id" = {p} AND "period_start" = {p} AND "expires_at" > {p})',
        (key.id, start, key.id, start, now)).fetchone()
    return Standing(key.gpu_quota, float(used or 0), float(reserved or 0), end)


def check(key, now=None):
    """The key's standing, or 429 once charged and reserved GPU seconds reach its quota."""
    now = time.time() if now is None else now
    current = standing(key, now)
    if current.used + current.reserved >= current.limit:
        retry = max(1, math.ceil(current.reset_at - now))
        reserved = (f" and {current.reserved:.1f} s are reserved by requests running now"
                    if current.reserved else "")
        refusal = RateLimited(
            f"GPU quota used up: key allows {format_gpu_quota(key.gpu_quota, key.gpu_period)} "
            f"of GPU time (UTC {key.gpu_period}) and has used {current.used:.1f} s"
            f"{reserved}; retry in {retry} s",
            headers={"Retry-After": str(retry), **current.headers()}, refusal="gpu_quota")
        refusal.reserved_only = current.used < current.limit  # may pass once they settle
        raise refusal
    return current


def recent_gpu_seconds(key_id, model, upstream=None, requests=20):
    """The most GPU seconds of the key's last `requests` answered requests of `model`
    (on `upstream`, if given), or None without one: what a GPU-quota reservation estimates
    from (app/admission/gpu_quota.py). Only whole answers count: requests Ollama refused
    at once, or the client cut short, would make a key's next ones look cheap."""
    label = UsageLabel.get_or_none(UsageLabel.name == model)
    if label is None:
        return None
    query = (UsageRecord.select(UsageRecord.gpu_seconds)
             .where((UsageRecord.key_id == key_id) & (UsageRecord.model_id == label.id)
                    & UsageRecord.gpu_seconds.is_null(False) & (UsageRecord.status < 400)
                    & (UsageRecord.aborted == False))  # noqa: E712 (peewee's SQL)
             .order_by(UsageRecord.at.desc()).limit(requests))
    if upstream is not None:
        found = UsageLabel.get_or_none(UsageLabel.name == upstream)
        query = query.where(UsageRecord.upstream_id == (found.id if found else -1))
    seconds = [row.gpu_seconds for row in query]
    return max(seconds) if seconds else None


def estimate(key, model, spec, default_seconds):
    """GPU seconds a request of `key` for `model` at upstream `spec` is expected to use."""
    recent = recent_gpu_seconds(key.id, model, spec.name, RECENT_REQUESTS) if model else None
    if recent is not None:
        return recent
    return default_seconds / spec.slots * spec.gpu_cost


def reserve(key, seconds, holder, lease_seconds, now=None):
    """Admit a request expected to use `seconds` of GPU time and reserve them; 429 if the
    key's GPU quota is used up (after waiting up to SETTLE_SECONDS for requests that only
    reserved it to settle)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        try:
            return _reserve(key, seconds, holder, lease_seconds,
                            time.time() if now is None else now)
        except RateLimited as refusal:
            if not refusal.reserved_only or time.monotonic() >= deadline:
                raise
        time.sleep(SETTLE_POLL)


def _reserve(key, seconds, holder, lease_seconds, now):
    start, _ = quota_period(key.gpu_period, now)
    with db.atomic():
        if is_postgres():
            db.execute_sql("SET LOCAL synchronous_commit = off; "
                           "SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_SPACE, key.id))
        current = check(key, now)
        GpuReservation.delete().where((GpuReservation.key_id == key.id)
                                      & (GpuReservation.expires_at <= now)).execute()
        reservation_id = GpuReservation.insert(
            key_id=key.id, period_start=start, seconds=seconds, holder=holder,
            expires_at=now + lease_seconds).execute()
    current.reserved += seconds
    return Reservation(reservation_id, seconds, current)


def init_app(app):
    @app.after_request
    def _gpu_quota_headers(response):
        """Every answer to a GPU-quota key says where it stands, refusals included."""
        key = g.get("key")
        if key is not None and key.gpu_quota and "X-GPU-Quota-Limit" not in response.headers:
            try:
                current = g.get("gpu_quota_standing") or standing(key)
            except peewee.PeeweeException:
                return response
            response.headers.update(current.headers())
        return response
