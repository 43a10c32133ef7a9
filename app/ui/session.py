"""Dashboard sign-in: a signed cookie that names a key and never holds it.

The cookie carries the key's id, a tag of its hash, a CSRF token and when it was
issued, signed with the cookie secret. The tag is an HMAC under that secret, not the
hash itself: a cookie must not help anyone guess a weak chosen (demo) secret offline.
Every request reads the key again, so revoking, expiring or rotating it (a new hash,
so the tag no longer matches) ends its sessions at once, on every worker.
"""
import collections
import hashlib
import hmac
import os
import secrets
import threading
import time
from pathlib import Path

from flask import request
from itsdangerous import BadSignature, URLSafeTimedSerializer

from app.models import ApiKey, utcnow
from app.private_files import private_dir

COOKIE = "ogw_ui"
SECRET_FILE = "ui-secret"
# Failed sign-ins a client address may make per minute and process before it must wait.
FAILED_SIGNINS_PER_MINUTE = 10


def cookie_secret(settings):
    """`ui_secret`, or the one kept in data_dir (made once; every worker reads the same)."""
    if settings.ui_secret:
        return settings.ui_secret
    directory = settings.resolved_data_dir
    path = directory / SECRET_FILE
    if not path.exists():
        private_dir(directory)
        draft = directory / f".{SECRET_FILE}-{os.getpid()}-{secrets.token_hex(4)}"
        draft.write_text(secrets.token_urlsafe(48))
        draft.chmod(0o600)
        try:
            os.link(draft, path)  # atomic: of workers starting together, one file wins
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return Path(path).read_text().strip()


class Sessions:
    """Issues and checks dashboard session cookies."""

    def __init__(self, secret, hours):
        self._secret = secret.encode()
        self._signer = URLSafeTimedSerializer(secret, salt="ollama-gw dashboard session")
        self.max_age = int(hours * 3600)
        self._failures = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def _tag(self, key_hash):
        return hmac.new(self._secret, key_hash.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self, row):
        """A cookie value for a session of key `row`."""
        return self._signer.dumps({"k": row.id, "t": self._tag(row.key_hash),
                                   "c": secrets.token_urlsafe(24)})

    def read(self, cookie):
        """(ApiKey row, CSRF token) for a valid cookie of a usable key, else None."""
        if not cookie:
            return None
        try:
            data = self._signer.loads(cookie, max_age=self.max_age)
            row = ApiKey.get_or_none(ApiKey.id == int(data["k"]))
            tag, csrf = str(data["t"]), str(data["c"])
        except (BadSignature, KeyError, TypeError, ValueError):
            return None
        if row is None or not hmac.compare_digest(tag, self._tag(row.key_hash)):
            return None
        if row.revoked_at is not None or (row.expires_at and row.expires_at <= utcnow()):
            return None
        return row, csrf

    def too_many_failures(self, address, now=None):
        """Whether `address` failed to sign in too often in the last minute."""
        now = time.monotonic() if now is None else now
        with self._lock:
            failures = self._failures.get(address)
            while failures and failures[0] < now - 60:
                failures.popleft()
            return bool(failures) and len(failures) >= FAILED_SIGNINS_PER_MINUTE

    def failed(self, address):
        with self._lock:
            if len(self._failures) > 10_000:
                self._failures.clear()  # a backstop against many addresses
            self._failures[address].append(time.monotonic())


def cross_site():
    """Whether this request comes from another site's page (a forged form post)."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site and fetch_site not in ("same-origin", "none"):
        return True
    origin = request.headers.get("Origin")
    return bool(origin) and origin not in (f"http://{request.host}", f"https://{request.host}")


def csrf_ok(expected):
    """Whether the form carries this session's CSRF token."""
    given = request.form.get("csrf", "")
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())
