"""Cloud models and web search as a key's permission, and cloud usage recorded apart.

api_key.cloud: 'allow', 'deny', or NULL for the setting cloud_default (app/proxy/cloud.py).
NULL, not a stored 'default': changing the setting reaches every key that was never
given its own value, and a gateway of the previous release, still creating keys during
a rolling upgrade, inserts rows without the column (a NOT NULL column without a
database default would refuse them).

usage_record.cloud: whether the request ran on ollama.com (a cloud model, a web search
tool, the experimental web routes); NULL on rows older instances write, counted as
local. The index serves the rolling 5-hour and 7-day cloud windows (app/accounting/stats.py),
which read per-request rows: the hourly roll-up cannot place a request to the second.
"""
from peewee import BooleanField, CharField

INDEX = "usage_record_cloud_at"  # peewee's name for the index below


def up(migrator, db):
    migrator.migrate(
        migrator.add_column("api_key", "cloud", CharField(max_length=8, null=True)),
        migrator.add_column("usage_record", "cloud", BooleanField(null=True)),
        migrator.add_index("usage_record", ("cloud", "at"), False),
    )


def down(migrator, db):
    migrator.migrate(
        migrator.drop_index("usage_record", INDEX),
        migrator.drop_column("usage_record", "cloud"),
        migrator.drop_column("api_key", "cloud"),
    )
