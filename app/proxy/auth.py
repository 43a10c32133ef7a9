"""Who is calling: find the key in the request, check it, cache the answer for a second.

The cache keeps the hot path free of database reads while bounding how long a revoked
key keeps working: `key_cache_seconds` (1 s by default), on every worker.
"""
import logging
import threading
import time

import peewee

from app.errors import Forbidden, Unauthorized
from app.keys.registry import KeyInfo, hash_key
from app.store.models import ApiKey, utcnow

log = logging.getLogger(__name__)

# Re-stamp last_used_at at most this often per key and process: one write a minute, not a request.
LAST_USED_EVERY = 60.0


class KeyCache:
    """hash -> (KeyInfo, fetched_at) for known keys; per process, self-expiring."""

    def __init__(self, ttl):
        self.ttl = ttl
        self._entries = {}
        self._last_used = {}
        self._lock = threading.Lock()

    def lookup(self, key_hash):
        now = time.monotonic()
        entry = self._entries.get(key_hash)
        if entry and now - entry[1] < self.ttl:
            return entry[0]
        row = ApiKey.get_or_none(ApiKey.key_hash == key_hash)
        if row is None:
            return None  # misses are not cached: random keys must not crowd out real ones
        info = KeyInfo.from_row(row)
        with self._lock:
            if len(self._entries) > 100_000:
                self._entries.clear()  # only real keys land here; this is a backstop
            self._entries[key_hash] = (info, now)
        return info

    def touch(self, info):
        """Record that the key was used, at most once a minute; never fail a request for it."""
        now = time.monotonic()
        if now - self._last_used.get(info.id, -LAST_USED_EVERY) < LAST_USED_EVERY:
            return
        self._last_used[info.id] = now
        try:
            ApiKey.update(last_used_at=utcnow()).where(ApiKey.id == info.id).execute()
        except peewee.PeeweeException as exc:
            log.warning("could not record that key %s was used: %s", info.prefix, exc)

    def clear(self):
        with self._lock:
            self._entries.clear()
            self._last_used.clear()


def header_credentials(headers):
    """The secret from `Authorization: Bearer` or `X-API-Key`, or None."""
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("X-API-Key", "").strip() or None


def query_credentials(args):
    """The legacy `?apikey=` secret (go-ollama-api), or None."""
    return args.get("apikey", "").strip() or None


def body_credentials(payload):
    """The legacy `apikey` field of a JSON body, or None."""
    value = payload.get("apikey") if isinstance(payload, dict) else None
    return value.strip() or None if isinstance(value, str) else None


def authenticate(cache, secret):
    """Return the KeyInfo for `secret` or raise 401 saying which check failed."""
    if not secret:
        raise Unauthorized(
            "missing API key: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        )
    info = cache.lookup(hash_key(secret))
    if info is None:
        raise Unauthorized("invalid API key")
    if info.revoked_at is not None:
        raise Unauthorized(f"API key {info.prefix} has been revoked")
    if info.is_expired():
        raise Unauthorized(f"API key {info.prefix} expired")
    cache.touch(info)
    return info


def require_admin(info, what):
    if not info.is_admin:
        raise Forbidden(f"{what} needs an admin key; key {info.prefix} has role {info.role}")


def require_model(info, model):
    if model and not info.allows_model(model):
        raise Forbidden(f"key {info.prefix} may not use model {model!r}")


def init_app(app):
    app.extensions["key_cache"] = KeyCache(app.config["SETTINGS"].key_cache_seconds)
