"""Webhook ids are never handed out twice (SQLite: the table rebuilt with AUTOINCREMENT).

Without AUTOINCREMENT SQLite gives a new row the largest id + 1: remove webhook 7 (the
newest) and the next one added is webhook 7 again, which the audit log, a receiver's
notes or a script holding "7" would take for the old one. AUTOINCREMENT keeps a
high-water mark in sqlite_sequence. The table keeps its name, columns and ids, so
instances still running the previous release read and write it as before. Its mark
starts past every id the audit log names, so ids removed before this migration are not
reused either. PostgreSQL's sequences never hand out an id twice: nothing to do there.

playhouse's SqliteMigrator runs this with foreign keys off, so dropping the old table
does not cascade to the deliveries that point at it.
"""
from peewee import SqliteDatabase

COLUMNS = "id, url, events, secret, include_prompt, created_at"
CREATE = ('CREATE TABLE "webhook_rebuilt" ("id" INTEGER NOT NULL PRIMARY KEY{autoincrement}, '
          '"url" TEXT NOT NULL, "events" TEXT NOT NULL, "secret" VARCHAR(128) NOT NULL, '
          '"include_prompt" INTEGER NOT NULL, "created_at" DATETIME NOT NULL)')


def _rebuild(db, autoincrement):
    db.execute_sql(CREATE.format(autoincrement=" AUTOINCREMENT" if autoincrement else ""))
    db.execute_sql(f'INSERT INTO "webhook_rebuilt" ({COLUMNS}) SELECT {COLUMNS} FROM "webhook"')
    db.execute_sql('DROP TABLE "webhook"')
    db.execute_sql('ALTER TABLE "webhook_rebuilt" RENAME TO "webhook"')
    broken = db.execute_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise RuntimeError(f"rebuilding the webhook table broke foreign keys: {broken[:5]}")


def _highest_id_ever(db):
    """The largest webhook id in the table or named by the audit log (`webhook 7`)."""
    highest = db.execute_sql('SELECT COALESCE(MAX(id), 0) FROM "webhook"').fetchone()[0]
    for (target,) in db.execute_sql("SELECT target FROM audit_entry WHERE target LIKE "
                                    "'webhook %'").fetchall():
        number = target.split()[1]
        if number.isascii() and number.isdigit():
            highest = max(highest, int(number))
    return highest


def up(migrator, db):
    if not isinstance(db, SqliteDatabase):
        return
    highest = _highest_id_ever(db)
    _rebuild(db, autoincrement=True)
    db.execute_sql("DELETE FROM sqlite_sequence WHERE name = 'webhook'")
    db.execute_sql("INSERT INTO sqlite_sequence (name, seq) VALUES ('webhook', ?)", (highest,))


def down(migrator, db):
    if isinstance(db, SqliteDatabase):
        _rebuild(db, autoincrement=False)
        db.execute_sql("DELETE FROM sqlite_sequence WHERE name = 'webhook'")
