"""`ollama-gw keys`: create, inspect, change, revoke and rotate gateway keys."""
import click

from app.keys import registry as keystore
from cli.context import echo_json, open_db, redact, settings, table, when

LIST_COLUMNS = ["id", "prefix", "name", "role", "rate_limit", "max_concurrent", "token_quota",
                "gpu_quota", "models", "status", "last_used_at", "expires_at"]

limit_options = [
    click.option("--role", type=click.Choice(keystore.ROLES), help="user (default) or admin."),
    click.option("--rate-limit", metavar="N/UNIT",
                 help="Requests per second|minute|hour|day, e.g. 60/minute, or 'none'."),
    click.option("--max-concurrent", type=click.IntRange(min=0), metavar="N",
                 help="Requests in flight at once (0: no limit)."),
    click.option("--token-quota", metavar="N/day|N/month",
                 help="Prompt + completion tokens per UTC day or month, e.g. 200000/day; "
                 "'none' for no quota."),
    click.option("--gpu-quota", metavar="TIME/day|TIME/month",
                 help="GPU time per UTC day or month (units s, m, h), e.g. 2h/day, 90s/day, "
                 "30m/month; 'none' for no quota."),
    click.option("--max-ctx", type=click.IntRange(min=0), metavar="N",
                 help="Largest num_ctx (context tokens) the key may ask for (0: no cap)."),
    click.option("--max-predict", type=click.IntRange(min=0), metavar="N",
                 help="Longest answer in tokens: num_predict / max_tokens (0: no cap)."),
    click.option("--keep-alive", type=click.Choice(keystore.KEEP_ALIVE),
                 help="Whether the key may set keep_alive (how long a model stays loaded)."),
    click.option("--cloud", type=click.Choice(keystore.CLOUD),
                 help="Whether the key may use Ollama's cloud models and web search (they "
                 "spend the server owner's ollama.com plan); default: the setting "
                 "cloud_default (admin keys yes, user keys no)."),
    click.option("--priority", type=click.IntRange(1, 100), metavar="N",
                 help="Share of a busy upstream's slots when keys wait for them: 2 gets "
                 "twice the requests of 1 (default 1)."),
    click.option("--models", metavar="M1,M2",
                 help="Models the key may use (names or patterns like 'llama3*'); '' for all."),
    click.option("--expires", metavar="DURATION",
                 help="Lifetime from now: 30d, 12h, 90m, 2w; 'never' to clear."),
]


def with_limit_options(func):
    for option in reversed(limit_options):
        func = option(func)
    return func


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def row_for_people(summary):
    """A key summary as tables show it (`keys list`, the shell's `listkeys`)."""
    models = summary["models"]
    return {**summary, "models": ",".join(models) if models else "all",
            "max_concurrent": summary["max_concurrent"] or "-",
            "created_at": when(summary["created_at"], "-"),
            "last_used_at": when(summary["last_used_at"], "never"),
            "expires_at": when(summary["expires_at"], "never"),
            "revoked_at": when(summary["revoked_at"], "-")}


def _fail(exc):
    raise click.ClickException(str(exc)) from None


@click.group()
def keys():
    """Manage gateway API keys.

    Secrets are shown once, at creation or rotation.

    KEY names a key by its id, its prefix (6+ characters, e.g. ogw_9cRSO_FS) or its name;
    one that matches several keys is refused.
    """


@keys.command("add")
@click.option("--name", required=True, help="Who or what uses the key.")
@with_limit_options
@json_option
def add(name, role, rate_limit, max_concurrent, token_quota, gpu_quota, max_ctx, max_predict,
        keep_alive, cloud, priority, models, expires, as_json):
    """Create a key and print its secret once."""
    conf = settings()
    open_db()
    defaults = {"user": conf.default_rate_limit_user, "admin": conf.default_rate_limit_admin}
    try:
        row, secret = keystore.create_key(name, role or "user", rate_limit, max_concurrent,
                                          models, expires, defaults, token_quota,
                                          max_ctx=max_ctx, max_predict=max_predict,
                                          keep_alive=keep_alive, priority=priority,
                                          gpu_quota=gpu_quota, cloud=cloud)
    except keystore.KeyOpError as exc:
        _fail(exc)
    summary = keystore.key_summary(row)
    if as_json:
        echo_json({"key": secret, **summary})
        return
    click.echo(f"Created key {row.id} ({row.prefix}) for {row.name!r}: "
               f"role {row.role}, {summary['rate_limit']}.")
    click.echo(f"Database: {redact(conf.resolved_database_url)} (a gateway using another "
               "database will not know this key).")
    click.echo("Secret (shown once, store it now):")
    click.echo(secret)


@keys.command("list")
@click.option("--active", is_flag=True, help="Hide revoked keys.")
@json_option
def list_(active, as_json):
    """List keys (never their secrets)."""
    open_db()
    summaries = [keystore.key_summary(row) for row in keystore.list_keys(not active)]
    if as_json:
        echo_json(summaries)
    elif not summaries:
        click.echo("no keys yet: create one with `ollama-gw keys add --name NAME`")
    else:
        table([row_for_people(s) for s in summaries], LIST_COLUMNS)


@keys.command()
@click.argument("ident", metavar="KEY")
@json_option
def show(ident, as_json):
    """Show one key's settings."""
    open_db()
    try:
        summary = keystore.key_summary(keystore.find_key(ident))
    except keystore.KeyOpError as exc:
        _fail(exc)
    if as_json:
        echo_json(summary)
        return
    for field, value in row_for_people(summary).items():
        click.echo(f"{field + ':':16}{value if value is not None else '-'}")


@keys.command()
@click.argument("ident", metavar="KEY")
@click.option("--name", help="New name.")
@with_limit_options
@json_option
def update(ident, name, role, rate_limit, max_concurrent, token_quota, gpu_quota, max_ctx,
           max_predict, keep_alive, cloud, priority, models, expires, as_json):
    """Change a key's name, role or limits.

    Changes take effect within a second.
    """
    changes = {"name": name, "role": role, "rate_limit": rate_limit,
               "max_concurrent": max_concurrent, "token_quota": token_quota,
               "gpu_quota": gpu_quota,
               "max_ctx": max_ctx, "max_predict": max_predict, "keep_alive": keep_alive,
               "cloud": cloud, "priority": priority, "models": models, "expires": expires}
    if all(value is None for value in changes.values()):
        raise click.UsageError("nothing to change: give at least one of --name, --role, "
                               "--rate-limit, --max-concurrent, --token-quota, --gpu-quota, "
                               "--max-ctx, --max-predict, --keep-alive, --cloud, --priority, "
                               "--models, --expires")
    open_db()
    try:
        row, changed = keystore.update_key(ident, **changes)
    except keystore.KeyOpError as exc:
        _fail(exc)
    summary = keystore.key_summary(row)
    if as_json:
        echo_json({**summary, "changed": changed})
    elif changed:
        click.echo(f"Updated key {row.id} ({row.prefix}): {', '.join(changed)}.")
    else:
        click.echo(f"Key {row.id} ({row.prefix}) already has these settings; nothing changed.")


@keys.command()
@click.argument("ident", metavar="KEY")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
def revoke(ident, yes, as_json):
    """Revoke a key: requests with it fail within a second."""
    open_db()
    try:
        row = keystore.find_key(ident)
        if not yes:
            click.confirm(f"Revoke key {row.id} ({row.prefix}, {row.name!r})?", abort=True)
        row = keystore.revoke_key(row.id)
    except keystore.KeyOpError as exc:
        _fail(exc)
    if as_json:
        echo_json(keystore.key_summary(row))
    else:
        click.echo(f"Revoked key {row.id} ({row.prefix}).")


@keys.command()
@click.argument("ident", metavar="KEY")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
def rotate(ident, yes, as_json):
    """Give a key a new secret; the old one stops working.

    The old secret is refused within a second.
    """
    open_db()
    try:
        row = keystore.find_key(ident)
        if not yes:
            click.confirm(f"Replace the secret of key {row.id} ({row.prefix})?", abort=True)
        row, secret = keystore.rotate_key(row.id)
    except keystore.KeyOpError as exc:
        _fail(exc)
    if as_json:
        echo_json({"key": secret, **keystore.key_summary(row)})
        return
    click.echo(f"Rotated key {row.id}; new prefix {row.prefix}. Secret (shown once):")
    click.echo(secret)
