"""Usage statistics over HTTP: a key's own (`/api/stats`, `/api/stats/detailed`), everyone's
for admins.

The answers keep ollama-api-service's fields (total_requests, requests_by_model,
requests_by_endpoint, average_response_time, last_24h_requests) and add tokens,
percentiles and per-day rows. These routes take precedence over the /api relay.
"""
import datetime
import time

from flask import Blueprint, current_app, g, jsonify, request

from app.accounting import stats
from app.admission import gpu_quota, quota
from app.errors import BadRequest
from app.limits import format_rate_limit, parse_since
from app.proxy import auth, gateway

bp = Blueprint("stats", __name__)


def since_arg():
    """The `since` query parameter (7d, 24h, … or all; 30 days by default) as an epoch second."""
    try:
        return parse_since(request.args.get("since", "30d"))
    except ValueError as exc:
        raise BadRequest(f"since: {exc}") from None


def _iso_hour(since):
    """Where a statistic starts: the whole hour of `since` (the roll-up's granularity)."""
    return None if since is None else time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(since))


def _summary(since, key_id=None):
    by_model = stats.usage(since, "model", key_id)
    by_endpoint = stats.usage(since, "endpoint", key_id)
    overall = stats.totals(by_model)
    latency = [r["latency_ms_avg"] * r["requests"] for r in by_model if r["requests"]]
    recent = stats.totals(stats.usage(time.time() - 86400, "model", key_id))
    return {
        "since": _iso_hour(since),
        "total_requests": overall["requests"],
        "requests_by_model": {r["model"] or "(none)": r["requests"] for r in by_model},
        "requests_by_endpoint": {r["endpoint"]: r["requests"] for r in by_endpoint},
        "average_response_time": round(sum(latency) / overall["requests"] / 1000, 4)
        if overall["requests"] else None,
        "last_24h_requests": recent["requests"],
        **{k: overall[k] for k in ("errors", "refused", "prompt_tokens", "completion_tokens",
                                   "gpu_seconds")},
        "gpu_seconds_by_model": {r["model"] or "(none)": r["gpu_seconds"] for r in by_model
                                 if r["gpu_seconds"]},
        "gpu_seconds_by_upstream": stats.gpu_by_upstream(since, key_id),
        "by_model": by_model,
        "by_day": stats.usage(since, "day", key_id),
        # Requests that ran on ollama.com (part of the figures above): the owner's plan is
        # limited over rolling windows like these.
        "cloud": stats.cloud_usage(key_id),
    }


@bp.get("/api/stats")
def own_stats():
    """The calling key's own usage; any valid key."""
    key = gateway.current_key()
    since = since_arg()
    summary = _summary(since, key.id)
    summary["prompt_tokens_estimated"] = stats.estimated_prompt_tokens(since, key.id).get(
        key.id, 0)
    standing = g.quota_standing = quota.standing(key) if key.token_quota else None
    gpu = g.gpu_quota_standing = gpu_quota.standing(key) if key.gpu_quota else None
    return jsonify({"key": {"id": key.id, "prefix": key.prefix, "name": key.name,
                            "role": key.role}, **summary,
                    "token_quota": standing and standing.fields(),
                    "gpu_quota": gpu and gpu.fields()})


@bp.get("/api/stats/detailed")
def own_detailed_stats():
    """ollama-api-service's detailed view of the calling key; any valid key, its own only.

    Response times (seconds, as in /api/stats) are over answered requests since `since`
    (30 days by default); first and last request over the per-request rows kept.
    """
    key = gateway.current_key()
    since = since_arg()
    now = time.time()
    count, low, high, average = stats.response_times(key.id, since)
    first, last = stats.request_span(key.id)
    window = current_app.extensions["limiter"].peek(key, now)
    used = None if window.limit is None else window.limit - max(window.remaining, 0)
    return jsonify({
        "key": {"id": key.id, "prefix": key.prefix, "name": key.name, "role": key.role},
        "key_name": key.name,
        "role": key.role,
        "since": _iso(since),
        "total_requests_24h": stats.totals(stats.usage(now - 86400, "model", key.id))["requests"],
        "total_requests_7d": stats.totals(stats.usage(now - 7 * 86400, "model", key.id))[
            "requests"],
        "answered_requests": count,
        "min_response_time": _seconds(low),
        "max_response_time": _seconds(high),
        "average_response_time": _seconds(average),
        "first_request": _iso(first),
        "last_request": _iso(last),
        "rate_limit": format_rate_limit(key.rate_limit, key.rate_period),
        "rate_limit_window": {"used": used, "remaining": window.remaining,
                              "resets_at": _iso(window.reset_at)},
        "usage_percent": None if used is None else round(100 * used / window.limit, 1),
    })


def _seconds(ms):
    return None if ms is None else round(ms / 1000, 4)


def _iso(epoch):
    return None if epoch is None else datetime.datetime.fromtimestamp(
        epoch, datetime.timezone.utc).isoformat()


@bp.get("/api/admin/stats")
def all_stats():
    """Every key's usage; admin keys only."""
    key = gateway.current_key()
    auth.require_admin(key, "/api/admin/stats")
    since = since_arg()
    keys = stats.usage(since, "key")
    return jsonify({**_summary(since), "keys": keys,
                    "gpu_seconds_by_key": {r["key_prefix"] or "(no key)": r["gpu_seconds"]
                                           for r in keys if r["gpu_seconds"]}})
