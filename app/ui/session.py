"""Dashboard sign-in: a signed cookie that names a key and a session, and never holds the key.

The cookie carries the key's id, a tag of its hash, a session id, a CSRF token and when
it was issued, signed with the cookie secret. The tag is an HMAC under that secret, not
the hash itself: a cookie must not help anyone guess a weak chosen (demo) secret offline.
Every request reads the key again, so revoking, expiring or rotating it (a new hash,
so the tag no longer matches) ends its sessions at once, on every worker. The session
is a row in the database (only the SHA-256 of its id): sign-out deletes it, so the same
cookie replayed afterwards is refused by every worker and instance. Sign-out ends that
session only; the key's other sessions (another browser) run on.
"""
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from flask import request
from itsdangerous import BadSignature, URLSafeTimedSerializer

from app.store.models import ApiKey, UiSession, utcnow
from app.store.private_files import private_dir

COOKIE = "ogw_ui"
SECRET_FILE = "ui-secret"


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
    """Issues, checks and ends dashboard sessions."""

    def __init__(self, secret, hours):
        self._secret = secret.encode()
        self._signer = URLSafeTimedSerializer(secret, salt="ollama-gw dashboard session")
        self.max_age = int(hours * 3600)

    def _tag(self, key_hash):
        return hmac.new(self._secret, key_hash.encode(), hashlib.sha256).hexdigest()[:32]

    @staticmethod
    def _session_row_id(session_id):
        return hashlib.sha256(session_id.encode()).hexdigest()

    def issue(self, row):
        """A cookie value for a new session of key `row`, recorded in the database."""
        now = time.time()
        UiSession.delete().where(UiSession.expires_at <= now).execute()  # the lapsed ones
        session_id = secrets.token_urlsafe(24)
        UiSession.create(id=self._session_row_id(session_id), key=row.id, created_at=now,
                         expires_at=now + self.max_age)
        return self._signer.dumps({"k": row.id, "t": self._tag(row.key_hash),
                                   "s": session_id, "c": secrets.token_urlsafe(24)})

    def _data(self, cookie):
        try:
            data = self._signer.loads(cookie, max_age=self.max_age)
            return int(data["k"]), str(data["t"]), str(data["s"]), str(data["c"])
        except (BadSignature, KeyError, TypeError, ValueError):
            return None  # a cookie of the previous version has no session id: sign in again

    def read(self, cookie):
        """(ApiKey row, CSRF token) for a valid cookie of a live session of a usable key."""
        data = self._data(cookie) if cookie else None
        if data is None:
            return None
        key_id, tag, session_id, csrf = data
        row = ApiKey.get_or_none(ApiKey.id == key_id)
        if row is None or not hmac.compare_digest(tag, self._tag(row.key_hash)):
            return None
        if row.revoked_at is not None or (row.expires_at and row.expires_at <= utcnow()):
            return None
        live = UiSession.select(UiSession.id).where(
            UiSession.id == self._session_row_id(session_id), UiSession.key == key_id,
            UiSession.expires_at > time.time()).exists()
        return (row, csrf) if live else None

    def end(self, cookie):
        """End the cookie's session, for every worker and instance."""
        data = self._data(cookie) if cookie else None
        if data is not None:
            UiSession.delete().where(UiSession.id == self._session_row_id(data[2])).execute()


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
