"""Who changed what: an append-only record of every admin action, from HTTP or the shell.

The one module that does an action (app/keys/registry.py, app/webhooks/outbox.py,
app/store/db.py through UPGRADE_LISTENERS) records it, in the same transaction where
there is one, so the HTTP API, `ollama-gw keys …` and `ollama-gw shell` cannot differ in
what they leave behind. Entries hold key prefixes and settings, never a secret or a hash.
"""
import contextlib
import contextvars
import dataclasses
import datetime
import getpass
import json
import os
import socket

from app.store import db
from app.store.models import AuditEntry, utcnow

ACTIONS = ("key.created", "key.updated", "key.revoked", "key.rotated", "webhook.added",
           "webhook.removed", "db.upgraded", "usage.pruned")


@dataclasses.dataclass(frozen=True)
class Actor:
    """Who acts: a key prefix (HTTP) or an OS user (CLI), through what, from where."""

    who: str
    via: str  # http, cli, shell
    source: str  # the client's address, or this host's name


_actor = contextvars.ContextVar("audit_actor", default=None)


def os_user():
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid with no passwd entry, as in some containers
        return f"uid {os.getuid()}"


def cli_actor(via="cli"):
    return Actor(os_user(), via, socket.gethostname())


@contextlib.contextmanager
def acting_as(actor):
    """Attribute the actions inside the block to `actor`."""
    token = _actor.set(actor)
    try:
        yield actor
    finally:
        _actor.reset(token)


def current_actor():
    """The actor set by acting_as; in a request, the calling key; otherwise this OS user."""
    actor = _actor.get()
    if actor is not None:
        return actor
    try:
        from flask import g, has_request_context

        from app.store.client_address import client_address
    except ImportError:  # pragma: no cover - Flask is a dependency
        return cli_actor()
    if has_request_context():
        key = g.get("key")
        who = f"{key.prefix} ({key.name})" if key is not None else "anonymous"
        return Actor(who, "http", client_address())
    return cli_actor()


def _plain(value):
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return value


def record(action, target=None, before=None, after=None, **details):
    """Append one entry; call it inside the action's own transaction."""
    actor = current_actor()
    data = {k: v for k, v in (("before", before), ("after", after)) if v is not None}
    data.update({k: v for k, v in details.items() if v is not None})
    return AuditEntry.create(
        at=utcnow(), actor=actor.who[:200], via=actor.via, source=actor.source[:255],
        action=action, target=None if target is None else str(target)[:255],
        details=json.dumps(data, default=_plain, sort_keys=True) if data else None,
    )


def changes(before, after):
    """({field: old}, {field: new}) for the fields whose value differs."""
    fields = [k for k in after if before.get(k) != after.get(k)]
    return {k: before.get(k) for k in fields}, {k: after[k] for k in fields}


def entries(since=None, action=None, limit=None):
    """Entries newest first; `since` an epoch second, `action` an exact name or a prefix."""
    query = AuditEntry.select().order_by(AuditEntry.id.desc())
    if since is not None:
        query = query.where(AuditEntry.at >= datetime.datetime.fromtimestamp(
            since, datetime.timezone.utc).replace(tzinfo=None))
    if action:
        query = query.where((AuditEntry.action == action)
                            | AuditEntry.action.startswith(action.rstrip(".") + "."))
    if limit:
        query = query.limit(limit)
    return [entry_summary(row) for row in query]


def change_text(details):
    """An entry's details as people read them, the same in the CLI and the dashboard:
    `rate_limit: 100/hour -> 60/minute; role: user -> admin`, or the other details."""
    before, after = details.get("before", {}), details.get("after", {})
    parts = [f"{field}: {_short(before.get(field))} -> {_short(after.get(field))}"
             if field in before else f"{field}: {_short(after[field])}"
             for field in after]
    parts += [f"{field}: {_short(value)}" for field, value in before.items() if field not in after]
    parts += [f"{field}: {_short(value)}" for field, value in details.items()
              if field not in ("before", "after")]
    return "; ".join(parts)


def _short(value):
    if isinstance(value, list):
        return ",".join(map(str, value)) or "[]"
    return "-" if value is None else str(value)


def entry_summary(row):
    return {
        "id": row.id,
        "at": row.at.replace(tzinfo=datetime.timezone.utc).isoformat(),
        "actor": row.actor,
        "via": row.via,
        "source": row.source,
        "action": row.action,
        "target": row.target,
        "details": json.loads(row.details) if row.details else {},
    }


def _record_upgrade(database, applied):
    # The database upgrade() was given: app/store/models.py binds to the proxy.
    with database.bind_ctx([AuditEntry]):
        record("db.upgraded", None, applied=applied)


db.UPGRADE_LISTENERS.append(_record_upgrade)
