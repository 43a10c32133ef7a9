"""`ollama-gw queue`: requests running and waiting at each upstream, by key."""
import click

from app.admission import fair_queue
from app.store.models import ApiKey
from cli.context import echo_json, open_db, settings, table

COLUMNS = ["upstream", "max_concurrent", "key", "running", "waiting", "longest_wait_s"]


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def queue(as_json):
    """Show requests running and waiting at each upstream.

    By key, on every running gateway.

    Each upstream serves at most max_concurrent requests at once; the rest wait in the
    gateway's fair queue (docs/operations.md: Sharing a busy GPU fairly).
    """
    conf = settings()
    open_db()
    caps = {spec.name: spec.max_concurrent for spec in conf.upstream_specs}
    rows = fair_queue.snapshot()
    names = dict(ApiKey.select(ApiKey.id, ApiKey.prefix).where(
        ApiKey.id.in_({key_id for _, key_id, *_ in rows} or {0})).tuples())
    found = [{"upstream": upstream, "max_concurrent": caps.get(upstream),
              "key": names.get(key_id, f"#{key_id}"), "key_id": key_id, "running": running,
              "waiting": waiting, "longest_wait_s": round(longest, 1)}
             for upstream, key_id, running, waiting, longest in rows]
    if as_json:
        echo_json(found)
        return
    if not found:
        click.echo("No requests running or waiting at any upstream.")
        return
    table([{**row, "max_concurrent": row["max_concurrent"] or "-",
            "longest_wait_s": row["longest_wait_s"] if row["waiting"] else "-"}
           for row in found], COLUMNS)
