"""The audit log: every admin action, from HTTP or the shell (app/store/audit.py)."""
from peewee import CharField, DateTimeField, Model, TextField


def _tables(db):
    class AuditEntry(Model):
        at = DateTimeField(index=True)
        actor = CharField(max_length=200)
        via = CharField(max_length=16)
        source = CharField(max_length=255)
        action = CharField(max_length=64)
        target = CharField(max_length=255, null=True)
        details = TextField(null=True)

        class Meta:
            database = db
            table_name = "audit_entry"

    return [AuditEntry]


def up(migrator, db):
    db.create_tables(_tables(db))


def down(migrator, db):
    db.drop_tables(_tables(db))
