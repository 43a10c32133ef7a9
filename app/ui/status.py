"""What the dashboard shows besides charts: upstreams, a key's limits and recent requests,
webhook deliveries. Each reads little: a LIMIT, an index, or one row per upstream.
"""
import os
import time

from peewee import fn
from prometheus_client import CollectorRegistry, multiprocess

from app import metrics
from app.accounting.usage import REFUSAL_NAMES
from app.admission import gpu_quota, quota
from app.limits import format_gpu_quota, format_rate_limit, format_token_quota
from app.store.models import (
    ConcurrencySlot,
    UpstreamStatus,
    UsageRecord,
    Webhook,
    WebhookDelivery,
)
from app.ui.charts import label_names
from app.upstreams.pool import probe
from app.webhooks import delivery as webhook_delivery
from app.webhooks.outbox import WebhookOpError

RECENT_REQUESTS = 50


def upstreams(settings):
    """Each upstream: reachable or not, its loaded models, streams in flight on all gateways."""
    now = time.time()
    fresh = now - 3 * settings.upstream_refresh_seconds
    views = list(UpstreamStatus.select().where(UpstreamStatus.updated_at > fresh))
    found = []
    for spec in settings.upstream_specs:
        mine = [v for v in views if v.upstream == spec.name]
        status, _, loaded = probe(spec.url, settings.connect_timeout)
        found.append({"name": spec.name, "url": spec.url, "status": status, "loaded": loaded,
                      "in_flight": sum(v.in_flight for v in mine) if mine else None})
    return found


def streams_in_flight():
    """Answers being relayed now by this host's workers: the /metrics gauge, summed."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return int(metrics.INFLIGHT._value.get())  # one process: its own gauge
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return int(sum(sample.value for family in registry.collect()
                   if family.name == "ollama_gw_inflight_streams"
                   for sample in family.samples))


def limits(key, limiter, now=None):
    """How close a key (KeyInfo) is to each of its limits: [{name, used, limit, percent}]."""
    now = time.time() if now is None else now
    found = []
    if key.rate_limit:
        window = limiter.peek(key, now)
        used = window.limit - window.remaining
        found.append(_limit("requests this window", used, window.limit,
                            format_rate_limit(key.rate_limit, key.rate_period),
                            window.reset_at))
    if key.token_quota:
        standing = quota.standing(key, now)
        found.append(_limit(f"tokens this UTC {key.token_period}", standing.used,
                            key.token_quota,
                            format_token_quota(key.token_quota, key.token_period),
                            standing.reset_at))
        found[-1].update(reserved=standing.reserved, left=standing.remaining)
    if key.gpu_quota:
        gpu = gpu_quota.standing(key, now)
        found.append(_limit(f"GPU seconds this UTC {key.gpu_period}", round(gpu.used, 1),
                            key.gpu_quota, format_gpu_quota(key.gpu_quota, key.gpu_period),
                            gpu.reset_at))
        found[-1].update(reserved=round(gpu.reserved, 1), left=round(gpu.remaining, 1))
    if key.max_concurrent:
        used = (ConcurrencySlot.select().where((ConcurrencySlot.key == key.id)
                                               & (ConcurrencySlot.expires_at > now)).count())
        found.append(_limit("requests at once", used, key.max_concurrent,
                            str(key.max_concurrent), None))
    return found


def _limit(name, used, limit, text, resets_at):
    return {"name": name, "used": used, "limit": limit, "text": text, "resets_at": resets_at,
            "percent": min(100.0, round(100 * used / limit, 1)) if limit else None}


def recent_requests(key_id, refused_only=False, limit=RECENT_REQUESTS, answered_only=False):
    """A key's latest requests, newest first (the (key_id, at) index answers this).

    `refused_only`: the gateway's refusals; `answered_only`: the others (the key's page
    lists each kind once).
    """
    query = (UsageRecord.select().where(UsageRecord.key_id == key_id)
             .order_by(UsageRecord.at.desc()).limit(limit))
    if refused_only:
        query = query.where(UsageRecord.refusal != 0)
    if answered_only:
        query = query.where(UsageRecord.refusal == 0)
    rows = list(query)
    names = label_names({i for r in rows for i in (r.endpoint_id, r.model_id)})
    return [{"at": r.at, "endpoint": names.get(r.endpoint_id), "model": names.get(r.model_id),
             "status": r.status, "refusal": REFUSAL_NAMES.get(r.refusal),
             "tokens": (r.prompt_tokens or 0) + (r.completion_tokens or 0),
             "latency_ms": r.latency_ms, "ttfb_ms": r.ttfb_ms} for r in rows]


def deliveries(state=None, limit=50):
    """The latest webhook deliveries, newest first, optionally of one state."""
    query = WebhookDelivery.select().order_by(WebhookDelivery.id.desc()).limit(limit)
    if state:
        query = query.where(WebhookDelivery.state == state)
    return list(query)


def failure_counts():
    """{webhook id: failed deliveries}."""
    return dict(WebhookDelivery.select(WebhookDelivery.webhook, fn.COUNT(WebhookDelivery.id))
                .where(WebhookDelivery.state == "failed")
                .group_by(WebhookDelivery.webhook).tuples())


def send_test(settings, webhook_id):
    """Send a webhook.test event to one webhook now; the Outcome says how it went."""
    row = Webhook.get_or_none(Webhook.id == webhook_id)
    if row is None:
        raise WebhookOpError(f"no webhook with id {webhook_id}")
    return webhook_delivery.send_test(settings, row)
