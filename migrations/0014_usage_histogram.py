"""Fine latency histograms for the roll-ups, sparse, rebuilt from the per-request rows kept.

usage_histogram holds `(grain, time, key, model, endpoint, metric, bucket) → count` for
the three roll-ups and per day and model (app/accounting/histogram.py says what the buckets are).
One table with a grain column, not one per roll-up: the writer adds a batch's buckets of
every grain in one upsert (the writer's transaction holds a SQLite worker; a statement
more per batch is what it costs), and statistics read them with one query shape. The
columns a grain does not group by are 0. A few hundred bucket columns on the roll-ups
instead would make the batched upsert's statement exceed SQLite's 32,766 variables. The
grain per day and model makes the overview's figures over 30 days read some 100,000
rows, not 24 times that.

The rebuild goes a day at a time (memory stays small whatever the history): each hourly
group whose per-request rows are all still there gets their exact buckets; a group whose
rows were pruned (`ollama-gw usage prune`) gets its coarse buckets (the usage_hourly
columns, each counted at its middle) and an APPROXIMATE count, which statistics show as
approximate. The coarser grains are sums of the hourly groups. Old instances keep
writing only the coarse columns during a rolling upgrade; statistics notice hours whose
histogram counts fall short of their requests and fall back for them (app/accounting/stats.py).
"""
import collections

from peewee import BigIntegerField, CompositeKey, IntegerField, Model, SmallIntegerField

from app.accounting import histogram

COARSE = (25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000)
GRAINS = {"hourly": 1, "hourly_model": 2, "daily_key": 3, "daily_model": 4}
LATENCY, TTFB = 1, 2
KEY = ("grain", "time", "key_id", "model_id", "endpoint_id", "metric", "bucket")
INSERT_ROWS = 2000  # 16,000 variables a statement: under SQLite's 32,766


def _tables(db):
    class UsageHistogram(Model):
        grain = SmallIntegerField()
        time = BigIntegerField()
        key_id = IntegerField()
        model_id = IntegerField()
        endpoint_id = IntegerField()
        metric = SmallIntegerField()
        bucket = IntegerField()
        count = BigIntegerField(default=0)

        class Meta:
            database = db
            table_name = "usage_histogram"
            primary_key = CompositeKey(*KEY)
            indexes = ((("grain", "key_id", "time"), False),)

    return [UsageHistogram]


# Not one transaction: on SQLite that would hold the write lock for the whole rebuild
# (about 30 s for a million requests), and gateways of the previous release, still
# serving during a rolling upgrade, would fail their writes after their 10 s lock wait.
# The table is created, then each day is rebuilt in a transaction of its own.
atomic = False


def up(migrator, db):
    with db.atomic():
        db.create_tables(_tables(db))
    rebuild(db)


def down(migrator, db):
    db.drop_tables(_tables(db))


def _coarse_buckets(prefix):
    """(column, bucket its counts are put in): each coarse bucket's middle, as app/accounting/stats.py
    interpolated it; the open-ended last one at its lower bound."""
    bounds = (0, *COARSE)
    middles = [(low + high) / 2 for low, high in zip(bounds, bounds[1:], strict=False)]
    return ([(f"{prefix}_le_{high}", histogram.bucket(round(mid)))
             for high, mid in zip(COARSE, middles, strict=True)]
            + [(f"{prefix}_le_inf", histogram.bucket(COARSE[-1] + 1))])


def rebuild(db):
    """Fill usage_histogram from usage_record, or usage_hourly's coarse columns where pruned."""
    days = [int(d) for (d,) in db.execute_sql(
        'SELECT DISTINCT "hour" / 86400 * 86400 FROM "usage_hourly" ORDER BY 1').fetchall()]
    coarse = _coarse_buckets("latency") + _coarse_buckets("ttfb")
    for day in days:
        with db.atomic():
            _rebuild_day(db, day, coarse)


def _rebuild_day(db, day, coarse):
    """One day's rows, anew: a rebuild cut short and run again counts nothing twice."""
    db.execute_sql('DELETE FROM "usage_histogram" WHERE "time" >= %s AND "time" < %s'
                   .replace("%s", db.param), (day, day + 86400))
    exact = collections.defaultdict(collections.Counter)
    for at, key, model, endpoint, latency, ttfb in db.execute_sql(
            'SELECT "at", "key_id", "model_id", "endpoint_id", "latency_ms", "ttfb_ms" '
            'FROM "usage_record" WHERE "at" >= %s AND "at" < %s'.replace("%s", db.param),
            (day, day + 86400)):
        counts = exact[(int(at // 3600 * 3600), key or 0, model or 0, endpoint)]
        counts["requests"] += 1
        counts[(LATENCY, histogram.bucket(latency))] += 1
        if ttfb is not None:
            counts["ttfb"] += 1
            counts[(TTFB, histogram.bucket(ttfb))] += 1
    columns = [c for c, _ in coarse]
    hourly = {}
    for hour, key, model, endpoint, requests, ttfb_count, *sums in db.execute_sql(
            'SELECT "hour", "key_id", "model_id", "endpoint_id", "requests", "ttfb_count", '
            + ", ".join(f'"{c}"' for c in columns) + ' FROM "usage_hourly" '
            'WHERE "hour" >= %s AND "hour" < %s'.replace("%s", db.param), (day, day + 86400)):
        group = (int(hour), key, model, endpoint)
        found = exact.get(group, collections.Counter())
        if found["requests"] == requests and found["ttfb"] == ttfb_count:
            hourly[group] = found
            continue
        counts = collections.Counter({(LATENCY, histogram.APPROXIMATE): requests,
                                      (TTFB, histogram.APPROXIMATE): ttfb_count})
        for (column, index), amount in zip(coarse, sums, strict=True):
            counts[(LATENCY if column.startswith("latency") else TTFB, index)] += amount
        hourly[group] = counts
    _insert(db, _rows(hourly))


def _rows(hourly):
    grains = ((GRAINS["hourly"], lambda hour, key, model, endpoint: (hour, key, model, endpoint)),
              (GRAINS["hourly_model"], lambda hour, key, model, _: (hour, 0, model, 0)),
              (GRAINS["daily_key"], lambda hour, key, model, _:
               (hour // 86400 * 86400, key, 0, 0)),
              (GRAINS["daily_model"], lambda hour, key, model, _:
               (hour // 86400 * 86400, 0, model, 0)))
    rows = []
    for grain, coarser in grains:
        summed = collections.defaultdict(collections.Counter)
        for group, counts in hourly.items():
            summed[coarser(*group)].update(counts)
        rows += [(grain, *group, *name, count) for group, counts in summed.items()
                 for name, count in counts.items() if isinstance(name, tuple) and count]
    return rows


def _insert(db, rows):
    """Added to what is there (nothing, once the day's rows were deleted)."""
    one = "(" + ", ".join([db.param] * (len(KEY) + 1)) + ")"
    columns = ", ".join(f'"{c}"' for c in (*KEY, "count"))
    key = ", ".join(f'"{c}"' for c in KEY)
    for start in range(0, len(rows), INSERT_ROWS):
        part = rows[start:start + INSERT_ROWS]
        db.execute_sql(f'INSERT INTO "usage_histogram" ({columns}) VALUES '
                       + ", ".join([one] * len(part))
                       + f" ON CONFLICT ({key}) "
                       'DO UPDATE SET "count" = "usage_histogram"."count" + EXCLUDED."count"',
                       [v for row in part for v in row])
