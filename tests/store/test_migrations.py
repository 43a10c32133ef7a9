"""Migrations: from empty to exactly the models' schema, repeatable, reversible, race-safe."""
import datetime
import json
import multiprocessing
import os
import select
import subprocess
import sys
import time

import peewee
import pytest

from app.store import db as database
from app.store.models import MODELS

HISTORY_TABLE = "schema_migration"
MIGRATIONS = ["0001_initial", "0002_heartbeat", "0003_usage_quotas_webhooks",
              "0004_key_model_policy", "0005_upstream_status",
              "0006_audit_log", "0007_usage_hourly", "0008_fair_queue",
              "0009_quota_reservations", "0010_dashboard_sessions", "0011_webhook_ids",
              "0013_unique_key_names", "0014_usage_histogram", "0015_queue_grants",
              "0016_cloud", "0017_gpu_time"]


@pytest.fixture
def empty(database_url):
    """An empty database of each kind, opened but not migrated."""
    instance = database.open_database(database_url)
    database.db.initialize(instance)
    instance.connect()
    yield instance
    instance.close_all()


def model_schema(model):
    """What the model says its table looks like, in the terms introspection uses."""
    meta = model._meta
    primary = {field.column_name for field in meta.get_primary_keys()}
    indexes = {((field.column_name,), bool(field.unique)) for field in meta.sorted_fields
               if (field.unique or field.index) and not field.primary_key}
    for index in meta.indexes:
        if isinstance(index, peewee.ModelIndex):  # e.g. a partial index (its WHERE: below)
            indexes.add((tuple(f.column_name for f in index._expressions), index._unique))
            continue
        fields, unique = index
        indexes.add((tuple(meta.fields[name].column_name for name in fields), unique))
    foreign_keys = {(field.column_name, field.rel_model._meta.table_name,
                     field.rel_field.column_name, field.on_delete or "NO ACTION")
                    for field in meta.sorted_fields if isinstance(field, peewee.ForeignKeyField)}
    return {
        "columns": {field.column_name: field.null for field in meta.sorted_fields},
        "primary_key": primary,
        "indexes": indexes,
        "foreign_keys": foreign_keys,
    }


def table_schema(instance, table):
    """The same description, read back from the database."""
    columns = instance.get_columns(table)
    primary = {column.name for column in columns if column.primary_key}
    indexes = {(tuple(index.columns), bool(index.unique)) for index in instance.get_indexes(table)
               if not (index.unique and set(index.columns) == primary)}
    foreign_keys = {(fk.column, fk.dest_table, fk.dest_column, (fk.on_delete or "NO ACTION"))
                    for fk in instance.get_foreign_keys(table)}
    return {
        "columns": {column.name: column.null for column in columns},
        "primary_key": primary,
        "indexes": indexes,
        "foreign_keys": foreign_keys,
    }


def tables(instance):
    """The database's tables, without SQLite's own (sqlite_sequence: AUTOINCREMENT's marks)."""
    return {name for name in instance.get_tables() if not name.startswith("sqlite_")}


def history(instance):
    return [row[0] for row in instance.execute_sql(
        f'SELECT name FROM "{HISTORY_TABLE}" ORDER BY name').fetchall()]


def test_empty_database_gets_exactly_the_models_tables(empty):
    assert empty.get_tables() == []
    assert database.upgrade(empty) == MIGRATIONS
    expected = {model._meta.table_name for model in MODELS} | {HISTORY_TABLE}
    assert tables(empty) == expected


@pytest.mark.parametrize("model", MODELS, ids=lambda model: model.__name__)
def test_migrated_table_matches_its_model(empty, model):
    database.upgrade(empty)
    assert table_schema(empty, model._meta.table_name) == model_schema(model)


def test_migrations_are_recorded_once_and_reported_applied(empty):
    assert database.pending_migrations(empty) == MIGRATIONS
    database.upgrade(empty)
    assert history(empty) == MIGRATIONS
    assert database.pending_migrations(empty) == []
    assert [name for name, applied in database.migration_status(empty) if applied] == MIGRATIONS


def test_upgrading_twice_changes_nothing(empty):
    database.upgrade(empty)
    MODELS[0].create(prefix="ogw_abcdefgh", key_hash="0" * 64, name="kept")
    before = {table: table_schema(empty, table) for table in tables(empty)}
    assert database.upgrade(empty) == []
    assert {table: table_schema(empty, table) for table in tables(empty)} == before
    assert history(empty) == MIGRATIONS
    assert [row.name for row in MODELS[0].select()] == ["kept"]


def test_downgrade_removes_the_tables_and_upgrade_restores_them(empty):
    database.upgrade(empty)
    assert database.downgrade(empty) == [MIGRATIONS[-1]]  # the newest only, by default
    assert database.upgrade(empty) == [MIGRATIONS[-1]]
    assert database.downgrade(empty, MIGRATIONS[0]) == list(reversed(MIGRATIONS))
    assert tables(empty) == {HISTORY_TABLE}
    assert history(empty) == []
    assert database.pending_migrations(empty) == MIGRATIONS
    assert database.upgrade(empty) == MIGRATIONS
    for model in MODELS:
        assert table_schema(empty, model._meta.table_name) == model_schema(model)
    MODELS[0].create(prefix="ogw_abcdefgh", key_hash="0" * 64, name="usable again")
    assert MODELS[0].select().count() == 1


def test_downgrade_with_nothing_applied_reverts_nothing(empty):
    assert database.downgrade(empty) == []


def _upgrade_when_all_are_ready(url, barrier, results):
    """Child process: open the database, wait for the others, then upgrade at once."""
    try:
        instance = database.open_database(url)
        database.db.initialize(instance)
        instance.connect()
        barrier.wait(timeout=30)
        results.put(("ok", database.upgrade(instance)))
    except Exception as exc:  # the parent reports it; a child traceback is lost otherwise
        results.put(("error", repr(exc)))


def test_two_processes_upgrading_at_once_both_succeed(database_url, empty):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_upgrade_when_all_are_ready,
                               args=(database_url, barrier, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        outcomes = sorted(results.get(timeout=120) for _ in workers)
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
                worker.join()
    assert outcomes == [("ok", []), ("ok", MIGRATIONS)]
    assert history(empty) == MIGRATIONS
    assert {model._meta.table_name for model in MODELS} <= set(empty.get_tables())


def test_two_cli_upgrades_at_once_both_succeed(database_url, empty, tmp_path):
    env = {**os.environ, "DATABASE_URL": database_url}
    env.pop("OLLAMA_GW_CONFIG", None)
    command = [sys.executable, "-c", "from cli import main; main()", "db", "upgrade"]
    runs = [subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outputs = sorted(run.communicate(timeout=120)[0].strip() for run in runs)
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert outputs == ["already up to date", f"applied: {', '.join(MIGRATIONS)}"]
    assert history(empty) == MIGRATIONS


def test_webhook_ids_are_never_reused_across_0011(empty):
    """Ids removed before the migration (the audit log names them) and after it stay unused;
    ids, columns and deliveries survive it, so instances of the previous release carry on."""
    from app.store.models import Webhook, WebhookDelivery
    from app.webhooks import outbox as hooks

    database.migration_runner(empty).up(MIGRATIONS[MIGRATIONS.index("0011_webhook_ids") - 1])
    kept = [hooks.add_webhook(f"http://127.0.0.1:9/{n}")[0].id for n in range(3)]
    hooks.remove_webhook(kept.pop())  # the newest: without AUTOINCREMENT its id came back
    hooks.enqueue("key.created", {"key_id": 1})
    assert database.upgrade(empty) == MIGRATIONS[MIGRATIONS.index("0011_webhook_ids"):]
    assert [row.id for row in Webhook.select().order_by(Webhook.id)] == kept == [1, 2]
    assert sorted(d.webhook_id for d in WebhookDelivery.select()) == kept
    assert hooks.add_webhook("http://127.0.0.1:9/new")[0].id == 4
    hooks.remove_webhook(4)
    assert hooks.add_webhook("http://127.0.0.1:9/newer")[0].id == 5
    hooks.remove_webhook(1)  # its deliveries still go with it: the foreign key holds
    assert sorted(d.webhook_id for d in WebhookDelivery.select()) == [2]


def _key(name, revoked=False):
    return MODELS[0].create(prefix=f"ogw_{os.urandom(4).hex()}", key_hash=os.urandom(32).hex(),
                            name=name,
                            revoked_at=datetime.datetime(2026, 1, 1) if revoked else None)


def test_unique_names_migration_renames_later_live_duplicates_with_an_audit_entry(empty):
    from app.store.models import AuditEntry

    # Just before 0013: duplicates are possible again.
    database.migration_runner(empty).up(MIGRATIONS[MIGRATIONS.index("0013_unique_key_names") - 1])
    first = _key("alice")
    _key("alice", revoked=True)      # revoked: keeps its name, takes no number
    _key("alice (2)", revoked=True)  # a name any key has is skipped
    second, third = _key("alice"), _key("alice")
    _key("bob")
    before = AuditEntry.select().count()
    assert database.upgrade(empty) == MIGRATIONS[MIGRATIONS.index("0013_unique_key_names"):]
    names = {row.id: row.name for row in MODELS[0].select()}
    assert (names[first.id], names[second.id], names[third.id]) == (
        "alice", "alice (3)", "alice (4)")
    entries = list(AuditEntry.select().where(AuditEntry.action == "key.updated")
                   .order_by(AuditEntry.id))
    assert [(e.target, json.loads(e.details)["before"], json.loads(e.details)["after"])
            for e in entries] == [
        (f"key {second.id} ({second.prefix})", {"name": "alice"}, {"name": "alice (3)"}),
        (f"key {third.id} ({third.prefix})", {"name": "alice"}, {"name": "alice (4)"})]
    assert AuditEntry.select().count() == before + 3  # the two renames and db.upgraded
    with pytest.raises(peewee.IntegrityError), empty.atomic():
        _key("bob")
    _key("alice (3)", revoked=True)  # a revoked key may share a live key's name


def test_unique_names_migration_keeps_a_name_too_long_for_its_number_within_200(empty):
    database.migration_runner(empty).up(MIGRATIONS[MIGRATIONS.index("0013_unique_key_names") - 1])
    _key("x" * 200)
    later = _key("x" * 200)
    database.upgrade(empty)
    assert MODELS[0].get_by_id(later.id).name == "x" * 196 + " (2)"


def test_gpu_time_migration_keeps_the_previous_releases_writes_working(empty):
    """0017 adds GPU columns with defaults: the previous release's statements (which name
    none of them) still insert and add up, and its rows read as no GPU time."""
    from app.accounting import stats
    from app.accounting.usage import FRACTIONAL, SUM_COLUMNS, Record, UsageWriter

    database.migration_runner(empty).up(MIGRATIONS[MIGRATIONS.index("0017_gpu_time") - 1])
    p = empty.param
    old_key = ("INSERT INTO api_key (prefix, key_hash, name, role, rate_period, "
               "allow_keep_alive, priority, created_at) VALUES "
               f"({p}, {p}, {p}, 'user', 3600, {p}, 1, {p})")
    old_row = ('INSERT INTO usage_record ("at", key_id, endpoint_id, status, refusal, '
               f"latency_ms, bytes, aborted) VALUES ({p}, {p}, 1, 200, 0, 5, 0, {p})")
    sums = [c for c in SUM_COLUMNS if c not in FRACTIONAL]  # what it writes: all of them
    old_hourly = ('INSERT INTO usage_hourly ("hour", key_id, model_id, endpoint_id, '
                  + ", ".join(f'"{c}"' for c in sums) + f") VALUES ({p}, {p}, 0, 1, "
                  + ", ".join("1" if c == "requests" else "0" for c in sums)
                  + ') ON CONFLICT ("hour", key_id, model_id, endpoint_id) DO UPDATE SET '
                  + ", ".join(f'"{c}" = usage_hourly."{c}" + EXCLUDED."{c}"' for c in sums))
    hour = int(time.time()) // 3600 * 3600
    empty.execute_sql(old_key, ("ogw_before", "a" * 64, "before", True, datetime.datetime.now()))
    empty.execute_sql("INSERT INTO usage_label (name) VALUES ('/api/chat')")
    empty.execute_sql(old_row, (time.time(), 1, False))
    empty.execute_sql(old_hourly, (hour, 1))
    assert database.upgrade(empty) == MIGRATIONS[MIGRATIONS.index("0017_gpu_time"):]
    # An instance of the previous release, still serving during the rolling upgrade:
    empty.execute_sql(old_key, ("ogw_during", "b" * 64, "during", True, datetime.datetime.now()))
    empty.execute_sql(old_row, (time.time(), 1, False))
    empty.execute_sql(old_hourly, (hour, 1))
    assert [(r.gpu_quota, r.gpu_period) for r in MODELS[0].select()] == [(None, None)] * 2
    # and this one, beside it:
    writer = UsageWriter()
    writer.add(Record(at=time.time(), endpoint="/api/chat", status=200, latency_ms=5, key_id=1,
                      gpu_seconds=1.25, load_seconds=0.5))
    writer.stop()
    (row,) = stats.usage(None, "key")
    assert (row["requests"], row["gpu_seconds"], row["load_seconds"]) == (3, 1.25, 0.5)
    from app.store.models import UsageRecord
    assert sorted(r.gpu_seconds or 0 for r in UsageRecord.select()) == [0, 0, 1.25]


def test_cloud_migration_leaves_keys_at_default_and_old_code_can_still_insert(empty):
    from app.keys.registry import KeyInfo, key_summary
    from app.store.models import UsageRecord

    database.migration_runner(empty).up(MIGRATIONS[MIGRATIONS.index("0016_cloud") - 1])
    before = _key("before 0016")
    assert database.upgrade(empty)[0] == "0016_cloud"
    row = MODELS[0].get_by_id(before.id)
    assert row.cloud is None and key_summary(row)["cloud"] == "default"
    assert KeyInfo.from_row(row).may_use_cloud("role") is False
    assert KeyInfo.from_row(row).may_use_cloud("allow") is True
    # The previous release's INSERTs name none of the new columns: both tables take them.
    param = empty.param
    empty.execute_sql(
        "INSERT INTO api_key (prefix, key_hash, name, role, rate_period, allow_keep_alive, "
        f"priority, created_at) VALUES ({', '.join([param] * 8)})",
        ("ogw_oldcode1", "1" * 64, "old code", "user", 3600, True, 1,
         datetime.datetime(2026, 12, 1)))
    empty.execute_sql(
        'INSERT INTO usage_record ("at", key_id, endpoint_id, status, refusal, latency_ms, '
        f'bytes, aborted) VALUES ({", ".join([param] * 8)})',
        (1.0, before.id, 1, 200, 0, 5, 0, False))
    assert MODELS[0].get(MODELS[0].prefix == "ogw_oldcode1").cloud is None
    assert [r.cloud for r in UsageRecord.select()] == [None]
    assert database.downgrade(empty, "0016_cloud")[-1] == "0016_cloud"
    assert "cloud" not in {c.name for c in empty.get_columns("api_key")}


def test_queue_grants_migration_adds_a_leave_that_names_its_grants_beside_the_old_one(empty):
    """0015 on PostgreSQL: the new function's NOTIFY names each grant (several NOTIFYs past
    8,000 bytes) and so does its result; 0008's function, which gateways of the release
    before call during a rolling upgrade, is still there and NOTIFYs as it did."""
    if not database.is_postgres(empty):
        pytest.skip("PostgreSQL's functions and NOTIFY; SQLite's queue needs no migration")
    import psycopg2

    from app.store.models import QueueEntry

    database.migration_runner(empty).up(MIGRATIONS[MIGRATIONS.index("0015_queue_grants") - 1])
    assert database.upgrade(empty) == MIGRATIONS[MIGRATIONS.index("0015_queue_grants"):]
    now = 1000.0
    holders = {entry_id: f"{'h' * 100}/ns.boot:{entry_id}" for entry_id in range(2, 102)}
    QueueEntry.create(id=1, upstream="gpu", key_id=1, holder="old:1", start_tag=0, finish_tag=1,
                      enqueued_at=now, granted_at=now, expires_at=now + 60)
    for entry_id, holder in holders.items():
        QueueEntry.create(id=entry_id, upstream="gpu", key_id=1, holder=holder,
                          start_tag=entry_id, finish_tag=entry_id + 1, enqueued_at=now,
                          expires_at=now + 60)
    listener = psycopg2.connect(database=empty.database, **empty.connect_params)
    listener.autocommit = True
    try:
        listener.cursor().execute("LISTEN ollama_gw_queue")

        def notified(expected=True):
            """The payloads NOTIFYed since the last call: those of one commit arrive
            together, but not at once (on a busy machine, later than the statement's
            return): waits up to 10 s for them where some are expected."""
            deadline = time.monotonic() + (10 if expected else 0.5)
            while not listener.notifies and time.monotonic() < deadline:
                select.select([listener], [], [], 0.1)
                listener.poll()
            select.select([listener], [], [], 0.2)  # the rest of the commit's, if split
            listener.poll()
            payloads = [n.payload for n in listener.notifies]
            listener.notifies.clear()
            return payloads

        call = "SELECT {}(%s, 'gpu', %s, %s, 7, 'ollama_gw_queue')"
        # The old function: one slot freed, entry 2 granted, the upstream's name sent.
        assert empty.execute_sql(call.format("ollama_gw_queue_leave"),
                                 (1, 1, now)).fetchone()[0] == 1
        assert notified() == ["gpu"]
        # The new one: entry 2 leaves, the cap goes up to 98: entries 3 to 100 granted.
        text = empty.execute_sql(call.format("ollama_gw_queue_leave_grants"),
                                 (2, 98, now)).fetchone()[0]
        expected = sorted(f"{entry_id}:{holders[entry_id]}" for entry_id in range(3, 101))
        assert sorted(text.split(" ")) == expected
        payloads = notified()
        assert len(payloads) > 1 and all(len(p.encode()) < 8000 for p in payloads)
        assert all(p.startswith("g:") for p in payloads)
        assert sorted(item for p in payloads for item in p[2:].split(" ")) == expected
        assert empty.execute_sql(call.format("ollama_gw_queue_leave_grants"),
                                 (3, 98, now)).fetchone()[0] == "101:" + holders[101]
        assert notified() == ["g:101:" + holders[101]]
        # Nothing left to grant: nothing sent, nothing returned.
        assert empty.execute_sql(call.format("ollama_gw_queue_leave_grants"),
                                 (4, 98, now)).fetchone()[0] == ""
        assert notified(expected=False) == []
    finally:
        listener.close()
    assert database.downgrade(empty, "0015_queue_grants")[-1] == "0015_queue_grants"
    assert empty.execute_sql("SELECT to_regproc('ollama_gw_queue_leave_grants') IS NULL, "
                             "to_regproc('ollama_gw_queue_leave') IS NOT NULL").fetchone() == (
                                 True, True)
