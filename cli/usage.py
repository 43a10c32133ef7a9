"""`ollama-gw usage`: who used which model, how much and how fast; and trimming old rows."""
import csv
import json
import sys
import time

import click

from app.accounting import histogram, stats
from app.accounting.gpu import shown as gpu_time
from app.admission import gpu_quota, quota
from app.keys import registry as keystore
from app.keys.registry import normalize_model
from app.limits import parse_duration
from app.store import audit
from app.store.models import UsageRecord
from cli.context import echo_json, open_db, since_option, table

LABELS = {"key": ["key_prefix", "key_name"], "model": ["model"], "endpoint": ["endpoint"],
          "day": ["day"], "hour": ["hour"]}
NUMBERS = ["requests", "errors", "refused", "prompt_tokens", "completion_tokens",
           "latency_ms_p50", "latency_ms_p95", "ttfb_ms_p50", "tokens_per_second", "gpu_seconds"]
PERCENTILES = {field for field, *_ in stats.PERCENTILES}
HEADINGS = {"key_prefix": "key", "key_name": "name", "prompt_tokens": "tokens_in",
            "cloud_requests": "cloud_req", "cloud_tokens": "cloud_tok",
            "completion_tokens": "tokens_out", "prompt_tokens_estimated": "in_estimated",
            "latency_ms_p50": "p50_ms",
            "latency_ms_p95": "p95_ms", "ttfb_ms_p50": "ttfb_p50_ms",
            "tokens_per_second": "tok/s", "gpu_seconds": "gpu_time"}


@click.group(invoke_without_command=True)
@click.option("--key", "ident", metavar="KEY", help="Only this key (id, prefix or name).")
@click.option("--model", help="Only this model.")
@click.option("--since", default="7d", show_default=True,
              help="How far back: 24h, 7d, 30d, … or 'all' (whole hours).")
@click.option("--by", type=click.Choice(stats.GROUPS), default="key", show_default=True,
              help="One row per key, model, day, endpoint or hour.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of rows.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV with a header line.")
@click.pass_context
def usage(ctx, ident, model, since, by, as_json, as_csv):
    """Show requests, errors, tokens and latency.

    Requests, errors, tokens, latency and tokens per second, by key, model or day.
    """
    if ctx.invoked_subcommand is not None:
        return
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    open_db()
    key_id = row = None
    if ident:
        try:
            row = keystore.find_key(ident)
        except keystore.KeyOpError as exc:
            raise click.ClickException(str(exc)) from None
        key_id = row.id
    start = since_option(since)
    rows = stats.usage(start, by, key_id, normalize_model(model).lower() if model else None)
    columns = LABELS[by] + NUMBERS
    if by == "key":
        rows = stats.with_estimates(rows, start)
        columns.insert(columns.index("prompt_tokens") + 1, "prompt_tokens_estimated")
        cloud = stats.cloud_by_key(start)
        for found in rows:
            found.update(cloud.get(found["key_id"], {"cloud_requests": 0, "cloud_tokens": 0}))
        if cloud:  # the columns only where the cloud was used
            at = columns.index("completion_tokens") + 1
            columns[at:at] = ["cloud_requests", "cloud_tokens"]
    standing = quota.standing(row) if row is not None and row.token_quota else None
    gpu = gpu_quota.standing(row) if row is not None and row.gpu_quota else None
    for found in rows:
        if standing is not None:
            found["token_quota"] = standing.fields()
        if gpu is not None:
            found["gpu_quota"] = gpu.fields()
    if as_json:
        echo_json(rows)
    elif as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else columns,
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()}
                         for row in rows)
    elif not rows:
        click.echo(f"no requests in that time (--since {since})")
    else:
        shown = [{HEADINGS.get(c, c): histogram.shown(row, c) if c in PERCENTILES
                  else gpu_time(row[c]) if c == "gpu_seconds"
                  else ("-" if row.get(c) is None else row[c]) for c in columns}
                 for row in rows]
        table(shown, [HEADINGS.get(c, c) for c in columns])
    windows = None if as_json or as_csv else stats.cloud_usage(key_id)
    if windows and windows["last_7d"]["requests"]:  # said only where the cloud was used
        click.echo(_cloud_line(windows))
    if standing is not None and not as_json and not as_csv:
        click.echo(f"token quota: {standing.used} used, {standing.reserved} reserved by "
                   f"requests running now, {standing.remaining} left of {standing.limit} "
                   f"(resets {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime(standing.reset_at))})")
    if gpu is not None and not as_json and not as_csv:
        click.echo(f"GPU quota: {gpu_time(gpu.used)} used, {gpu_time(gpu.reserved)} reserved "
                   f"by requests running now, {gpu_time(gpu.remaining)} left of "
                   f"{gpu_time(gpu.limit)} "
                   f"(resets {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime(gpu.reset_at))})")


def _cloud_line(windows):
    return "ran on ollama.com (cloud models, web search): " + "; ".join(
        f"last {name[5:]} {w['requests']} requests, {w['tokens']} tokens"
        for name, w in windows.items())


@usage.command("cloud")
@click.option("--key", "ident", metavar="KEY", help="Only this key (id, prefix or name).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cloud_(ident, as_json):
    """Cloud requests and tokens over the last 5 hours and 7 days.

    The requests that ran on ollama.com (cloud models, web search), counted over the
    rolling windows its plans are limited by.
    """
    open_db()
    key_id = None
    if ident:
        try:
            key_id = keystore.find_key(ident).id
        except keystore.KeyOpError as exc:
            raise click.ClickException(str(exc)) from None
    windows = stats.cloud_usage(key_id)
    if as_json:
        echo_json(windows)
    else:
        table([{"window": name, **w} for name, w in windows.items()],
              ["window", "requests", "prompt_tokens", "completion_tokens", "tokens"])


@usage.command()
@click.option("--older-than", required=True, metavar="DURATION",
              help="Delete per-request rows older than this, e.g. 90d.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def prune(older_than, yes):
    """Delete old per-request rows; hourly totals are kept.

    The hourly totals (and so statistics) stay.
    """
    try:
        cutoff = time.time() - parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    open_db()
    count = UsageRecord.select().where(UsageRecord.at < cutoff).count()
    if count and not yes:
        click.confirm(f"Delete {count} usage row(s) older than {older_than}?", abort=True)
    deleted = 0
    while True:  # in slices, so a huge prune does not hold the database for long
        ids = [r.id for r in UsageRecord.select(UsageRecord.id)
               .where(UsageRecord.at < cutoff).limit(10_000)]
        if not ids:
            break
        deleted += UsageRecord.delete().where(UsageRecord.id.in_(ids)).execute()
    if deleted:
        audit.record("usage.pruned", None, older_than=older_than, rows=deleted)
    click.echo(f"deleted {deleted} usage row(s) older than {older_than}; hourly totals kept")
