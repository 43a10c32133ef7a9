"""The dashboard's time series: requests, tokens, error and refusal rates, latency.

Ranges of a day or more read roll-ups: everyone's charts the one per hour and model,
a key's the hourly one through its (key_id, hour) index, the table of keys the one per
day and key; a page over 30 days of millions of requests sums a few thousand rows. The last hour is
drawn in five-minute steps from the per-request rows of that hour alone (the `at`
index keeps that read small). Times are epoch seconds; the browser shows them in its
own time zone.
"""
import collections
import time

from peewee import fn

from app.accounting import histogram
from app.accounting.stats import gpu_by_upstream, histograms, percentiles, summarize
from app.accounting.usage import FRACTIONAL, LATENCY, SUM_COLUMNS, TTFB, _bucket
from app.store.models import (
    ApiKey,
    UsageDailyKey,
    UsageHistogram,
    UsageHourly,
    UsageHourlyModel,
    UsageLabel,
    UsageRecord,
)

RANGES = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
# Ranges whose percentile lines are drawn from the fine histograms hour by hour. Longer
# ones read too many rows for that (a month: a million); their lines come from the
# coarse columns (interpolated, the shape only) while the figures printed stay within 2 %.
FINE_LINES = {"1h", "24h"}
DEFAULT_RANGE = "24h"


def range_name(text):
    return text if text in RANGES else DEFAULT_RANGE


def series(name, key_id=None, now=None):
    """Everything the overview's and a key's charts draw for range `name`, as plain JSON."""
    now = time.time() if now is None else now
    if name == "1h":
        step, start = 300, int((now - 3600) // 300 * 300)
        sums, counts = _from_requests(start, key_id)
        hourly = {}
    else:
        step, start = 3600, int((now - RANGES[name]) // 3600 * 3600)
        sums = _from_rollup(start, key_id)
        hourly = _hourly_counts(start, key_id) if name in FINE_LINES else {}
        counts = None
    model_counts, total_counts = _range_counts(start, key_id, counts)
    times = list(range(start, int(now) + 1, step))
    labels = label_names({model for _, model in sums})
    models = sorted({labels.get(model, "(none)") for _, model in sums})
    per_model = {kind: {m: [0] * len(times) for m in models}
                 for kind in ("requests", "tokens", "gpu_seconds")}
    by_time, by_model = {}, {}
    time_counts = collections.defaultdict(collections.Counter)
    for (at, model), row in sums.items():
        i = (at - start) // step
        if not 0 <= i < len(times):
            continue
        name_ = labels.get(model, "(none)")
        per_model["requests"][name_][i] += row[REQUESTS]
        per_model["tokens"][name_][i] += row[PROMPT] + row[COMPLETION]
        per_model["gpu_seconds"][name_][i] = round(per_model["gpu_seconds"][name_][i]
                                                   + row[GPU], 3)
        by_time[i] = _add(by_time.get(i), row)
        by_model[name_] = _add(by_model.get(name_), row)
        if counts is not None:  # the last hour's, per step and model
            time_counts[i].update(counts.get((at, model), {}))
    for at, found in hourly.items():
        time_counts[(at - start) // step] = found
    result = {"step": step, "times": times, "models": models, **per_model,
              "error_rate": [], "refusal_rate": [], "latency_p50": [], "latency_p95": [],
              "ttfb_p50": [], "ttfb_p95": []}
    empty = [0] * len(SUM_COLUMNS)
    for i in range(len(times)):
        row = by_time.get(i, empty)
        result["error_rate"].append(_percent(row[ERRORS], row[REQUESTS]))
        result["refusal_rate"].append(_percent(row[REFUSED], row[REQUESTS]))
        drawn = percentiles(dict(zip(SUM_COLUMNS, row, strict=True)), time_counts.get(i))
        for kind in ("latency", "ttfb"):
            result[f"{kind}_p50"].append(drawn[f"{kind}_ms_p50"])
            result[f"{kind}_p95"].append(drawn[f"{kind}_ms_p95"])
    total = None
    for row in by_time.values():
        total = _add(total, row)
    model_counts = {labels.get(model, "(none)"): found for model, found in model_counts.items()}
    result["totals"] = _totals(total or empty, total_counts)
    result["by_model"] = sorted(({"model": model, **_totals(row, model_counts.get(model))}
                                 for model, row in by_model.items()),
                                key=lambda r: -r["requests"])
    return result


COLUMN = {name: i for i, name in enumerate(SUM_COLUMNS)}
REQUESTS, ERRORS, REFUSED = COLUMN["requests"], COLUMN["errors"], COLUMN["refusals"]
PROMPT, COMPLETION = COLUMN["prompt_tokens"], COLUMN["completion_tokens"]
GPU = COLUMN["gpu_seconds"]


def _numbers(sums):
    """A roll-up row's sums as numbers: GPU seconds keep their fractions."""
    return [float(v or 0) if c in FRACTIONAL else int(v or 0)
            for c, v in zip(SUM_COLUMNS, sums, strict=True)]


def _add(total, row):
    """Sums are lists in SUM_COLUMNS order: adding thousands of them stays cheap."""
    return list(row) if total is None else [a + b for a, b in zip(total, row, strict=True)]


def _percent(part, whole):
    return round(100 * part / whole, 2) if whole else None


def _totals(row, counts):
    summary = summarize(dict(zip(SUM_COLUMNS, row, strict=True)), counts)
    return {**summary, "tokens": summary["prompt_tokens"] + summary["completion_tokens"],
            "error_rate": _percent(summary["errors"], summary["requests"]),
            "refusal_rate": _percent(summary["refused"], summary["requests"])}


def _from_rollup(start, key_id):
    """{(hour, model id): sums in SUM_COLUMNS order} since `start`.

    Everyone's from the roll-up per hour and model; one key's from the hourly roll-up,
    through its (key_id, hour) index.
    """
    table = UsageHourlyModel if key_id is None else UsageHourly
    query = (table.select(table.hour, table.model_id, *_sums(table))
             .where(table.hour >= start).group_by(table.hour, table.model_id))
    if key_id is not None:
        query = query.where(UsageHourly.key_id == key_id)
    return {(int(at), int(model or 0)): _numbers(sums) for at, model, *sums in query.tuples()}


def _hourly_counts(start, key_id):
    """{hour: fine histogram} since `start`: the lines of a day's chart, all models'.

    The lines are per hour: the hours' buckets are added up over the models in SQL.
    """
    return {hour: found for (hour,), found in histograms(
        (UsageHistogram.time,), [("hourly_model" if key_id is None else "hourly", start, None)],
        key_id=key_id).items()}


def _range_counts(start, key_id, counts=None):
    """({model id: fine histogram}, the total's) since `start`: the figures printed.

    Whole days from the grain per day (and model, or key), the hours before the first
    of them from the hourly ones, added up in the database (app/stats.histograms). A
    key's page prints no figure per model: its models' histograms are left out.
    counts: the last hour's {(step, model id): histogram} (from its rows), summed here.
    """
    if counts is not None:
        models, total = collections.defaultdict(collections.Counter), collections.Counter()
        for (_, model), found in counts.items():
            models[model].update(found)
            total.update(found)
        return ({} if key_id is not None else models), total
    if key_id is not None:
        parts = _day_parts(start, "hourly", "daily_key")
        return {}, histograms((), parts, key_id=key_id).get((), collections.Counter())
    parts = _day_parts(start, "hourly_model", "daily_model")
    found = histograms((UsageHistogram.model_id,), parts, total=True)
    total = found.pop((), collections.Counter())
    return {model: counts for (model,), counts in found.items()}, total


def _day_parts(start, hourly, daily):
    """histograms()' parts for [start, now): whole days from grain `daily`, the hours
    before the first of them from `hourly`; when those hours are most of a day, that
    day less the hours before `start` instead: fewer hourly rows to read (a 24-hour
    range starting at 04:00 reads 4 hours, not 20). The daily grain is the sum of the
    hourly one, written in the same transaction (app/accounting/usage.py) and rebuilt from it.
    """
    first_day = -(-start // 86400) * 86400
    if first_day - start > 43200:
        day = first_day - 86400
        return [(daily, day, None), (hourly, day, start, -1)]
    return [(hourly, start, first_day), (daily, first_day, None)]


def _sums(table):
    return [fn.SUM(getattr(table, c)).alias(c) for c in SUM_COLUMNS]


def by_upstream(name, now=None):
    """[{upstream, gpu_seconds}] over range `name`, most first: which GPU is busy."""
    now = time.time() if now is None else now
    found = gpu_by_upstream(int((now - RANGES[name]) // 3600 * 3600))
    return [{"upstream": name_, "gpu_seconds": seconds}
            for name_, seconds in sorted(found.items(), key=lambda item: -item[1])]


def by_key(name, now=None, limit=None):
    """Each key's usage over range `name`, most tokens first: who uses the GPU.

    Whole days come from the daily roll-up per key, the hours before the first of them
    from the hourly roll-up: exact to the hour, and never more than a day of hourly rows.
    `limit`: only the first so many keys (their histograms are most of the reading).
    """
    now = time.time() if now is None else now
    start = int((now - RANGES[name]) // 3600 * 3600)
    first_day = -(-start // 86400) * 86400
    parts = [UsageHourly.select(UsageHourly.key_id, *_sums(UsageHourly))
             .where((UsageHourly.hour >= start) & (UsageHourly.hour < first_day))
             .group_by(UsageHourly.key_id),
             UsageDailyKey.select(UsageDailyKey.key_id, *_sums(UsageDailyKey))
             .where(UsageDailyKey.day >= first_day).group_by(UsageDailyKey.key_id)]
    keys = {}
    for query in parts:
        for key_id, *sums in query.tuples():
            keys[key_id] = _add(keys.get(key_id), _numbers(sums))
    shown = sorted(keys, key=lambda k: (-keys[k][PROMPT] - keys[k][COMPLETION],
                                        -keys[k][REQUESTS]))[:limit]
    counts = histograms((UsageHistogram.key_id,), _day_parts(start, "hourly", "daily_key"),
                        [k or 0 for k in shown])
    rows = [{"key_id": key_id or None, **_totals(keys[key_id], counts.get((key_id or 0,)))}
            for key_id in shown]
    names = {k.id: k for k in ApiKey.select(ApiKey.id, ApiKey.prefix, ApiKey.name)
             .where(ApiKey.id.in_([r["key_id"] for r in rows if r["key_id"]]))}
    for row in rows:
        key = names.get(row["key_id"])
        row.update(key_prefix=key and key.prefix, key_name=key and key.name)
    return sorted(rows, key=lambda r: (-r["tokens"], -r["requests"]))


def _from_requests(start, key_id, step=300):
    """The same sums and histograms, in `step`-second steps, from the per-request rows."""
    query = (UsageRecord.select(UsageRecord.at, UsageRecord.model_id, UsageRecord.status,
                                UsageRecord.refusal, UsageRecord.prompt_tokens,
                                UsageRecord.completion_tokens, UsageRecord.latency_ms,
                                UsageRecord.ttfb_ms, UsageRecord.gpu_seconds,
                                UsageRecord.load_seconds)
             .where(UsageRecord.at >= start))
    if key_id is not None:
        query = query.where(UsageRecord.key_id == key_id)
    found = collections.defaultdict(collections.Counter)
    counts = collections.defaultdict(collections.Counter)
    for (at, model, status, refusal, prompt, completion, latency, ttfb, gpu,
         load) in query.tuples():
        group = (int(at // step * step), model or 0)
        sums = found[group]
        sums["requests"] += 1
        sums["refusals"] += refusal != 0
        sums["errors"] += refusal == 0 and status >= 400
        sums["prompt_tokens"] += prompt or 0
        sums["completion_tokens"] += completion or 0
        sums["latency_ms_sum"] += latency
        sums["gpu_seconds"] += gpu or 0.0
        sums["load_seconds"] += load or 0.0
        sums[_bucket("latency", latency)] += 1
        counts[group][(LATENCY, histogram.bucket(latency))] += 1
        if ttfb is not None:
            sums["ttfb_ms_sum"] += ttfb
            sums["ttfb_count"] += 1
            sums[_bucket("ttfb", ttfb)] += 1
            counts[group][(TTFB, histogram.bucket(ttfb))] += 1
    return {group: [sums[c] for c in SUM_COLUMNS] for group, sums in found.items()}, counts


def label_names(ids):
    """{label id: name} for usage rows' endpoint and model ids (0 or None: no label)."""
    ids = [i for i in ids if i]
    if not ids:
        return {}
    return {label.id: label.name for label in UsageLabel.select().where(UsageLabel.id.in_(ids))}
