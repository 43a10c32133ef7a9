"""Gateway keys: make them, find them, change them. Secrets exist only at creation.

A key is ``ogw_`` + 43 URL-safe characters (256 random bits). It is stored as its
SHA-256: keys are random, so a fast hash is as safe as a slow one and authentication
costs microseconds. The first 12 characters (``ogw_`` + 8) are its public prefix.

The one exception is a secret an operator chose (ollama-api-service's DEMO_ADMIN_KEY,
app/keys/demo_keys.py): its prefix is ``demo_`` + 8 random characters, taken neither from
the secret (a 12-character preview of ``demo-admin-key-12345`` would show most of it)
nor from its hash (which would let anyone reading a log test guesses at a weak secret).

Names are unique among keys that are not revoked, so a name finds one key: checked here
for a clear error, and held by a partial unique index (migration 0013) against two
creators racing past the check; `_unique_name` turns that index's refusal into the same
error.
"""
import contextlib
import dataclasses
import datetime
import fnmatch
import hashlib
import secrets

import peewee

from app.limits import (
    format_gpu_quota,
    format_rate_limit,
    format_token_quota,
    parse_duration,
    parse_gpu_quota,
    parse_rate_limit,
    parse_token_quota,
)
from app.store import audit
from app.store.db import db
from app.store.ids import parse_id
from app.store.models import ApiKey, utcnow
from app.webhooks.outbox import enqueue, key_event_data

KEY_PREFIX = "ogw_"
PREFIX_LENGTH = len(KEY_PREFIX) + 8
CHOSEN_PREFIX = "demo_"  # the prefix of a key whose secret was chosen, not generated
ROLES = ("user", "admin")


class KeyOpError(ValueError):
    """A key operation cannot be done; the message says why (not found, ambiguous, …)."""


class KeyNotFound(KeyOpError):
    """No key matches the identifier."""


class AmbiguousKey(KeyOpError):
    """The identifier matches several keys; it is refused rather than guessed."""


class KeyNameTaken(KeyOpError):
    """Another key that is not revoked has the name."""


def hash_key(secret):
    # surrogatepass: a lone surrogate from a JSON body is just a wrong key, not a crash.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret():
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _public_prefix(secret, chosen):
    """How listings name a key: its first 12 characters, or random ones for a chosen secret."""
    return CHOSEN_PREFIX + secrets.token_urlsafe(6) if chosen else secret[:PREFIX_LENGTH]


def _require_unused(secret):
    if ApiKey.select().where(ApiKey.key_hash == hash_key(secret)).exists():
        raise KeyOpError("that secret is already another key's; choose a different one")


def _name_holder(name, other_than=None):
    """The key that is not revoked and is named `name` (besides `other_than`), or None."""
    query = ApiKey.select().where((ApiKey.name == name) & ApiKey.revoked_at.is_null())
    if other_than is not None:
        query = query.where(ApiKey.id != other_than)
    return query.first()


def _name_taken(holder):
    return KeyNameTaken(f"a key named {holder.name!r} already exists (key {holder.id}, "
                        f"{holder.prefix}): choose another name, or revoke that key first")


def _require_free_name(name, other_than=None):
    holder = _name_holder(name, other_than)
    if holder is not None:
        raise _name_taken(holder)


@contextlib.contextmanager
def _unique_name(name, other_than=None):
    """Turn the name index's IntegrityError (a creator that raced past the check) into
    KeyNameTaken; any other IntegrityError passes through."""
    try:
        yield
    except peewee.IntegrityError:
        holder = _name_holder(name, other_than)
        if holder is None:
            raise
        raise _name_taken(holder) from None


def next_numbered_name(base):
    """`base N` with N one more than any key's (revoked or not) `base <number>` name.

    The shell names its keys so: a number is never used twice, across sessions too.
    """
    numbers = [int(tail) for (name,) in ApiKey.select(ApiKey.name).where(
        ApiKey.name.startswith(base + " ")).tuples()
        if name.startswith(base + " ") and (tail := name[len(base) + 1:]).isdigit()]
    return f"{base} {max(numbers, default=0) + 1}"


def normalize_model(name):
    """`llama3` and `llama3:latest` are the same model to Ollama."""
    name = (name or "").strip()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def parse_models(text):
    """A comma-separated allow-list -> normalized tuple; empty or None allows all."""
    if text is None:
        return ()
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    names = [str(item).strip() for item in items if str(item).strip()]
    return tuple(name if "*" in name else normalize_model(name) for name in names)


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    """What a request needs to know about its key, detached from the database row."""

    id: int
    prefix: str
    name: str
    role: str
    rate_limit: int | None
    rate_period: int
    max_concurrent: int | None
    models: tuple
    expires_at: datetime.datetime | None
    revoked_at: datetime.datetime | None
    token_quota: int | None = None
    token_period: str | None = None
    max_ctx: int | None = None
    max_predict: int | None = None
    allow_keep_alive: bool = True
    priority: int = 1
    gpu_quota: int | None = None  # GPU seconds per gpu_period (app/admission/gpu_quota.py)
    gpu_period: str | None = None
    cloud: str | None = None  # 'allow', 'deny'; None: the setting cloud_default

    @classmethod
    def from_row(cls, row):
        return cls(
            row.id, row.prefix, row.name, row.role, row.rate_limit, row.rate_period,
            row.max_concurrent, parse_models(row.models), row.expires_at, row.revoked_at,
            row.token_quota, row.token_period, row.max_ctx, row.max_predict,
            row.allow_keep_alive, row.priority, row.gpu_quota, row.gpu_period, row.cloud,
        )

    @property
    def is_admin(self):
        return self.role == "admin"

    def may_use_cloud(self, default):
        """Whether the key may use cloud models and web search; `default` is the setting
        cloud_default (role, allow, deny) for a key without its own value."""
        choice = self.cloud or default
        return choice == "allow" or (choice == "role" and self.is_admin)

    def is_expired(self, now=None):
        return self.expires_at is not None and self.expires_at <= (now or utcnow())

    def allows_model(self, model):
        """Whether the allow-list admits `model`, compared without regard to letter case.

        Ollama resolves model names that way (LLAMA3.2 runs llama3.2), so the list must too.
        """
        if not self.models:
            return True
        wanted = normalize_model(model).lower()
        return any(fnmatch.fnmatchcase(wanted, allowed.lower()) for allowed in self.models)


def key_summary(row):
    """A key as scripts and tables see it: never the secret or its hash."""
    def iso(value):
        return value.replace(tzinfo=datetime.timezone.utc).isoformat() if value else None

    if row.revoked_at:
        status = "revoked"
    elif row.expires_at and row.expires_at <= utcnow():
        status = "expired"
    else:
        status = "active"
    return {
        "id": row.id,
        "prefix": row.prefix,
        "name": row.name,
        "role": row.role,
        "rate_limit": format_rate_limit(row.rate_limit, row.rate_period),
        "max_concurrent": row.max_concurrent,
        "token_quota": format_token_quota(row.token_quota, row.token_period),
        "gpu_quota": format_gpu_quota(row.gpu_quota, row.gpu_period),
        "max_ctx": row.max_ctx,
        "max_predict": row.max_predict,
        "keep_alive": "allow" if row.allow_keep_alive else "deny",
        "cloud": row.cloud or "default",
        "priority": row.priority,
        "models": list(parse_models(row.models)),
        "status": status,
        "created_at": iso(row.created_at),
        "last_used_at": iso(row.last_used_at),
        "expires_at": iso(row.expires_at),
        "revoked_at": iso(row.revoked_at),
    }


def key_target(row):
    """How the audit log names a key: its id and public prefix."""
    return f"key {row.id} ({row.prefix})"


def _settings(row):
    """The settings an admin can change, as the audit log records them."""
    summary = key_summary(row)
    return {k: summary[k] for k in ("name", "role", "rate_limit", "max_concurrent",
                                      "token_quota", "gpu_quota", "max_ctx", "max_predict",
                                      "keep_alive", "cloud", "priority",
                                      "models", "expires_at")}


KEEP_ALIVE = ("allow", "deny")
CLOUD = ("allow", "deny", "default")  # default: stored as NULL, the setting cloud_default decides


def _whole(value, highest, message):
    """`value` as an int in [0, highest], or KeyOpError(message): bad input is never a 500."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise KeyOpError(message) from None
    if isinstance(value, (bool, float)) or not 0 <= number <= highest:
        raise KeyOpError(message)
    return number


def _changes(role=None, rate_limit=None, max_concurrent=None, models=None, expires=None,
             token_quota=None, max_ctx=None, max_predict=None, keep_alive=None, priority=None,
             gpu_quota=None, cloud=None):
    """Validate optional settings into column values; raise KeyOpError with the reason."""
    values = {}
    for name, value in (("max_ctx", max_ctx), ("max_predict", max_predict)):
        if value is not None:
            values[name] = _whole(value, 10_000_000, f"{name.replace('_', ' ')} must be "
                                  "0 (no cap) to 10000000") or None
    if priority is not None:
        values["priority"] = _whole(priority, 100, "priority must be 1 to 100")
        if not values["priority"]:
            raise KeyOpError("priority must be 1 to 100")
    if keep_alive is not None:
        if keep_alive not in KEEP_ALIVE:
            raise KeyOpError(f"keep_alive must be allow or deny, not {keep_alive!r}")
        values["allow_keep_alive"] = keep_alive == "allow"
    if cloud is not None:
        if cloud not in CLOUD:
            raise KeyOpError(f"cloud must be allow, deny or default, not {cloud!r}")
        values["cloud"] = None if cloud == "default" else cloud
    if role is not None:
        if role not in ROLES:
            raise KeyOpError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        values["role"] = role
    if rate_limit is not None:
        try:
            parsed = parse_rate_limit(rate_limit)
        except ValueError as exc:
            raise KeyOpError(str(exc)) from None
        values["rate_limit"], values["rate_period"] = parsed or (None, 3600)
    if max_concurrent is not None:
        values["max_concurrent"] = _whole(
            max_concurrent, 1_000_000, "max concurrent requests must be 0 (no limit) to "
            "1000000") or None
    if token_quota is not None:
        try:
            parsed = parse_token_quota(token_quota)
        except ValueError as exc:
            raise KeyOpError(str(exc)) from None
        values["token_quota"], values["token_period"] = parsed or (None, None)
    if gpu_quota is not None:
        try:
            parsed = parse_gpu_quota(gpu_quota)
        except ValueError as exc:
            raise KeyOpError(str(exc)) from None
        values["gpu_quota"], values["gpu_period"] = parsed or (None, None)
    if models is not None:
        values["models"] = ",".join(parse_models(models)) or None
    if expires is not None:
        if str(expires).strip().lower() in ("never", "none", ""):
            values["expires_at"] = None
        else:
            try:
                lifetime = datetime.timedelta(seconds=parse_duration(expires))
                values["expires_at"] = utcnow() + lifetime
            except ValueError as exc:
                raise KeyOpError(str(exc)) from None
    return values


def create_key(name, role="user", rate_limit=None, max_concurrent=None, models=None,
               expires=None, default_rate_limits=None, token_quota=None, secret=None,
               **policy):
    """Create a key; return (row, secret). The secret is not recoverable afterwards.

    `secret` is for keys whose secret an operator chose (app/keys/demo_keys.py); normally
    the key makes its own.
    """
    name = (name or "").strip()
    if not name:
        raise KeyOpError("a key needs a name (who or what uses it)")
    if len(name) > 200:
        raise KeyOpError("a key name is at most 200 characters")
    if rate_limit is None:
        defaults = default_rate_limits or {"user": "100/hour", "admin": "1000/hour"}
        rate_limit = defaults.get(role, defaults.get("user"))
    values = _changes(role or "user", rate_limit, max_concurrent, models, expires, token_quota,
                      **policy)
    values.setdefault("role", "user")
    _require_free_name(name)
    chosen = secret is not None
    if chosen:
        _require_unused(secret)
    for _ in range(5):
        secret = secret if chosen else new_secret()
        try:
            with _unique_name(name), db.atomic():
                row = ApiKey.create(
                    name=name, prefix=_public_prefix(secret, chosen), key_hash=hash_key(secret),
                    **values
                )
                enqueue("key.created", key_event_data(row))  # committed with the key, or not at all
                audit.record("key.created", key_target(row), after=_settings(row))
            return row, secret
        except peewee.IntegrityError:
            continue  # a prefix clash: 48 random bits make this vanishingly rare
    raise KeyOpError("could not generate a unique key prefix; try again")


def find_key(ident):
    """The key whose id, prefix or name is `ident`; several matches are refused, never guessed."""
    ident = str(ident).strip()
    if not ident:
        raise KeyOpError("give a key's id, prefix or name")
    key_id = parse_id(ident)
    if key_id is not None:
        row = ApiKey.get_or_none(ApiKey.id == key_id)
        if row:
            return row
    if ident.startswith(KEY_PREFIX) and len(ident) > PREFIX_LENGTH:
        # Someone pasted the whole secret: find it by hash, never by a guessable prefix.
        row = ApiKey.get_or_none(ApiKey.key_hash == hash_key(ident))
        if row:
            return row
        raise KeyNotFound("no key matches that secret")
    row = ApiKey.get_or_none(ApiKey.key_hash == hash_key(ident))
    if row:  # a chosen (demo) secret pasted whole: found, and never echoed in a message
        return row
    named = list(ApiKey.select().where(ApiKey.name == ident))
    live = [row for row in named if row.revoked_at is None]
    # A name is unique among live keys: the live one is meant, not its revoked namesakes.
    matches = {row.id: row for row in (live or named)}
    if len(ident) >= 6:
        # startswith is LIKE/ILIKE, case-blind; prefixes are case-sensitive base64, so re-check.
        matches.update((row.id, row) for row in ApiKey.select().where(
            ApiKey.prefix.startswith(ident)) if row.prefix.startswith(ident))
    if len(matches) > 1:
        ids = ", ".join(str(i) for i in sorted(matches))
        raise AmbiguousKey(f"{ident!r} matches more than one key (ids {ids}): give the id "
                         "or a longer prefix")
    if matches:
        return next(iter(matches.values()))
    if key_id is not None:
        raise KeyNotFound(f"no key with id {ident}")
    if len(ident) < 6:
        raise KeyNotFound(f"no key named {ident!r}, and {ident!r} is too short for a prefix: "
                         "give the id, the name or 6+ characters of the prefix")
    if ident.startswith(KEY_PREFIX):
        raise KeyNotFound(f"no key with prefix {ident!r}")
    raise KeyNotFound(f"no key with prefix or name {ident!r}")


def update_key(ident, name=None, **settings):
    """Change a key's name or limits; return (row, names of the settings that changed)."""
    row = find_key(ident)
    values = _changes(**settings)
    if name is not None:
        if not name.strip():
            raise KeyOpError("a key name cannot be empty")
        values["name"] = name.strip()
        if len(values["name"]) > 200:
            raise KeyOpError("a key name is at most 200 characters")
    changed = {k: v for k, v in values.items() if getattr(row, k) != v}
    if not changed:
        return row, []
    if "name" in changed and row.revoked_at is None:
        _require_free_name(changed["name"], other_than=row.id)
    with _unique_name(changed.get("name"), other_than=row.id), db.atomic():
        ApiKey.update(changed).where(ApiKey.id == row.id).execute()
        updated = ApiKey.get_by_id(row.id)
        before, after = audit.changes(_settings(row), _settings(updated))
        audit.record("key.updated", key_target(updated), before, after)
    return updated, sorted(changed)


def revoke_key(ident):
    """Revoke a key at once; return the row. Revoking twice is not an error."""
    row = find_key(ident)
    with db.atomic():
        # Only the revocation that changes the row reports it: twice is one key.revoked.
        if ApiKey.update(revoked_at=utcnow()).where(
                (ApiKey.id == row.id) & ApiKey.revoked_at.is_null()).execute():
            enqueue("key.revoked", key_event_data(row))
            audit.record("key.revoked", key_target(row))
    return ApiKey.get_by_id(row.id)


def rotate_key(ident, secret=None):
    """Give a key a new secret, keeping its id and settings; return (row, secret).

    `secret`: one an operator chose (a changed DEMO_* variable); normally a new one is made.
    """
    row = find_key(ident)
    if row.revoked_at is not None:
        raise KeyOpError(f"key {row.prefix} is revoked; create a new key instead")
    chosen = secret is not None
    if chosen:
        _require_unused(secret)
    else:
        secret = new_secret()
    with db.atomic():
        ApiKey.update(prefix=_public_prefix(secret, chosen), key_hash=hash_key(secret)).where(
            ApiKey.id == row.id
        ).execute()
        rotated = ApiKey.get_by_id(row.id)
        enqueue("key.rotated", key_event_data(rotated, previous_prefix=row.prefix))
        audit.record("key.rotated", key_target(rotated), before={"prefix": row.prefix},
                     after={"prefix": rotated.prefix})
    return rotated, secret


def list_keys(include_revoked=True):
    query = ApiKey.select().order_by(ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_null())
    return list(query)
