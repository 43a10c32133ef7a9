"""`ollama-gw serve` and `ollama-gw check`: run the gateway, or say why it would not run."""
import errno
import os
import socket
import sys

import click
import requests

from app.store import db as database
from app.upstreams.client import Upstream
from cli.context import open_db, plural, prepare_demo_keys, redact, settings


@click.command()
@click.option("--bind", metavar="HOST:PORT", help="Address to listen on [default: 127.0.0.1:8080].")
@click.option("--port", "-port", type=click.IntRange(1, 65535),
              help="Port on the configured host (as go-ollama-api took it).")
@click.option("--ollama-url", "-ollama-url", metavar="URL",
              help="The Ollama server, as in go-ollama-api [default: http://127.0.0.1:11434].")
@click.option("--workers", type=click.IntRange(min=1),
              help="gunicorn worker processes [default: 2].")
@click.option("--no-migrate", is_flag=True, help="Do not apply pending migrations at start.")
def serve(bind, port, ollama_url, workers, no_migrate):
    """Run the gateway under gunicorn with gevent workers.

    SIGTERM drains, SIGHUP reloads.
    """
    overrides = {}
    if bind:
        overrides["bind"] = bind
    if port:
        host = (bind or settings().bind).rpartition(":")[0]
        overrides["bind"] = f"{host}:{port}"
    if ollama_url:
        overrides["upstreams"] = ollama_url
    if workers:
        overrides["workers"] = workers
    if no_migrate:
        overrides["auto_migrate"] = False
    # Workers build their app from the environment: pass the overrides down that way.
    env_names = {"bind": "BIND", "upstreams": "UPSTREAMS", "workers": "WORKERS",
                 "auto_migrate": "AUTO_MIGRATE"}
    for name, value in overrides.items():
        os.environ["OLLAMA_GW_" + env_names[name]] = str(value)
    if ollama_url:
        for familiar in ("OLLAMA_URL", "OLLAMA_BASE_URL"):
            os.environ.pop(familiar, None)  # the flag wins over the familiar variables
    conf = settings()
    _require_free_port(conf.bind)
    # Migrate once, here, before any worker starts; other instances wait on the same lock.
    instance = open_db(migrate=not no_migrate)
    prepare_demo_keys(instance, conf)
    instance.close()
    for spec in conf.upstream_specs:
        ok, verdict = _check_upstream(spec.url, min(conf.connect_timeout, 2.0), 5.0)
        if not ok:
            click.echo(f"warning: Ollama at {spec.url}: {verdict.removeprefix('FAILED: ')}; "
                       "starting anyway, requests get 502 until it answers", err=True)
    targets = ", ".join(spec.url for spec in conf.upstream_specs)
    click.echo(f"ollama-gw listening on http://{conf.bind} -> {targets} "
               f"({conf.workers} workers, database {redact(conf.resolved_database_url)})", err=True)
    # Done here, so the gunicorn master need not (see app/serving/server.py for why it must not).
    os.environ["OLLAMA_GW_AUTO_MIGRATE"] = "false"
    # -P: the working directory is not put on sys.path, so no local `app` can stand in.
    os.execv(sys.executable, [sys.executable, "-P", "-m", "app.serving.server"])


def _require_free_port(bind):
    """Fail now, in plain words, if gunicorn could not listen on `bind`."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, int(port),
                                                             type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise click.ClickException(f"cannot listen on {bind}: host {host!r} is unknown "
                                   f"({exc.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise click.ClickException(
                    f"port {port} on {host} is already in use (another ollama-gw, or another "
                    "program); stop it or choose another with --port or --bind") from None
            raise click.ClickException(f"cannot listen on {bind}: {exc.strerror}") from None


@click.command()
def check():
    """Check the configuration, the database and the upstreams.

    Validates the configuration, opens the database and reaches every upstream.
    """
    problems = 0
    conf = settings()
    click.echo("configuration: ok")
    url = redact(conf.resolved_database_url)
    try:
        instance = open_db(migrate=False)
        pending = database.pending_migrations(instance)
        if pending:
            click.echo(f"database {url}: reachable, {plural(len(pending), 'migration')} pending "
                       "(`ollama-gw db upgrade`, or `serve` applies them)")
        else:
            click.echo(f"database {url}: ok")
    except click.ClickException as exc:
        problems += 1
        click.echo(f"database: FAILED: {exc.message}")
    for spec in conf.upstream_specs:
        ok, verdict = _check_upstream(spec.url, conf.connect_timeout)
        problems += not ok
        click.echo(f"upstream {spec.url}: {verdict}")
    click.echo("web dashboard: " + ("on, at /ui/ (ui = true)" if conf.ui else
                                    "off (set ui = true to serve it at /ui/)"))
    if problems:
        raise click.ClickException(f"{plural(problems, 'problem')} found")
    click.echo("all checks passed")


def _check_upstream(url, connect_timeout, read_timeout=10.0):
    """(ok, what was found in plain words) for the Ollama server at `url`."""
    session = Upstream(url, connect_timeout, read_timeout).session  # the gateway's own settings
    try:
        answer = session.get(url + "/api/version", timeout=(connect_timeout, read_timeout))
    except requests.RequestException as exc:  # refused, unresolvable, timed out
        return False, (f"FAILED: cannot connect ({type(exc).__name__}); is Ollama running "
                       "there? (OLLAMA_URL / upstreams)")
    finally:
        session.close()
    try:
        version = answer.json()["version"] if answer.ok else None
    except (ValueError, TypeError, KeyError):
        version = None
    if not isinstance(version, str):
        return False, (f"FAILED: answered HTTP {answer.status_code} to /api/version, "
                       "not like an Ollama server")
    return True, f"ok (Ollama {version})"
