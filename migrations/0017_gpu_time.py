"""GPU time (app/accounting/gpu.py): per request, in the roll-ups, and GPU quotas per key.

usage_record gets gpu_seconds and load_seconds (NULL: no local GPU used, or a row an
older instance wrote); usage_hourly, usage_hourly_model and usage_daily_key get their
sums (0 by default, so older instances' inserts still work, adding no GPU time); api_key
gets gpu_quota and gpu_period (NULL: no GPU quota, all older instances know); gpu_usage
and gpu_reservation hold what app/admission/gpu_quota.py counts. Nothing is filled in:
requests before this migration have no GPU time to sum. Older instances read none of it.
"""
from peewee import BigIntegerField, CharField, CompositeKey, DoubleField, IntegerField, Model

ROLLUPS = ("usage_hourly", "usage_hourly_model", "usage_daily_key")
SUMS = ("gpu_seconds", "load_seconds")


def _tables(db):
    class GpuUsage(Model):
        key_id = IntegerField()
        period_start = BigIntegerField()
        seconds = DoubleField(default=0)

        class Meta:
            database = db
            table_name = "gpu_usage"
            primary_key = CompositeKey("key_id", "period_start")

    class GpuReservation(Model):
        key_id = IntegerField()
        period_start = BigIntegerField()
        seconds = DoubleField()
        holder = CharField(max_length=128)
        expires_at = DoubleField()

        class Meta:
            database = db
            table_name = "gpu_reservation"
            indexes = ((("key_id", "period_start"), False),)

    return [GpuUsage, GpuReservation]


def up(migrator, db):
    db.create_tables(_tables(db))
    double = "DOUBLE PRECISION" if db.param == "%s" else "REAL"
    for table in ROLLUPS:  # NOT NULL with a default: both databases add it without a rewrite
        for column in SUMS:
            db.execute_sql(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {double} '
                           "NOT NULL DEFAULT 0")
    migrator.migrate(
        migrator.add_column("usage_record", "gpu_seconds", DoubleField(null=True)),
        migrator.add_column("usage_record", "load_seconds", DoubleField(null=True)),
        migrator.add_column("api_key", "gpu_quota", IntegerField(null=True)),
        migrator.add_column("api_key", "gpu_period", CharField(max_length=8, null=True)),
    )


def down(migrator, db):
    migrator.migrate(
        migrator.drop_column("api_key", "gpu_period"),
        migrator.drop_column("api_key", "gpu_quota"),
        migrator.drop_column("usage_record", "load_seconds"),
        migrator.drop_column("usage_record", "gpu_seconds"),
        *(migrator.drop_column(table, column) for table in ROLLUPS for column in SUMS),
    )
    db.drop_tables(_tables(db))
