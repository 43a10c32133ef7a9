"""ollama-api-service's demo keys: DEMO_ADMIN_KEY and DEMO_USER_KEY in the environment.

When set, a starting gateway makes sure a key with that secret exists: `demo-admin`
(role admin) and `demo-user` (role user), at the default rate limits of their role.
They are ordinary keys from then on: stored as a hash, listed by a random `demo_…`
prefix (never part of the secret), audited as key.created, revocable and changeable.

Run once per start, where the migrations run (`ollama-gw serve`, or gunicorn's
on_starting through `ollama-gw db upgrade --demo-keys`), under the migration lock, so
instances starting together create each key once. On a later start:

- the same value: nothing happens;
- a changed value: the newest key of that name gets the new secret (key.rotated; the
  old value stops working). ollama-api-service crashed here on its unique name;
- that key was revoked: it stays revoked and the variable is ignored, with a warning;
- the value is another key's secret: ignored, with an error naming that key;
- a value shorter than 32 characters (guessable, and the dashboard's sign-in never
  refuses a right key): ignored, with an error; the start goes on without that key.
"""
import logging
import socket

from app.keys import registry as keystore
from app.store import audit, db
from app.store.models import ApiKey

log = logging.getLogger(__name__)

# (environment variable, key name, role)
DEMO_KEYS = (("DEMO_ADMIN_KEY", "demo-admin", "admin"), ("DEMO_USER_KEY", "demo-user", "user"))
# A chosen secret shorter than this is easy to guess: it is refused, with an error.
SHORTEST_SECRET = 32


def wanted(environ):
    """[(variable, name, role, secret)] for each DEMO_* variable set to a non-empty value."""
    return [(var, name, role, environ[var].strip()) for var, name, role in DEMO_KEYS
            if environ.get(var, "").strip()]


def ensure(database, environ, settings):
    """Create or update the demo keys the environment asks for; never fail a start for them."""
    demo = wanted(environ)
    if not demo:
        return
    log.warning("demo keys are on (%s): anyone who has these values can use the gateway; "
                "unset them in production and create keys with `ollama-gw keys add`",
                ", ".join(var for var, *_ in demo))
    defaults = {"user": settings.default_rate_limit_user,
                "admin": settings.default_rate_limit_admin}
    with db.migration_lock(database):
        for var, name, role, secret in demo:
            actor = audit.Actor(f"{audit.os_user()} ({var})", "cli", socket.gethostname())
            try:
                with audit.acting_as(actor):
                    _ensure_one(var, name, role, secret, defaults)
            except keystore.KeyOpError as exc:
                log.error("%s: demo key %s not set up: %s", var, name, exc)


def _ensure_one(var, name, role, secret, defaults):
    if len(secret) < SHORTEST_SECRET:
        log.error("%s is only %d characters long, easy to guess: demo key %s is not created "
                  "or changed; give it %d characters or more (a random value)", var,
                  len(secret), name, SHORTEST_SECRET)
        return
    owner = ApiKey.get_or_none(ApiKey.key_hash == keystore.hash_key(secret))
    if owner is not None:
        if owner.name != name:
            log.error("%s is already the secret of key %d (%s, named %s): ignored", var,
                      owner.id, owner.prefix, owner.name)
        elif owner.revoked_at is not None:
            log.warning("demo key %s (%s, from %s) is revoked and stays revoked", name,
                        owner.prefix, var)
        else:
            log.info("demo key %s (%s) from %s is in place", name, owner.prefix, var)
        return
    existing = ApiKey.select().where(ApiKey.name == name).order_by(ApiKey.id.desc()).first()
    if existing is None:
        row, _ = keystore.create_key(name, role, default_rate_limits=defaults, secret=secret)
        log.info("created demo key %s (%s, role %s, %s) from %s", name, row.prefix, role,
                 keystore.key_summary(row)["rate_limit"], var)
    elif existing.revoked_at is not None:
        log.warning("demo key %s (%s) was revoked: it stays revoked and %s is ignored; "
                    "unset it, or create a key with `ollama-gw keys add`", name,
                    existing.prefix, var)
    else:
        row, _ = keystore.rotate_key(existing.id, secret=secret)
        log.warning("%s changed: demo key %s (id %d) now takes the new value, %s; the old "
                    "value no longer works", var, name, row.id, row.prefix)
