"""`ollama-gw upstreams`: each Ollama server's health, models, loaded models and load."""
import statistics
import time

import click

from app.store.models import UpstreamStatus, UsageLabel, UsageRecord
from app.upstreams.pool import probe
from cli.context import echo_json, open_db, settings, table

COLUMNS = ["name", "status", "models", "loaded", "in_flight", "requests_10m",
           "ttfb_p50_ms", "weight", "max_concurrent"]
RECENT = 600  # seconds of usage the latency columns look at


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def upstreams(as_json):
    """Show each upstream's state, models and load.

    Each upstream: does it answer, its models and loaded models, requests in flight on the
    running gateways, and its recent time to first byte.
    """
    conf = settings()
    open_db()
    now = time.time()
    rows = []
    for spec in conf.upstream_specs:
        status, models, loaded = probe(spec.url, conf.connect_timeout)
        views = list(UpstreamStatus.select().where(
            (UpstreamStatus.upstream == spec.name)
            & (UpstreamStatus.updated_at > now - 3 * conf.upstream_refresh_seconds)))
        if views and status == "healthy" and not all(v.up for v in views):
            status = "healthy (a gateway saw it fail)"
        ttfbs = [r.ttfb_ms for r in UsageRecord.select(UsageRecord.ttfb_ms).join(
            UsageLabel, on=UsageRecord.upstream_id == UsageLabel.id).where(
            (UsageLabel.name == spec.name) & (UsageRecord.at > now - RECENT))]
        rows.append({
            "name": spec.name, "url": spec.url, "status": status, "models": models,
            "loaded": loaded, "in_flight": sum(v.in_flight for v in views) if views else None,
            "requests_10m": len(ttfbs),
            "ttfb_p50_ms": statistics.median([t for t in ttfbs if t is not None] or [None]),
            "weight": spec.weight, "max_concurrent": spec.max_concurrent,
        })
    if as_json:
        echo_json(rows)
        return
    table([{**row, "models": ",".join(row["models"]) or "-",
            "loaded": ",".join(row["loaded"]) or "-",
            "in_flight": "-" if row["in_flight"] is None else row["in_flight"],
            "ttfb_p50_ms": "-" if row["ttfb_p50_ms"] is None else row["ttfb_p50_ms"],
            "max_concurrent": row["max_concurrent"] or "-"} for row in rows], COLUMNS)
    click.echo("(in_flight: on the gateways running now; '-': none has reported in the last "
               f"{3 * conf.upstream_refresh_seconds:g} s)")
