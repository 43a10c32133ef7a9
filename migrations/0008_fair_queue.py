"""The fair queue: requests waiting for, or holding, an upstream's slots (app/admission/fair_queue.py),
and each key's priority there."""
from peewee import BigIntegerField, CharField, DoubleField, IntegerField, Model, PostgresqlDatabase


def _tables(db):
    class QueueEntry(Model):
        id = BigIntegerField(primary_key=True)
        upstream = CharField(max_length=255, index=True)
        key_id = IntegerField()
        holder = CharField(max_length=128)
        start_tag = DoubleField()
        finish_tag = DoubleField()
        enqueued_at = DoubleField()
        granted_at = DoubleField(null=True)
        expires_at = DoubleField()

        class Meta:
            database = db
            table_name = "queue_entry"

    return [QueueEntry]


# PostgreSQL: entering and leaving an upstream's queue as functions, so that each is one
# round trip that holds the upstream's lock only while the server works (never while a
# busy worker gets round to its next statement), with plans PL/pgSQL keeps. Each
# statement in them sees what committed before it (READ COMMITTED), the lock included.
ENTER = """
CREATE OR REPLACE FUNCTION ollama_gw_queue_enter(
    p_id bigint, p_upstream text, p_key bigint, p_holder text, p_step float8, p_now float8,
    p_cap int, p_lease float8, p_fair boolean, p_per_key int, p_lock bigint)
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    s record;
    start float8;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    SELECT COALESCE(SUM(CASE WHEN granted_at IS NOT NULL THEN 1 ELSE 0 END), 0) AS running,
           COALESCE(SUM(CASE WHEN granted_at IS NULL THEN 1 ELSE 0 END), 0) AS waiting,
           COALESCE(SUM(CASE WHEN granted_at IS NULL AND key_id = p_key THEN 1 ELSE 0 END),
                    0) AS mine,
           GREATEST(COALESCE(MAX(CASE WHEN granted_at IS NOT NULL THEN start_tag END), 0),
                    COALESCE(MAX(CASE WHEN key_id = p_key THEN finish_tag END), 0)) AS start
      INTO s FROM queue_entry WHERE upstream = p_upstream AND expires_at > p_now;
    IF s.running >= p_cap AND s.mine >= p_per_key THEN
        RETURN -1;  -- the key's share of the queue is full
    END IF;
    start := CASE WHEN p_fair THEN s.start ELSE p_now END;
    INSERT INTO queue_entry (id, upstream, key_id, holder, start_tag, finish_tag, enqueued_at,
                             granted_at, expires_at)
    VALUES (p_id, p_upstream, p_key, p_holder, start, start + p_step, p_now,
            CASE WHEN s.running < p_cap AND s.waiting = 0 THEN p_now END, p_now + p_lease);
    RETURN CASE WHEN s.running < p_cap AND s.waiting = 0 THEN 1 ELSE 0 END;  -- 1: runs now
END $$
"""
LEAVE = """
CREATE OR REPLACE FUNCTION ollama_gw_queue_leave(
    p_id bigint, p_upstream text, p_cap int, p_now float8, p_lock bigint, p_channel text)
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    granted int := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    DELETE FROM queue_entry WHERE id = p_id;
    IF EXISTS (SELECT 1 FROM queue_entry WHERE upstream = p_upstream AND granted_at IS NULL
               AND expires_at > p_now) THEN
        UPDATE queue_entry SET granted_at = p_now WHERE id IN (
            SELECT id FROM queue_entry WHERE upstream = p_upstream AND granted_at IS NULL
               AND expires_at > p_now
             ORDER BY start_tag, id
             LIMIT GREATEST(0, p_cap - (SELECT COUNT(*) FROM queue_entry
                                        WHERE upstream = p_upstream
                                          AND granted_at IS NOT NULL AND expires_at > p_now)));
        GET DIAGNOSTICS granted = ROW_COUNT;
        IF granted > 0 THEN
            PERFORM pg_notify(p_channel, p_upstream);
        END IF;
    END IF;
    RETURN granted;
END $$
"""


def up(migrator, db):
    db.create_tables(_tables(db))
    if isinstance(db, PostgresqlDatabase):
        # Entries live for one request and lapse with their lease: a crash may lose them,
        # and a commit need not wait for the disk (half the queue's time per request).
        db.execute_sql("ALTER TABLE queue_entry SET UNLOGGED")
        db.execute_sql(ENTER)
        db.execute_sql(LEAVE)
    migrator.migrate(migrator.add_column("api_key", "priority", IntegerField(default=1)))


def down(migrator, db):
    if isinstance(db, PostgresqlDatabase):
        db.execute_sql("DROP FUNCTION IF EXISTS ollama_gw_queue_enter")
        db.execute_sql("DROP FUNCTION IF EXISTS ollama_gw_queue_leave")
    migrator.migrate(migrator.drop_column("api_key", "priority"))
    db.drop_tables(_tables(db))
