"""`ollama-gw audit`: who changed which key, webhook or schema, when and from where."""
import click

from app.store import audit as auditlog
from cli.context import echo_json, open_db, since_option, table


@click.command()
@click.option("--since", default="7d", show_default=True,
              help="How far back: 24h, 7d, 30d, … or 'all'.")
@click.option("--action", metavar="NAME",
              help="Only this action or family: key.created, key, webhook, db.upgraded, …")
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="At most this many entries, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def audit(since, action, limit, as_json):
    """Show the audit log, newest first.

    Every admin action, from HTTP, the CLI and the shell.
    """
    open_db()
    entries = auditlog.entries(since_option(since), action, limit)
    if as_json:
        echo_json(entries)
        return
    if not entries:
        click.echo(f"no admin actions in that time (--since {since})")
        return
    table([{"at": f"{e['at'][:10]} {e['at'][11:19]} UTC", "actor": e["actor"],
            "via": e["via"], "from": e["source"], "action": e["action"],
            "target": e["target"] or "-", "changes": auditlog.change_text(e["details"]) or "-"}
           for e in entries], ["at", "actor", "via", "from", "action", "target", "changes"])
