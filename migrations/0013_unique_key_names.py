"""Key names unique among keys that are not revoked, so that a name finds one key.

Databases may already hold live keys sharing a name: the later ones (by id) are renamed
`alice (2)`, `alice (3)`, … (skipping names any key has), each with an audit entry, and
then a partial unique index holds the rule against creators racing past app/keys/registry.py's
check. An older instance that still runs and creates a duplicate gets that index's
IntegrityError (docs/operations.md, upgrade notes). Frozen inline models: app/ may change.
"""
import datetime
import json
import socket

from peewee import CharField, DateTimeField, IntegerField, Model, PostgresqlDatabase, TextField

INDEX = "api_key_name_live"
NAME_LENGTH = 200


def _tables(db):
    class ApiKey(Model):
        id = IntegerField(primary_key=True)
        prefix = CharField(max_length=32)
        name = CharField(max_length=NAME_LENGTH)
        revoked_at = DateTimeField(null=True)

        class Meta:
            database = db
            table_name = "api_key"

    class AuditEntry(Model):
        at = DateTimeField()
        actor = CharField(max_length=200)
        via = CharField(max_length=16)
        source = CharField(max_length=255)
        action = CharField(max_length=64)
        target = CharField(max_length=255, null=True)
        details = TextField(null=True)

        class Meta:
            database = db
            table_name = "audit_entry"

    return ApiKey, AuditEntry


def _free(base, taken):
    number = 2
    while True:
        suffix = f" ({number})"
        name = base[:NAME_LENGTH - len(suffix)] + suffix
        if name not in taken:
            return name
        number += 1


def up(migrator, db):
    ApiKey, AuditEntry = _tables(db)
    # No key may be written between reading the names and creating the index (an older
    # instance may be running): PostgreSQL locks the table against writes, SQLite takes
    # its write lock with a statement that writes nothing.
    if isinstance(db, PostgresqlDatabase):
        db.execute_sql("LOCK TABLE api_key IN SHARE ROW EXCLUSIVE MODE")
    else:
        db.execute_sql("UPDATE api_key SET name = name WHERE 1 = 0")
    taken = {name for (name,) in ApiKey.select(ApiKey.name).tuples()}
    seen = set()
    for key in ApiKey.select().where(ApiKey.revoked_at.is_null()).order_by(ApiKey.id):
        if key.name not in seen:
            seen.add(key.name)
            continue
        new = _free(key.name, taken)
        taken.add(new)
        seen.add(new)
        ApiKey.update(name=new).where(ApiKey.id == key.id).execute()
        AuditEntry.create(
            at=datetime.datetime.now(datetime.UTC).replace(tzinfo=None),
            actor="migration 0013", via="migration", source=socket.gethostname()[:255],
            action="key.updated", target=f"key {key.id} ({key.prefix})",
            details=json.dumps({"after": {"name": new}, "before": {"name": key.name},
                                "reason": "another live key had the name; names are "
                                          "unique among keys that are not revoked"},
                               sort_keys=True))
    db.execute_sql(f"CREATE UNIQUE INDEX {INDEX} ON api_key (name) WHERE revoked_at IS NULL")


def down(migrator, db):
    # The renamed keys keep their new names: they are valid names either way.
    db.execute_sql(f"DROP INDEX IF EXISTS {INDEX}")
