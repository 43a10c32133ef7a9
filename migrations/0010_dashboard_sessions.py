"""Dashboard sessions kept on the server, so that sign-out ends them everywhere, and failed
sign-ins per client address, so that every worker and instance throttles them as one.

New tables only: instances of the previous version run on beside them and ignore them.
"""
from peewee import CharField, DoubleField, ForeignKeyField, Model


def _tables(db):
    class ApiKey(Model):  # only what the foreign key needs
        class Meta:
            database = db
            table_name = "api_key"

    class UiSession(Model):
        id = CharField(max_length=64, primary_key=True)
        key = ForeignKeyField(ApiKey, on_delete="CASCADE")
        created_at = DoubleField()
        expires_at = DoubleField(index=True)

        class Meta:
            database = db
            table_name = "ui_session"

    class SigninFailure(Model):
        address = CharField(max_length=64)
        at = DoubleField(index=True)

        class Meta:
            database = db
            table_name = "signin_failure"
            indexes = ((("address", "at"), False),)

    return [UiSession, SigninFailure]


def up(migrator, db):
    db.create_tables(_tables(db))


def down(migrator, db):
    db.drop_tables(_tables(db))
