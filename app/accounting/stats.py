"""Usage statistics, read from the hourly roll-up: fast with millions of requests behind it.

Counts and tokens are exact. Latency and time-to-first-byte percentiles are the nearest
rank within 1.1 % (app/accounting/histogram.py), read from the roll-ups' fine histograms
(usage_histogram). Where those fall short of the requests counted (hours whose rows were
pruned before the histograms existed, hours an older instance wrote during a rolling
upgrade) a percentile comes from the coarse columns instead, interpolated as before, and
its row says "approximate". Time ranges start at a whole hour.
"""
import collections
import time

from peewee import SQL, fn

from app.accounting import histogram
from app.accounting.usage import SUM_COLUMNS
from app.store.models import (
    HISTOGRAM_GRAINS,
    HISTOGRAM_METRICS,
    LATENCY_BUCKETS_MS,
    ApiKey,
    UsageHistogram,
    UsageHourly,
    UsageLabel,
    UsageRecord,
    bucket_columns,
)

# Each percentile statistics report: (field, metric, q, the sum that counts its requests).
PERCENTILES = (("latency_ms_p50", "latency", 0.50, "requests"),
               ("latency_ms_p95", "latency", 0.95, "requests"),
               ("ttfb_ms_p50", "ttfb", 0.50, "ttfb_count"),
               ("ttfb_ms_p95", "ttfb", 0.95, "ttfb_count"))

GROUPS = ("key", "model", "day", "endpoint", "hour")


def usage(since=None, by="key", key_id=None, model=None, until=None):
    """One dict per group (key, model, day, endpoint or hour) over [since, until)."""
    if by not in GROUPS:
        raise ValueError(f"--by must be one of {', '.join(GROUPS)}, not {by!r}")
    group = group_field(UsageHourly, by)
    sums = [fn.SUM(getattr(UsageHourly, c)).alias(c) for c in SUM_COLUMNS]
    query = UsageHourly.select(group.alias("grp"), *sums).group_by(SQL("grp"))
    if since is not None:
        query = query.where(UsageHourly.hour >= int(since // 3600 * 3600))
    if until is not None:
        query = query.where(UsageHourly.hour < until)
    if key_id is not None:
        query = query.where(UsageHourly.key_id == key_id)
    if model is not None:
        label = UsageLabel.get_or_none(UsageLabel.name == model)
        query = query.where(UsageHourly.model_id == (label.id if label else -1))
    # Everyone's by model, hour or day: the grain per hour and model has far fewer rows.
    grain = "hourly_model" if key_id is None and by in ("model", "hour", "day") else "hourly"
    found = histograms((group_field(UsageHistogram, by),), [(grain, since, until)], key_id,
                       model_id=None if model is None else (label.id if label else -1))
    rows = [summarize(row, found.get((int(row["grp"] or 0),)))
            for row in query.order_by(SQL("grp")).dicts()]
    _name_groups(rows, by)
    return rows


def group_field(table, by):
    """The expression `usage --by` groups a roll-up or histogram table's rows by."""
    hour = table.time if table is UsageHistogram else table.hour
    return {"key": table.key_id, "model": table.model_id, "endpoint": table.endpoint_id,
            "hour": hour, "day": hour / 86400 * 86400}[by]


def histograms(group, parts, key_id=None, model_id=None, total=False):
    """{group: Counter{(metric, bucket): count}} over parts [(grain, since, until)…], compact.

    A part may have a fourth item, -1: its counts are taken away (a day less its first
    hours; app/ui/charts.py).

    `group` is a tuple of expressions over UsageHistogram (the group is then a tuple of
    ints; () for one group, named ()). key_id may be a list. The parts' rows are added
    up per group before ranking: a range of whole days and the hours before them is
    one histogram. total: the groups' sum too, under (), from the same reading.

    The database finds the buckets PERCENTILES' ranks fall in (a running sum per group
    and metric) and returns only those, with each metric's total and its APPROXIMATE
    count: a page reading 100,000 bucket rows gets a few per group instead of converting
    every one in Python. What is returned is a histogram with the same total whose
    nearest-rank quantiles at PERCENTILES' q are the same buckets as the full one's
    (see _compact); for other q it means nothing.
    """
    table = UsageHistogram
    names = [f"g{i}" for i in range(len(group))]
    keys = ", ".join([*names, "metric", "bucket"])
    selects, params = [], []
    for grain, since, until, *sign in parts:  # each grouped on its own: no OR of ranges
        amount = fn.SUM(table.count) * sign[0] if sign else fn.SUM(table.count)
        query = (table.select(*[g.alias(n) for g, n in zip(group, names, strict=True)],
                              table.metric, table.bucket, amount.alias("n"))
                 .where(table.grain == HISTOGRAM_GRAINS[grain])
                 .group_by(*group, table.metric, table.bucket))
        if since is not None:
            query = query.where(table.time >= int(since // 3600 * 3600))
        if until is not None:
            query = query.where(table.time < until)
        if isinstance(key_id, list):
            query = query.where(table.key_id.in_(key_id))
        elif key_id is not None:
            query = query.where(table.key_id == key_id)
        if model_id is not None:
            query = query.where(table.model_id == model_id)
        sql, values = query.sql()
        selects.append(sql)
        params += values
    whole = ", ".join(["1", *["0"] * len(names), "metric", "bucket", "SUM(n)"])
    partition = ", ".join(["whole", *names, "metric"])
    counted = "CASE WHEN bucket >= 0 THEN n ELSE 0 END"  # APPROXIMATE (-1) is not a rank
    crossing = " OR ".join(  # ⌈q·total⌉ in integers: (Q·total + 9999) / 10000, Q = 10000·q
        f"(upto >= ({q} * total + 9999) / 10000 AND upto - n < ({q} * total + 9999) / 10000)"
        for q in sorted({round(q * 10000) for _, _, q, _ in PERCENTILES}))
    sql = (f"WITH p AS ({' UNION ALL '.join(selects)}), "
           f"h0 AS (SELECT {keys}, CAST(SUM(n) AS BIGINT) AS n FROM p GROUP BY {keys}), "
           f"h AS (SELECT 0 AS whole, {keys}, n FROM h0"
           + (f" UNION ALL SELECT {whole} FROM h0 GROUP BY metric, bucket" if total else "")
           + "), "
           f"c AS (SELECT {partition}, bucket, n, "
           f"CAST(SUM({counted}) OVER (PARTITION BY {partition} ORDER BY bucket "
           f"ROWS UNBOUNDED PRECEDING) AS BIGINT) AS upto, "
           f"CAST(SUM({counted}) OVER (PARTITION BY {partition}) AS BIGINT) AS total FROM h) "
           f"SELECT {partition}, bucket, n, upto, total FROM c "
           f"WHERE bucket = {histogram.APPROXIMATE} OR {crossing}")
    found = collections.defaultdict(list)
    for is_total, *name, metric, index, n, upto, sum_ in table._meta.database.execute_sql(
            sql, params):
        name = () if is_total else tuple(int(v or 0) for v in name)
        found[(name, metric)].append((int(index), int(n), int(upto), int(sum_)))
    compact = collections.defaultdict(collections.Counter)
    for (name, metric), rows in found.items():
        compact[name].update(_compact(metric, rows))
    return compact


def _compact(metric, rows):
    """{(metric, bucket): count} with the buckets and total of histograms()' rows.

    rows: (bucket, count, running sum, total) of the APPROXIMATE bucket and the buckets
    where each rank r1 ≤ r2… falls. Giving the bucket of r_i the count r_i - r_(i-1)
    (and the last one the rest) puts r_i in that bucket again: the running sum reaches
    r_i there and is r_(j) < r_i before it, r_j the rank of the bucket before.
    """
    counts = collections.Counter()
    total, previous, last = rows[0][3], 0, None  # each row carries its group's total
    ranks = sorted({max(1, -(-round(q * 10000) * total // 10000))
                    for _, _, q, _ in PERCENTILES})
    buckets = []
    for index, n, upto, _ in rows:
        if index == histogram.APPROXIMATE:
            counts[(metric, index)] += n
        else:
            buckets.append((index, upto - n, upto))
    for rank in ranks if total else ():
        index = next(i for i, before, upto in buckets if before < rank <= upto)
        counts[(metric, index)] += rank - previous
        previous, last = rank, index
    if last is not None:
        counts[(metric, last)] += total - previous
    return counts


def percentiles(sums, counts):
    """PERCENTILES' fields of a row, with `approximate` and `out_of_range`.

    out_of_range maps a field to "below" (under 1 ms: the field holds 1) or "above" (over
    10 minutes: it holds 600000). approximate is true when a percentile came from coarse
    buckets: from usage_hourly's columns, or histograms rebuilt from them (pruned rows).
    """
    counts = counts or {}
    row = {"approximate": False, "out_of_range": {}}
    for field, metric, q, counted in PERCENTILES:
        code = HISTOGRAM_METRICS[metric]
        fine = {b: c for (m, b), c in counts.items() if m == code}
        expected = int(sums.get(counted) or 0)
        if sum(c for b, c in fine.items() if b != histogram.APPROXIMATE) == expected:
            found = histogram.percentile(fine, q)
            row["approximate"] |= bool(fine.get(histogram.APPROXIMATE)) and found is not None
            row[field], bound = found or (None, None)
            if bound:
                row["out_of_range"][field] = bound
        else:  # fewer in the fine histogram than requests: an older writer's hours
            row[field] = percentile([int(sums.get(c) or 0) for c in bucket_columns(metric)], q)
            row["approximate"] = True
    return row


def summarize(sums, counts=None):
    """A row of sums as people read it: totals, percentiles, tokens per second.

    counts: the row's fine histograms, {(metric, bucket): count} (see histograms()).
    """
    requests = int(sums.get("requests") or 0)
    eval_seconds = int(sums.get("eval_ms_sum") or 0) / 1000
    row = {
        "group": sums.get("grp"),
        "requests": requests,
        "errors": int(sums.get("errors") or 0),
        "refused": int(sums.get("refusals") or 0),
        "aborted": int(sums.get("aborted") or 0),
        "prompt_tokens": int(sums.get("prompt_tokens") or 0),
        "completion_tokens": int(sums.get("completion_tokens") or 0),
        "bytes": int(sums.get("bytes") or 0),
        "latency_ms_avg": round(int(sums.get("latency_ms_sum") or 0) / requests, 1)
        if requests else None,
        **percentiles(sums, counts),
        "tokens_per_second": round(int(sums.get("eval_tokens") or 0) / eval_seconds, 1)
        if eval_seconds else None,
        "gpu_seconds": round(float(sums.get("gpu_seconds") or 0), 3),
        "load_seconds": round(float(sums.get("load_seconds") or 0), 3),
    }
    return row


def percentile(counts, q):
    """The q-quantile of a coarse histogram (LATENCY_BUCKETS_MS bounds), interpolated.

    Only for hours without fine histograms (see percentiles()); None when empty.
    """
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            low = LATENCY_BUCKETS_MS[i - 1] if i else 0
            if i == len(LATENCY_BUCKETS_MS):
                return float(low)  # the open-ended last bucket: at least this much
            high = LATENCY_BUCKETS_MS[i]
            return round(low + (high - low) * (rank - seen) / count, 1)
        seen += count
    return None


def _name_groups(rows, by):
    """Put names on ids: keys get prefix and name, models and endpoints their name."""
    ids = [row["group"] for row in rows]
    if by == "key":
        keys = {k.id: k for k in ApiKey.select().where(ApiKey.id.in_(ids))}
        for row in rows:
            key = keys.get(row["group"])
            row.update(key_id=row.pop("group") or None, key_prefix=key and key.prefix,
                       key_name=key and key.name)
    elif by in ("model", "endpoint"):
        names = {label.id: label.name for label in UsageLabel.select().where(
            UsageLabel.id.in_(ids))}
        for row in rows:
            row[by] = names.get(row.pop("group"))
    else:
        for row in rows:
            row[by] = time.strftime("%Y-%m-%dT%H:%MZ" if by == "hour" else "%Y-%m-%d",
                                    time.gmtime(row.pop("group")))


def totals(rows):
    """The sums of several summarized rows (tokens, requests; not percentiles)."""
    fields = ("requests", "errors", "refused", "aborted", "prompt_tokens",
              "completion_tokens", "bytes")
    found = {f: sum(row[f] for row in rows) for f in fields}
    found["gpu_seconds"] = round(sum(row.get("gpu_seconds", 0) for row in rows), 3)
    return found


def gpu_by_upstream(since=None, key_id=None):
    """{upstream name: GPU seconds} since `since` (whole hours), read from the per-request
    rows: the roll-ups do not keep upstreams, and `usage prune` forgets these."""
    query = (UsageRecord.select(UsageLabel.name, fn.SUM(UsageRecord.gpu_seconds))
             .join(UsageLabel, on=UsageRecord.upstream_id == UsageLabel.id)
             .where(UsageRecord.gpu_seconds.is_null(False))
             .group_by(UsageLabel.name))
    if since is not None:
        query = query.where(UsageRecord.at >= int(since // 3600 * 3600))
    if key_id is not None:
        query = query.where(UsageRecord.key_id == key_id)
    return {name: round(float(seconds or 0), 3) for name, seconds in query.tuples()}



def estimated_prompt_tokens(since=None, key_id=None):
    """{key id: prompt tokens that are estimates} since `since`: answers that ended
    without Ollama's counts (app/admission/estimate.py). Read from the per-request rows, so
    `usage prune` forgets them; the roll-ups' prompt_tokens include them."""
    query = (UsageRecord.select(UsageRecord.key_id, fn.SUM(UsageRecord.prompt_tokens))
             .where(UsageRecord.prompt_estimated == True)  # noqa: E712 (peewee's SQL)
             .group_by(UsageRecord.key_id))
    if since is not None:
        query = query.where(UsageRecord.at >= int(since // 3600 * 3600))
    if key_id is not None:
        query = query.where(UsageRecord.key_id == key_id)
    return {key: int(tokens or 0) for key, tokens in query.tuples()}


def with_estimates(rows, since=None):
    """`usage --by key` rows with prompt_tokens_estimated, the estimated part of prompt_tokens."""
    estimated = estimated_prompt_tokens(since)
    for row in rows:
        row["prompt_tokens_estimated"] = estimated.get(row["key_id"] or None, 0)
    return rows


def response_times(key_id, since=None):
    """A key's answered requests since `since`: (count, min, max, average) in milliseconds.

    Read from the per-request rows (what `usage prune` keeps); refusals are left out, as
    they never reached Ollama.
    """
    query = (UsageRecord.select(fn.COUNT(UsageRecord.id), fn.MIN(UsageRecord.latency_ms),
                                fn.MAX(UsageRecord.latency_ms), fn.AVG(UsageRecord.latency_ms))
             .where((UsageRecord.key_id == key_id) & (UsageRecord.refusal == 0)))
    if since is not None:
        query = query.where(UsageRecord.at >= since)
    count, low, high, average = query.tuples().get()
    return int(count or 0), low, high, None if average is None else float(average)


def request_span(key_id):
    """(first, last) epoch seconds a key made a request, of the rows kept; (None, None)."""
    return (UsageRecord.select(fn.MIN(UsageRecord.at), fn.MAX(UsageRecord.at))
            .where(UsageRecord.key_id == key_id).tuples().get())


# The windows ollama.com's plans are limited by: cloud use over the last 5 hours and 7 days.
CLOUD_WINDOWS = (("last_5h", 5 * 3600), ("last_7d", 7 * 86400))


def cloud_usage(key_id=None, now=None):
    """{window: {requests, prompt_tokens, completion_tokens, tokens}} of the requests that ran
    on ollama.com (app/proxy/cloud.py) in each rolling window ending `now`, to the second:
    a request is in while it is younger than the window. Read from the per-request rows (an
    index on cloud and time), so `usage prune` shortens what the 7-day window can see."""
    now = time.time() if now is None else now
    found = {}
    for name, seconds in CLOUD_WINDOWS:
        query = (UsageRecord.select(fn.COUNT(UsageRecord.id), fn.SUM(UsageRecord.prompt_tokens),
                                    fn.SUM(UsageRecord.completion_tokens))
                 .where((UsageRecord.cloud == True)  # noqa: E712 (peewee's SQL)
                        & (UsageRecord.at > now - seconds) & (UsageRecord.at <= now)))
        if key_id is not None:
            query = query.where(UsageRecord.key_id == key_id)
        requests, prompt, completion = query.tuples().get()
        prompt, completion = int(prompt or 0), int(completion or 0)
        found[name] = {"requests": int(requests or 0), "prompt_tokens": prompt,
                       "completion_tokens": completion, "tokens": prompt + completion}
    return found


def cloud_by_key(since=None):
    """{key id: {cloud_requests, cloud_tokens}} since `since`, from the per-request rows."""
    query = (UsageRecord.select(UsageRecord.key_id, fn.COUNT(UsageRecord.id),
                                fn.SUM(UsageRecord.prompt_tokens),
                                fn.SUM(UsageRecord.completion_tokens))
             .where(UsageRecord.cloud == True)  # noqa: E712 (peewee's SQL)
             .group_by(UsageRecord.key_id))
    if since is not None:
        query = query.where(UsageRecord.at >= since)
    return {key: {"cloud_requests": int(count), "cloud_tokens": int(prompt or 0) + int(done or 0)}
            for key, count, prompt, done in query.tuples()}
