"""The dashboard's roll-ups: kept with the hourly one, filled by their migration, and the
charts and tables read from them agree with the statistics the API reports.
"""
import random
import time

import pytest

from app.accounting import stats
from app.accounting.usage import SUM_COLUMNS, Record, UsageWriter
from app.store import db as database
from app.store.models import UsageDailyKey, UsageHourly, UsageHourlyModel
from app.ui import charts

NOW = time.time()


def records(count=600, days=40, seed=5):
    """Requests over the last `days` days from three keys on three models, some refused."""
    rng = random.Random(seed)
    made = []
    for _ in range(count):
        refused = rng.random() < 0.1
        made.append(Record(
            at=NOW - rng.random() * days * 86400, endpoint=rng.choice(["/api/chat",
                                                                       "/api/generate"]),
            status=429 if refused else rng.choice([200, 200, 200, 500]),
            latency_ms=rng.randint(1, 90_000), key_id=rng.choice([1, 2, 3, None]),
            model=rng.choice(["llama3.2:latest", "qwen2.5:7b", None]),
            refusal="rate" if refused else None, prompt_tokens=rng.randint(1, 50),
            completion_tokens=None if refused else rng.randint(1, 500),
            ttfb_ms=None if refused else rng.randint(1, 5000), eval_ms=rng.randint(0, 900)))
    return made


@pytest.fixture
def written(migrated):
    writer = UsageWriter()
    for record in records():
        writer.add(record)
    assert writer.write_pending()
    writer.stop()


def regrouped(group):
    """usage_hourly summed by another grouping, as {group: {column: sum}}."""
    found = {}
    for row in UsageHourly.select().dicts():
        key = group(row)
        sums = found.setdefault(key, dict.fromkeys(SUM_COLUMNS, 0))
        for column in SUM_COLUMNS:
            sums[column] += row[column]
    return found


def table(model, *group):
    return {tuple(row[g] for g in group): {c: row[c] for c in SUM_COLUMNS}
            for row in model.select().dicts()}


def expected():
    return (regrouped(lambda r: (r["hour"], r["model_id"])),
            regrouped(lambda r: (r["hour"] // 86400 * 86400, r["key_id"])))


def test_the_writer_keeps_the_coarser_rollups_with_the_hourly_one(written):
    by_model, by_key = expected()
    assert table(UsageHourlyModel, "hour", "model_id") == by_model
    assert table(UsageDailyKey, "day", "key_id") == by_key
    assert sum(s["requests"] for s in by_model.values()) == 600


def test_the_migration_fills_them_from_the_hourly_rollup(written, migrated):
    by_model, by_key = expected()
    database.downgrade(migrated, "0007_usage_hourly")
    assert "usage_daily_key" not in migrated.get_tables()
    assert database.upgrade(migrated)[0] == "0007_usage_hourly"
    assert table(UsageHourlyModel, "hour", "model_id") == by_model
    assert table(UsageDailyKey, "day", "key_id") == by_key


@pytest.mark.parametrize("span", ["24h", "7d", "30d"])
def test_charts_and_the_table_of_keys_agree_with_the_statistics(written, span):
    since = NOW - charts.RANGES[span]
    drawn = charts.series(span, now=NOW)
    assert {k: drawn["totals"][k] for k in ("requests", "errors", "refused", "prompt_tokens")} \
        == {k: v for k, v in stats.totals(stats.usage(since, "model")).items()
            if k in ("requests", "errors", "refused", "prompt_tokens")}
    assert sum(sum(line) for line in drawn["requests"].values()) == drawn["totals"]["requests"]
    assert len(drawn["times"]) == charts.RANGES[span] // 3600 + 1
    reported = {row["key_id"]: (row["requests"], row["prompt_tokens"] + row["completion_tokens"])
                for row in stats.usage(since, "key")}
    assert {row["key_id"]: (row["requests"], row["tokens"])
            for row in charts.by_key(span, now=NOW)} == reported
    for key_id in (1, 2):
        mine = charts.series(span, key_id, now=NOW)["totals"]["requests"]
        assert mine == stats.totals(stats.usage(since, "model", key_id))["requests"]


def test_the_last_hour_is_drawn_in_five_minute_steps_from_the_requests(migrated):
    writer = UsageWriter()
    for minutes in (1, 2, 7, 50):
        writer.add(Record(at=NOW - minutes * 60, endpoint="/api/chat", status=200,
                          latency_ms=120, key_id=1, model="llama3.2:latest", prompt_tokens=3,
                          completion_tokens=4, ttfb_ms=40))
    writer.add(Record(at=NOW - 120, endpoint="/api/chat", status=429, latency_ms=1, key_id=2,
                      refusal="rate"))
    assert writer.write_pending()
    writer.stop()
    drawn = charts.series("1h", now=NOW)
    assert drawn["step"] == 300 and drawn["totals"]["requests"] == 5
    assert sum(drawn["requests"]["llama3.2:latest"]) == 4
    assert sum(drawn["tokens"]["llama3.2:latest"]) == 28
    assert drawn["totals"]["refusal_rate"] == 20.0
    assert 100 <= drawn["totals"]["latency_ms_p50"] <= 250
    assert charts.series("1h", 2, now=NOW)["totals"]["requests"] == 1
