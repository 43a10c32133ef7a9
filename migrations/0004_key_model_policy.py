"""Per-key model policy: caps on context size and answer length, and keep_alive."""
from peewee import BooleanField, IntegerField


def up(migrator, db):
    migrator.migrate(
        migrator.add_column("api_key", "max_ctx", IntegerField(null=True)),
        migrator.add_column("api_key", "max_predict", IntegerField(null=True)),
        migrator.add_column("api_key", "allow_keep_alive", BooleanField(default=True)),
    )


def down(migrator, db):
    migrator.migrate(
        migrator.drop_column("api_key", "allow_keep_alive"),
        migrator.drop_column("api_key", "max_predict"),
        migrator.drop_column("api_key", "max_ctx"),
    )
