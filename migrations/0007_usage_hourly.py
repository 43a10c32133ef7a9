"""Coarser usage roll-ups for the dashboard, filled from the hourly one they summarize.

usage_hourly_model (per hour and model) and usage_daily_key (per UTC day and key) let a
page over 30 days read thousands of rows, not the hundreds of thousands usage_hourly
holds by then; usage_hourly gets an index on (key_id, hour) for one key's page.
"""
from peewee import BigIntegerField, CompositeKey, IntegerField, Model

BUCKETS = ("25", "50", "100", "250", "500", "1000", "2500", "5000", "10000", "30000", "60000",
           "120000", "300000", "inf")
SUMS = ("requests", "errors", "refusals", "aborted", "prompt_tokens", "completion_tokens",
        "bytes", "latency_ms_sum", "ttfb_ms_sum", "ttfb_count", "eval_ms_sum", "eval_tokens",
        *(f"latency_le_{b}" for b in BUCKETS), *(f"ttfb_le_{b}" for b in BUCKETS))
BIG = {"prompt_tokens", "completion_tokens", "bytes", "latency_ms_sum", "ttfb_ms_sum",
       "eval_ms_sum", "eval_tokens"}
INDEX = "usage_hourly_key_id_hour"


def _table(db, name, time_column, id_column):
    """A roll-up table as it is at this migration: (time, id) and the sums."""
    meta = type("Meta", (), {"database": db, "table_name": name,
                             "primary_key": CompositeKey(time_column, id_column)})
    columns = {time_column: BigIntegerField(), id_column: IntegerField()}
    columns.update({c: BigIntegerField(default=0) if c in BIG else IntegerField(default=0)
                    for c in SUMS})
    return type(name, (Model,), {"Meta": meta, **columns})


def _tables(db):
    return [_table(db, "usage_hourly_model", "hour", "model_id"),
            _table(db, "usage_daily_key", "day", "key_id")]


def up(migrator, db):
    db.create_tables(_tables(db))
    db.execute_sql(f'CREATE INDEX "{INDEX}" ON "usage_hourly" ("key_id", "hour")')
    fill(db)


def fill(db):
    """Sum what usage_hourly holds into the two new roll-ups (also bench/ui_pages.py's)."""
    columns = ", ".join(f'"{c}"' for c in SUMS)
    sums = ", ".join(f'SUM("{c}")' for c in SUMS)
    db.execute_sql(f'INSERT INTO "usage_hourly_model" ("hour", "model_id", {columns}) '
                   f'SELECT "hour", "model_id", {sums} FROM "usage_hourly" '
                   'GROUP BY "hour", "model_id"')
    db.execute_sql(f'INSERT INTO "usage_daily_key" ("day", "key_id", {columns}) '
                   f'SELECT "hour" / 86400 * 86400, "key_id", {sums} FROM "usage_hourly" '
                   'GROUP BY "hour" / 86400 * 86400, "key_id"')


def down(migrator, db):
    db.execute_sql(f'DROP INDEX IF EXISTS "{INDEX}"')
    db.drop_tables(_tables(db))
