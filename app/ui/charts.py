"""The dashboard's time series: requests, tokens, error and refusal rates, latency.

Ranges of a day or more read the hourly roll-up (UsageHourly), so a page over 30 days
of millions of requests sums a few hundred thousand rows at most. The last hour is
drawn in five-minute steps from the per-request rows of that hour alone (the `at`
index keeps that read small). Times are epoch seconds; the browser shows them in its
own time zone.
"""
import collections
import time

from peewee import fn

from app.models import UsageHourly, UsageLabel, UsageRecord
from app.stats import percentile, summarize
from app.usage import LATENCY_COLUMNS, SUM_COLUMNS, TTFB_COLUMNS, _bucket

RANGES = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
DEFAULT_RANGE = "24h"


def range_name(text):
    return text if text in RANGES else DEFAULT_RANGE


def series(name, key_id=None, now=None):
    """Everything the overview's and a key's charts draw for range `name`, as plain JSON."""
    now = time.time() if now is None else now
    if name == "1h":
        step, start = 300, int((now - 3600) // 300 * 300)
        sums = _from_requests(start, key_id)
    else:
        step, start = 3600, int((now - RANGES[name]) // 3600 * 3600)
        sums = _from_rollup(start, key_id)
    times = list(range(start, int(now) + 1, step))
    labels = _label_names({model for _, model in sums})
    models = sorted({labels.get(model, "(none)") for _, model in sums})
    by_time = collections.defaultdict(collections.Counter)
    per_model = {kind: {m: [0] * len(times) for m in models} for kind in ("requests", "tokens")}
    for (at, model), row in sums.items():
        i = (at - start) // step
        if not 0 <= i < len(times):
            continue
        name_ = labels.get(model, "(none)")
        per_model["requests"][name_][i] += row["requests"]
        per_model["tokens"][name_][i] += row["prompt_tokens"] + row["completion_tokens"]
        by_time[i].update(row)
    result = {"step": step, "times": times, "models": models, **per_model,
              "error_rate": [], "refusal_rate": [], "latency_p50": [], "latency_p95": [],
              "ttfb_p50": [], "ttfb_p95": []}
    for i in range(len(times)):
        row = by_time.get(i, {})
        requests = row.get("requests", 0)
        result["error_rate"].append(_percent(row.get("errors", 0), requests))
        result["refusal_rate"].append(_percent(row.get("refusals", 0), requests))
        latency = [row.get(c, 0) for c in LATENCY_COLUMNS]
        ttfb = [row.get(c, 0) for c in TTFB_COLUMNS]
        result["latency_p50"].append(percentile(latency, 0.5))
        result["latency_p95"].append(percentile(latency, 0.95))
        result["ttfb_p50"].append(percentile(ttfb, 0.5))
        result["ttfb_p95"].append(percentile(ttfb, 0.95))
    total = collections.Counter()
    for row in by_time.values():
        total.update(row)
    result["totals"] = _totals(total)
    result["by_model"] = [{"model": labels.get(model, "(none)"), **_totals(row)}
                          for model, row in _by_model(sums).items()]
    result["by_model"].sort(key=lambda r: -r["requests"])
    return result


def _percent(part, whole):
    return round(100 * part / whole, 2) if whole else None


def _totals(sums):
    row = summarize(sums)
    ttfb = [int(sums.get(c) or 0) for c in TTFB_COLUMNS]
    return {**row, "tokens": row["prompt_tokens"] + row["completion_tokens"],
            "ttfb_ms_p95": percentile(ttfb, 0.95),
            "error_rate": _percent(row["errors"], row["requests"]),
            "refusal_rate": _percent(row["refused"], row["requests"])}


def _by_model(sums):
    models = collections.defaultdict(collections.Counter)
    for (_, model), row in sums.items():
        models[model].update(row)
    return models


def _from_rollup(start, key_id):
    """{(hour, model id): {column: sum}} from the hourly roll-up since `start`."""
    columns = [fn.SUM(getattr(UsageHourly, c)).alias(c) for c in SUM_COLUMNS]
    query = (UsageHourly.select(UsageHourly.hour, UsageHourly.model_id, *columns)
             .where(UsageHourly.hour >= start)
             .group_by(UsageHourly.hour, UsageHourly.model_id))
    if key_id is not None:
        query = query.where(UsageHourly.key_id == key_id)
    found = {}
    for row in query.dicts():
        at, model = int(row.pop("hour")), int(row.pop("model_id") or 0)
        found[(at, model)] = {c: int(v or 0) for c, v in row.items()}
    return found


def _from_requests(start, key_id, step=300):
    """The same sums, in `step`-second buckets, from the per-request rows since `start`."""
    query = (UsageRecord.select(UsageRecord.at, UsageRecord.model_id, UsageRecord.status,
                                UsageRecord.refusal, UsageRecord.prompt_tokens,
                                UsageRecord.completion_tokens, UsageRecord.latency_ms,
                                UsageRecord.ttfb_ms)
             .where(UsageRecord.at >= start))
    if key_id is not None:
        query = query.where(UsageRecord.key_id == key_id)
    found = collections.defaultdict(collections.Counter)
    for at, model, status, refusal, prompt, completion, latency, ttfb in query.tuples():
        sums = found[(int(at // step * step), model or 0)]
        sums["requests"] += 1
        sums["refusals"] += refusal != 0
        sums["errors"] += refusal == 0 and status >= 400
        sums["prompt_tokens"] += prompt or 0
        sums["completion_tokens"] += completion or 0
        sums["latency_ms_sum"] += latency
        sums[_bucket("latency", latency)] += 1
        if ttfb is not None:
            sums[_bucket("ttfb", ttfb)] += 1
    return found


def _label_names(ids):
    ids = [i for i in ids if i]
    if not ids:
        return {}
    return {label.id: label.name for label in UsageLabel.select().where(UsageLabel.id.in_(ids))}
