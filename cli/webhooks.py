"""`ollama-gw webhooks`: receivers of events, a test send, and what was delivered."""
import datetime

import click

from app.store.models import WebhookAttempt, WebhookDelivery
from app.webhooks import delivery as webhook_delivery
from app.webhooks import outbox as hooks
from cli.context import echo_json, open_db, settings, table

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
STATES = ("pending", "delivered", "failed")


def _fail(exc):
    raise click.ClickException(str(exc)) from None


def _iso(epoch):
    if epoch is None:
        return None
    when = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return when.isoformat(timespec="milliseconds")


@click.group()
def webhooks():
    """Send signed gateway events to HTTP receivers.

    Signed the Standard Webhooks way. Events: request.completed, ratelimit.exceeded,
    quota.exceeded, quota.warning, key.created, key.revoked, key.rotated. A webhook is
    named by its id (`webhooks list`).
    """


@webhooks.command("add")
@click.argument("url")
@click.option("--events", metavar="E1,E2",
              help=f"Events to send (default: all of {', '.join(hooks.EVENTS)}); "
              "* also takes events added in later versions.")
@click.option("--include-prompt", is_flag=True,
              help="Add go-ollama-api's fields to request events: prompt text, stream, "
              "number of images, raw. Off by default: prompts are often private.")
@json_option
def add(url, events, include_prompt, as_json):
    """Add a receiver and print its signing secret once."""
    conf = settings()
    open_db()
    try:
        row, secret = hooks.add_webhook(url, events, include_prompt,
                                        conf.webhook_deny_networks)
    except hooks.WebhookOpError as exc:
        _fail(exc)
    summary = hooks.webhook_summary(row)
    if as_json:
        echo_json({"id": row.id, "secret": secret, **summary})
        return
    click.echo(f"Added webhook {row.id} -> {row.url}")
    click.echo(f"Events: {', '.join(summary['events'])}; prompts "
               f"{'included' if row.include_prompt else 'not included'}.")
    click.echo("Gateways send to it within a few seconds. Signing secret (shown once, give it "
               "to the receiver to verify deliveries):")
    click.echo(secret)


@webhooks.command("list")
@json_option
def list_(as_json):
    """List webhooks and how their deliveries stand (never their secrets)."""
    open_db()
    counts = hooks.delivery_counts()
    summaries = [hooks.webhook_summary(row, counts.get(row.id)) for row in hooks.list_webhooks()]
    if as_json:
        echo_json(summaries)
    elif not summaries:
        click.echo("no webhooks yet: add one with `ollama-gw webhooks add URL`")
    else:
        table([{**s, "events": _events_for_people(s["events"]),
                "prompt": "yes" if s["include_prompt"] else "no",
                "created_at": s["created_at"][:16].replace("T", " ") + " UTC", **s["deliveries"]}
               for s in summaries],
              ["id", "url", "events", "prompt", "pending", "delivered", "failed", "created_at"])


def _events_for_people(events):
    return "all six" if tuple(events) == hooks.EVENTS else ",".join(events)


@webhooks.command()
@click.argument("ident", metavar="ID")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
def remove(ident, yes, as_json):
    """Remove a webhook; its deliveries not yet sent are dropped."""
    open_db()
    try:
        row = hooks.find_webhook(ident)
        summary = hooks.webhook_summary(row, hooks.delivery_counts().get(row.id))
        if not yes:
            pending = summary["deliveries"]["pending"]
            click.confirm(f"Remove webhook {row.id} ({row.url})"
                          + (f" and drop its {pending} pending deliveries" if pending else "")
                          + "?", abort=True)
        hooks.remove_webhook(row.id)
    except hooks.WebhookOpError as exc:
        _fail(exc)
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"Removed webhook {row.id} ({row.url}).")


@webhooks.command()
@click.argument("ident", metavar="ID")
@json_option
def test(ident, as_json):
    """Send a webhook.test event now and say how the receiver answered (exit 1 if it failed).

    The test is sent once from this command, never retried, and listed with the
    webhook's deliveries.
    """
    conf = settings()
    open_db()
    try:
        row = hooks.find_webhook(ident)
    except hooks.WebhookOpError as exc:
        _fail(exc)
    outcome = webhook_delivery.send_test(conf, row)
    if as_json:
        echo_json({"delivery_id": outcome.delivery_id, "message_id": outcome.message_id,
                   "ok": outcome.ok, "status": outcome.status, "error": outcome.error,
                   "duration_ms": outcome.duration_ms, "state": outcome.state})
        if not outcome.ok:
            click.get_current_context().exit(1)
        return
    if not outcome.ok:
        raise click.ClickException(f"webhook {row.id}: {outcome.describe()}")
    click.echo(f"webhook {row.id}: {outcome.describe()}")


@webhooks.command()
@click.argument("ident", metavar="[WEBHOOK_ID]", required=False)
@click.option("--state", type=click.Choice(STATES), help="Only deliveries in this state.")
@click.option("--limit", type=click.IntRange(1, 10000), default=20, show_default=True,
              help="How many of the most recent deliveries.")
@json_option
def deliveries(ident, state, limit, as_json):
    """Recent deliveries, newest first, with their attempts (of one webhook, or all).

    Each has an id of its own (the DELIVERY column; `webhooks retry DELIVERY_ID`) and
    belongs to a webhook (the WEBHOOK column; WEBHOOK_ID chooses one).
    """
    open_db()
    query = WebhookDelivery.select().order_by(WebhookDelivery.id.desc()).limit(limit)
    if ident is not None:
        try:
            query = query.where(WebhookDelivery.webhook == hooks.find_webhook(ident).id)
        except hooks.WebhookOpError as exc:
            _fail(exc)
    if state:
        query = query.where(WebhookDelivery.state == state)
    rows = list(query)
    attempts = {}
    if rows:
        for attempt in (WebhookAttempt.select()
                        .where(WebhookAttempt.delivery.in_([row.id for row in rows]))
                        .order_by(WebhookAttempt.id)):
            attempts.setdefault(attempt.delivery_id, []).append(
                {"at": _iso(attempt.at), "status": attempt.status, "error": attempt.error,
                 "duration_ms": attempt.duration_ms})
    found = [_delivery(row, attempts.get(row.id, [])) for row in rows]
    if as_json:
        echo_json(found)
    elif not found:
        click.echo("no deliveries" + (f" in state {state}" if state else "") + " yet")
    else:
        table([_delivery_for_people(d) for d in found],
              ["delivery", "webhook", "event", "state", "attempts", "last_status", "created_at",
               "next", "last_error"])


@webhooks.command()
@click.argument("ident", metavar="DELIVERY_ID")
def retry(ident):
    """Send a failed delivery again, from its first attempt (ids: `webhooks deliveries`).

    A running gateway sends it within a second or so, then retries it on the usual
    schedule if it fails again.
    """
    open_db()
    try:
        webhook_delivery.retry_delivery(hooks.parse_id(ident, "delivery"))
    except hooks.WebhookOpError as exc:
        _fail(exc)
    click.echo(f"delivery {ident.strip()} will be sent again: see `ollama-gw webhooks "
               "deliveries`")


def _delivery(row, attempts):
    return {"id": row.id, "webhook_id": row.webhook_id, "message_id": row.message_id,
            "event": row.event, "state": row.state, "attempts": row.attempts,
            "last_status": row.last_status, "last_error": row.last_error,
            "created_at": _iso(row.created_at), "delivered_at": _iso(row.delivered_at),
            "next_attempt_at": _iso(row.next_attempt_at) if row.state == "pending" else None,
            "attempt_log": attempts}


def _delivery_for_people(d):
    error = d["last_error"] or ""
    return {**d, "delivery": d["id"], "webhook": d["webhook_id"],
            "last_status": d["last_status"] or "-",
            "created_at": _when_iso(d["created_at"]),
            "next": _when_iso(d["next_attempt_at"]) if d["state"] == "pending" else "-",
            "last_error": error if len(error) <= 60 else error[:59] + "…"}


def _when_iso(iso):
    """`2026-12-22 05:17:03 UTC`: deliveries are retried seconds apart, so seconds count."""
    return f"{iso[:10]} {iso[11:19]} UTC" if iso else "-"
