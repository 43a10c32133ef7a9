"""The fair queue tells waiting workers which requests it granted, not only that it did.

A new PostgreSQL function beside migration 0008's: `ollama_gw_queue_leave_grants` frees
a slot and grants the next waiting requests as `ollama_gw_queue_leave` does, and its
NOTIFY on the queue's channel carries the grants (`g:<entry id>:<holder> ...`, in
several notifications when they would pass NOTIFY's 8,000 bytes); it returns them too,
so the worker that freed the slot wakes those of its own host at once
(app/admission/fair_queue.py). A worker of this release sets a granted request going
from the payload, without a SELECT.

Nothing old changes: gateways of the release before keep calling the 0008 functions
during a rolling upgrade; their listeners take any notification on the channel as "look
again" (they only SELECT), so the new payload wakes them as the old one did, and new
listeners take an old one (the upstream's name) the same way. SQLite needs nothing: the
wake-up between workers of one machine is a socket (the queue's module says which).
"""
from peewee import PostgresqlDatabase

LEAVE_GRANTS = """
CREATE OR REPLACE FUNCTION ollama_gw_queue_leave_grants(
    p_id bigint, p_upstream text, p_cap int, p_now float8, p_lock bigint, p_channel text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    r record;
    item text;
    payload text := '';
    granted text := '';
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    DELETE FROM queue_entry WHERE id = p_id;
    IF EXISTS (SELECT 1 FROM queue_entry WHERE upstream = p_upstream AND granted_at IS NULL
               AND expires_at > p_now) THEN
        FOR r IN UPDATE queue_entry SET granted_at = p_now WHERE id IN (
            SELECT id FROM queue_entry WHERE upstream = p_upstream AND granted_at IS NULL
               AND expires_at > p_now
             ORDER BY start_tag, id
             LIMIT GREATEST(0, p_cap - (SELECT COUNT(*) FROM queue_entry
                                        WHERE upstream = p_upstream
                                          AND granted_at IS NOT NULL AND expires_at > p_now)))
            RETURNING id, holder
        LOOP
            item := r.id || ':' || r.holder;
            -- NOTIFY takes at most 8,000 bytes: a long list goes in several.
            IF payload <> '' AND octet_length(payload) + octet_length(item) > 7000 THEN
                PERFORM pg_notify(p_channel, 'g:' || payload);
                payload := '';
            END IF;
            payload := payload || CASE WHEN payload = '' THEN '' ELSE ' ' END || item;
            granted := granted || CASE WHEN granted = '' THEN '' ELSE ' ' END || item;
        END LOOP;
        IF payload <> '' THEN
            PERFORM pg_notify(p_channel, 'g:' || payload);
        END IF;
    END IF;
    RETURN granted;  -- '<id>:<holder> ...', '' when no one was granted
END $$
"""


def up(migrator, db):
    if isinstance(db, PostgresqlDatabase):
        db.execute_sql(LEAVE_GRANTS)


def down(migrator, db):
    if isinstance(db, PostgresqlDatabase):
        db.execute_sql("DROP FUNCTION IF EXISTS ollama_gw_queue_leave_grants")
