"""What every command needs: settings and an open, migrated database, or a clear error."""
import json
import os

import click
import peewee

from app.config import ConfigError, load_settings
from app.keys import demo_keys
from app.limits import parse_since
from app.redact import configure_logging
from app.store import audit  # noqa: F401 (listens to db.upgrade: records db.upgraded)
from app.store import db as database


def settings(**overrides):
    try:
        return load_settings(overrides=overrides)
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from None


def open_db(migrate=True):
    """Connect the models to the configured database; with `migrate`, make its schema current.

    migrate=False only opens it: `db upgrade`, `db status` and `check` must work on a
    database whose migrations are pending.
    """
    conf = settings()
    url = conf.resolved_database_url
    try:
        instance = database.open_database(url)
        database.db.initialize(instance)
        instance.connect(reuse_if_open=True)
        if migrate and conf.auto_migrate:
            database.upgrade(instance)
        elif migrate and database.pending_migrations(instance):
            raise click.ClickException(
                "the database schema is out of date: run `ollama-gw db upgrade`"
            )
    except (peewee.OperationalError, OSError) as exc:
        raise click.ClickException(f"cannot open the database at {redact(url)}: {exc}") from None
    return instance


def prepare_demo_keys(instance, conf):
    """Set up the DEMO_* keys (app/keys/demo_keys.py), logging in the gateway's format."""
    if not demo_keys.wanted(os.environ):
        return
    configure_logging(conf.log_level)
    try:
        demo_keys.ensure(instance, os.environ, conf)
    except peewee.PeeweeException as exc:
        raise click.ClickException(f"cannot set up the demo keys: {exc}") from None


def redact(url):
    """A database URL without its password, fit for messages."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if at and ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{creds}{at}{host}"


def echo_json(data):
    click.echo(json.dumps(data, indent=2, default=str))


def plural(count, noun):
    """`1 problem`, `2 problems`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def when(iso, missing):
    """`2026-12-22 05:17 UTC` from an ISO timestamp, or `missing` for none."""
    return f"{iso[:10]} {iso[11:16]} UTC" if iso else missing


def table(rows, columns):
    """Print dict rows as an aligned text table for people."""
    if not rows:
        return
    cells = [[("" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def since_option(text):
    """--since as an epoch second (None for 'all'), or a usage error naming the option."""
    try:
        return parse_since(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
