"""Token quota reservations (app/admission/quota.py), and usage rows whose prompt count is an estimate.

Old instances read neither: they keep checking quotas against charged tokens alone, and
write usage rows without prompt_estimated (NULL).
"""
from peewee import BigIntegerField, BooleanField, CharField, DoubleField, IntegerField, Model


def _tables(db):
    class QuotaReservation(Model):
        key_id = IntegerField()
        period_start = BigIntegerField()
        tokens = BigIntegerField()
        holder = CharField(max_length=128)
        expires_at = DoubleField()

        class Meta:
            database = db
            table_name = "quota_reservation"
            indexes = ((("key_id", "period_start"), False),)

    return [QuotaReservation]


def up(migrator, db):
    db.create_tables(_tables(db))
    migrator.migrate(migrator.add_column("usage_record", "prompt_estimated",
                                         BooleanField(null=True)))


def down(migrator, db):
    migrator.migrate(migrator.drop_column("usage_record", "prompt_estimated"))
    db.drop_tables(_tables(db))
