"""Who used what: a record per request, taken in passing and written off the request path.

A request only appends its record to a bounded in-memory buffer. A writer (a greenlet
under gunicorn's gevent worker) turns batches of records into usage rows, the hourly
roll-up, token-quota charges and webhook events, in one transaction each, so either
all of a batch is written or none of it. While the database is away the batch waits
and is retried; at worker exit the buffer is flushed, and what still cannot be written
is spilled to a file in data_dir that the next writer loads (spill() / load_spills()).
A batch that fails for any other reason is split to find the record that fails it:
the rest are written, that one is written with its text made safe, and only if even
that fails is it moved to the dead-letter file (app/accounting/dead_letters.py). One record can
never stop the writer, and with it every charge and webhook event of its worker.
"""
import bisect
import collections
import dataclasses
import json
import logging
import os
import re
import threading
import time
import weakref

from app.accounting import histogram
from app.accounting.dead_letters import DeadLetters
from app.cooperative import pause
from app.errors import DATABASE_ERRORS
from app.limits import quota_period
from app.store.db import db, forget_idle_connections, is_postgres
from app.store.models import (
    HISTOGRAM_GRAINS,
    HISTOGRAM_METRICS,
    LATENCY_BUCKETS_MS,
    GpuUsage,
    TokenUsage,
    UsageDailyKey,
    UsageHistogram,
    UsageHourly,
    UsageHourlyModel,
    UsageLabel,
    UsageRecord,
    bucket_columns,
)
from app.store.private_files import private_dir, private_opener

log = logging.getLogger(__name__)

REFUSALS = {"auth": 1, "forbidden": 2, "rate": 3, "concurrency": 4, "quota": 5, "invalid": 6,
            "queue_full": 7, "queue_timeout": 8, "gpu_quota": 9}
REFUSAL_NAMES = {code: name for name, code in REFUSALS.items()}
FRACTIONAL = {"gpu_seconds", "load_seconds"}  # the sums that are not whole numbers
BATCH = 200  # records per transaction: a SQLite write holds its worker this long, no longer
LATENCY_COLUMNS, TTFB_COLUMNS = bucket_columns("latency"), bucket_columns("ttfb")
SUM_COLUMNS = ("requests", "errors", "refusals", "aborted", "prompt_tokens",
               "completion_tokens", "bytes", "latency_ms_sum", "ttfb_ms_sum", "ttfb_count",
               "eval_ms_sum", "eval_tokens", *LATENCY_COLUMNS, *TTFB_COLUMNS, "gpu_seconds",
               "load_seconds")

# Ollama's final object ends with its counts; the last 8 KiB of an answer hold them. On
# /v1 they are the OpenAI usage fields (chat, completions, embeddings; responses' input/
# output tokens) or Anthropic's (/v1/messages: input/output tokens, in message_start as
# an estimate with 0 output, and in the final message_delta as counted: the last wins).
_COUNTS = re.compile(rb'"(prompt_eval_count|eval_count|eval_duration|prompt_tokens|'
                     rb'completion_tokens|input_tokens|output_tokens)"\s*:\s*(\d+)')
_PROMPT = ("prompt_eval_count", "prompt_tokens", "input_tokens")
_COMPLETION = ("eval_count", "completion_tokens", "output_tokens")


@dataclasses.dataclass
class Record:
    """One request as it ended: what its usage row, access-log line and events are made of."""

    at: float  # epoch seconds when it arrived
    endpoint: str
    status: int
    latency_ms: int
    key_id: int | None = None
    key_prefix: str | None = None
    key_name: str | None = None
    quota_period: str | None = None  # 'day'/'month' when the key has a token quota
    model: str | None = None
    upstream: str | None = None
    refusal: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    eval_ms: int | None = None
    ttfb_ms: int | None = None
    bytes: int = 0
    aborted: bool = False
    prompt: dict | None = None  # the Go predecessor's fields, for webhooks that want them
    token_quota: int | None = None
    quota_warning_at: int | None = None  # tokens used that pass quota_warning_share
    quota_warning: int | None = None  # tokens used once this record's charge passed them
    reservation_id: int | None = None  # settled (deleted) when this record is written
    prompt_estimated: bool | None = None  # prompt_tokens is app/admission/estimate.py's guess
    gpu_seconds: float | None = None  # app/accounting/gpu.py; None: no local GPU used
    load_seconds: float | None = None  # the model load's part of gpu_seconds
    gpu_period: str | None = None  # 'day'/'month' when the key has a GPU quota
    gpu_reservation_id: int | None = None  # its GPU-quota reservation, settled when written
    cloud: bool = False  # it used ollama.com (app/proxy/cloud.py)
    cloud_model: bool = False  # it ran there wholly (not a row column: GPU time is None)

    @property
    def is_error(self):
        return self.refusal is None and self.status >= 400

    @property
    def tokens(self):
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)


def token_counts(tail, lines, complete, prompt_estimate=None):
    """(prompt, completion, eval ms) from an answer's last bytes, read in passing.

    A complete answer ends with Ollama's counts. One cut short (the client left, Ollama
    failed) has none that count: its completion tokens are the stream's lines (NDJSON)
    or events (SSE) relayed so far, about one per token, and its prompt tokens are the
    gateway's estimate from the body (app/admission/estimate.py), or unknown (None) without one,
    never a made-up zero.
    """
    if not complete:
        return prompt_estimate, lines or None, None
    found = {name.decode(): int(value) for name, value in _COUNTS.findall(tail)}
    prompt = next((found[n] for n in _PROMPT if n in found), None)
    completion = next((found[n] for n in _COMPLETION if n in found), None)
    duration = found.get("eval_duration")
    return prompt, completion, duration // 1_000_000 if duration else None


class Labels:
    """Names (endpoints, models, upstreams) as the small ids usage rows carry."""

    def __init__(self):
        self._ids = {}

    def resolve(self, names):
        """{name: id} for `names`, adding new ones; call inside the batch's transaction."""
        missing = [n for n in names if n not in self._ids]
        found = {}
        if missing:
            UsageLabel.insert_many([{"name": n} for n in missing]).on_conflict_ignore().execute()
            found = {row.name: row.id for row in
                     UsageLabel.select().where(UsageLabel.name.in_(missing))}
        return {**self._ids, **found}

    def remember(self, ids):
        """Keep ids once their transaction committed (a rolled-back insert made none)."""
        self._ids.update(ids)


class UsageWriter:
    """The bounded buffer and the writer that empties it into the database."""

    running = weakref.WeakSet()  # every writer with a thread, so tests can stop them all

    def __init__(self, capacity=100_000, interval=0.25, on_batch=None, on_written=None,
                 dead_letters=None):
        self.capacity = capacity
        self.interval = interval
        self.on_batch = on_batch or (lambda records: None)  # webhook events, in the txn
        self.on_written = on_written or (lambda depth: None)  # after each turn: buffer depth
        self.dead_letters = dead_letters or DeadLetters()
        self.dropped = 0
        self._buffer = collections.deque()
        self._labels = Labels()
        self._wake = threading.Event()
        self._write_lock = threading.Lock()
        self._thread = None
        self._stopped = False
        self._failing_since = None

    @property
    def depth(self):
        return len(self._buffer)

    def add(self, record):
        """Queue a record (never blocks). A full buffer drops its oldest record, counted."""
        if len(self._buffer) >= self.capacity:
            self._buffer.popleft()
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.error("usage buffer full (%d records; the database has been failing): "
                          "%d oldest record(s) dropped so far", self.capacity, self.dropped)
        self._buffer.append(record)
        # A record that settles a quota reservation is written at once, not at the next
        # turn: until then the reservation holds the key's quota (app/admission/quota.py).
        if len(self._buffer) >= BATCH or record.reservation_id is not None \
                or record.gpu_reservation_id is not None:
            self._wake.set()
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
            self._thread.start()
            UsageWriter.running.add(self)

    def stop(self):
        """Write what is buffered, once, and end the writer's thread."""
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        self.write_pending()

    def _run(self):
        pause_after_failure = 0.5
        while not self._stopped:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stopped:
                return
            try:
                written = self.write_pending()
            except Exception:  # a bug here must not end the writer: the next turn retries
                log.exception("the usage writer's turn failed")
                written = False
            self.on_written(self.depth)
            if written:
                pause_after_failure = 0.5
            else:
                time.sleep(pause_after_failure)
                pause_after_failure = min(pause_after_failure * 2, 10.0)

    def write_pending(self):
        """Write what is buffered, a batch per transaction; False if the database failed.

        Only what was there when the turn began: records that arrive while it writes
        wait for the next turn. Chasing them turned each turn into a transaction every
        few milliseconds for the one or two records that came in during the last (962
        transactions for 2,661 requests at concurrency 1 on PostgreSQL, bench/RESULTS.md).
        """
        with self._write_lock:
            left = len(self._buffer)
            while left > 0 and self._buffer:
                batch = [self._buffer[i] for i in range(min(BATCH, left, len(self._buffer)))]
                left -= len(batch)
                try:
                    self._settle(batch)
                except DATABASE_ERRORS as exc:  # what is not settled stays; the next turn
                    if self._failing_since is None:  # retries it
                        self._failing_since = time.monotonic()
                        log.warning("could not write %d usage record(s), retrying: %s",
                                    len(self._buffer), exc)
                    forget_idle_connections()
                    return False
                if self._failing_since is not None:
                    log.info("usage records written again after %.0f s",
                             time.monotonic() - self._failing_since)
                    self._failing_since = None
                pause()  # a long backlog is written without holding up the streams
            return True

    def _settle(self, records):
        """Write `records`, the buffer's first, and take them from it: in one transaction,
        or if one of them fails it, in halves, down to that record alone.

        A failure of the database itself (DATABASE_ERRORS) is raised, not split: every
        record would fail, and all wait for the next turn. Halves are written in order,
        so what was settled before it is always the front of the buffer.
        """
        try:
            self._write(records)
        except DATABASE_ERRORS:
            raise
        except Exception as exc:
            if len(records) > 1:
                half = len(records) // 2
                self._settle(records[:half])
                self._settle(records[half:])
            else:
                self._write_alone(records[0], exc)
            return
        self._take(len(records))

    def _write_alone(self, record, failure):
        """The record that failed alone: again with its text made safe, so its tokens are
        still charged; if even that fails, to the dead-letter file."""
        try:
            self._write([made_safe(record)])
        except DATABASE_ERRORS:
            raise
        except Exception as exc:
            self.dead_letters.add_record(record, f"{_named(failure)}; made safe: {_named(exc)}")
        else:
            log.warning("a usage record (key %s, %s) was written with its text made safe: %s",
                        record.key_prefix or "-", record.endpoint, _named(failure))
        self._take(1)

    def _take(self, count):
        for _ in range(count):
            self._buffer.popleft()

    def _write(self, records):
        with db.connection_context(), db.atomic():
            names = {_label(n) for r in records for n in (r.endpoint, r.model, r.upstream) if n}
            ids = self._labels.resolve(names)
            _insert(UsageRecord, ROW_COLUMNS, [_row(r, ids) for r in records])
            hourly = _rollup(records, ids)
            _add_to(UsageHourly, ("hour", "key_id", "model_id", "endpoint_id"), SUM_COLUMNS,
                    _sum_rows(hourly))
            # The dashboard's coarser roll-ups, kept in the same transaction as the hourly one.
            _add_to(UsageHourlyModel, ("hour", "model_id"), SUM_COLUMNS,
                    _sum_rows(_regroup(hourly, lambda hour, key, model, _: (hour, model))))
            _add_to(UsageDailyKey, ("day", "key_id"), SUM_COLUMNS, _sum_rows(_regroup(
                hourly, lambda hour, key, model, _: (hour // 86400 * 86400, key))))
            _add_to(UsageHistogram, HISTOGRAM_KEY, ("count",), _histogram_rows(hourly),
                    literal=True)
            _charge(records)
            self.on_batch(records)
        self._labels.remember(ids)

    def take_all(self):
        """Empty the buffer and return what it held (for spilling at exit)."""
        with self._write_lock:
            records = list(self._buffer)
            self._buffer.clear()
            return records


def _label(name):
    return name[:255] if name else None


# An unpaired surrogate (no database encodes one) and NUL (PostgreSQL's text holds none).
# Other control characters are stored as they are by both.
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def made_safe(record):
    """A copy of `record` whose text any database stores: U+FFFD for each unpaired
    surrogate, NUL removed, in every text field, the prompt's included."""
    return dataclasses.replace(record, **{
        f.name: _safe(getattr(record, f.name)) for f in dataclasses.fields(record) if f.init})


def _safe(value):
    if isinstance(value, str):
        return _UNSTORABLE.sub(lambda m: "" if m.group() == "\x00" else "\ufffd", value)
    if isinstance(value, dict):
        return {_safe(k): _safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_safe(v) for v in value]
    return value


def _named(exc):
    """An exception in a few words, for a log line (ASCII: it may quote a surrogate)."""
    return f"{type(exc).__name__}: {exc}"[:300].encode("ascii", "backslashreplace").decode()


ROW_COLUMNS = ("at", "key_id", "endpoint_id", "model_id", "upstream_id", "status", "refusal",
               "prompt_tokens", "completion_tokens", "latency_ms", "ttfb_ms", "eval_ms",
               "bytes", "aborted", "prompt_estimated", "gpu_seconds", "load_seconds", "cloud")


def _row(r, ids):
    return (r.at, r.key_id, ids[_label(r.endpoint)], ids.get(_label(r.model)),
            ids.get(_label(r.upstream)), r.status, REFUSALS.get(r.refusal, 0), r.prompt_tokens,
            r.completion_tokens, r.latency_ms, r.ttfb_ms, r.eval_ms, r.bytes, r.aborted,
            r.prompt_estimated, r.gpu_seconds, r.load_seconds, r.cloud)


def _bucket(prefix, ms):
    return f"{prefix}_le_{(*LATENCY_BUCKETS_MS, 'inf')[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)]}"


def _rollup(records, ids):
    """{(hour, key, model, endpoint): {column: amount}} for a batch."""
    groups = collections.defaultdict(collections.Counter)
    for r in records:
        sums = groups[(int(r.at // 3600 * 3600), r.key_id or 0,
                       ids.get(_label(r.model), 0), ids[_label(r.endpoint)])]
        sums["requests"] += 1
        sums["errors"] += r.is_error
        sums["refusals"] += r.refusal is not None
        sums["aborted"] += r.aborted
        sums["prompt_tokens"] += r.prompt_tokens or 0
        sums["completion_tokens"] += r.completion_tokens or 0
        sums["bytes"] += r.bytes
        sums["latency_ms_sum"] += r.latency_ms
        sums[_bucket("latency", r.latency_ms)] += 1
        sums[(LATENCY, histogram.bucket(r.latency_ms))] += 1
        if r.ttfb_ms is not None:
            sums["ttfb_ms_sum"] += r.ttfb_ms
            sums["ttfb_count"] += 1
            sums[_bucket("ttfb", r.ttfb_ms)] += 1
            sums[(TTFB, histogram.bucket(r.ttfb_ms))] += 1
        if r.gpu_seconds:
            sums["gpu_seconds"] += r.gpu_seconds
            sums["load_seconds"] += r.load_seconds or 0.0
        if r.eval_ms:
            sums["eval_ms_sum"] += r.eval_ms
            sums["eval_tokens"] += r.completion_tokens or 0
    return groups


LATENCY, TTFB = HISTOGRAM_METRICS["latency"], HISTOGRAM_METRICS["ttfb"]
HISTOGRAM_KEY = ("grain", "time", "key_id", "model_id", "endpoint_id", "metric", "bucket")
_HOURLY, _HOURLY_MODEL, _DAILY_KEY, _DAILY_MODEL = (
    HISTOGRAM_GRAINS[g] for g in ("hourly", "hourly_model", "daily_key", "daily_model"))


def _histogram_rows(hourly):
    """usage_histogram rows of every roll-up's grain, from _rollup's groups.

    _rollup counts each request's bucket under (metric, bucket) beside its sums; each
    grain's group is (time, key, model, endpoint) with 0 where the roll-up does not group.
    One pass, not _regroup's three: this runs in the writer's transaction.
    """
    counts = collections.Counter()
    for (hour, key, model, endpoint), sums in hourly.items():
        day = hour // 86400 * 86400
        for name, count in sums.items():
            if type(name) is tuple and count:
                counts[(_HOURLY, hour, key, model, endpoint, *name)] += count
                counts[(_HOURLY_MODEL, hour, 0, model, 0, *name)] += count
                counts[(_DAILY_KEY, day, key, 0, 0, *name)] += count
                counts[(_DAILY_MODEL, day, 0, model, 0, *name)] += count
    return [(*group, count) for group, count in counts.items()]


def _regroup(groups, coarser):
    """The same sums under coarser groups: coarser(hour, key, model, endpoint) -> group."""
    regrouped = collections.defaultdict(collections.Counter)
    for group, sums in groups.items():
        regrouped[coarser(*group)].update(sums)
    return regrouped


def _sum_rows(groups):
    return [(*group, *(sums[c] for c in SUM_COLUMNS)) for group, sums in groups.items()]


def _charges(records):
    """{(key id, quota period start): tokens} for the keys with a quota."""
    charges = collections.Counter()
    for r in records:
        if r.quota_period and r.tokens:
            charges[(r.key_id, quota_period(r.quota_period, r.at)[0])] += r.tokens
    return charges


def _charge(records):
    """Charge the batch's tokens to quotas and settle their reservations (app/admission/quota.py).

    In the batch's transaction: a request counts by its reservation until its charge
    commits, then by the charge alone. The record whose charge takes its key's used
    tokens from below its quota_warning_at to at least it gets `quota_warning` (the
    tokens used then): the row's upsert is serialised, so across workers one batch alone
    sees the crossing, and the key is warned once a period.
    """
    for r in records:
        r.quota_warning = None
    charges = _charges(records)
    totals = _add_to(TokenUsage, ("key_id", "period_start"), ("tokens",),
                     [(*key, tokens) for key, tokens in charges.items()],
                     returning=("key_id", "period_start", "tokens"))
    last = {(r.key_id, quota_period(r.quota_period, r.at)[0]): r
            for r in records if r.quota_period and r.quota_warning_at}
    for key_id, period_start, after in totals:
        r = last.get((key_id, period_start))
        if r is not None and after - charges[(key_id, period_start)] < r.quota_warning_at <= after:
            r.quota_warning = after
    _delete_ids("quota_reservation", [r.reservation_id for r in records])
    _charge_gpu(records)


def _charge_gpu(records):
    """Charge the batch's GPU seconds to GPU quotas and settle their reservations
    (app/admission/gpu_quota.py), as _charge does tokens."""
    charges = collections.Counter()
    for r in records:
        if r.gpu_period and r.gpu_seconds:
            charges[(r.key_id, quota_period(r.gpu_period, r.at)[0])] += r.gpu_seconds
    _add_to(GpuUsage, ("key_id", "period_start"), ("seconds",),
            [(*key, seconds) for key, seconds in charges.items()])
    _delete_ids("gpu_reservation", [r.gpu_reservation_id for r in records])


def _delete_ids(table, ids):
    ids = [i for i in ids if i is not None]
    if ids:
        db.execute_sql(f'DELETE FROM "{table}" WHERE "id" IN '
                       f'({", ".join([db.obj.param] * len(ids))})', ids)


# The batch's statements are written out here rather than built by peewee: building a
# 200-row INSERT cost 70 µs a row in Python, and SQLite holds its worker while it runs.
# Both databases take this SQL as it is (SQLite 3.24+ for ON CONFLICT … DO UPDATE).

def _values(columns, count):
    one = "(" + ", ".join([db.obj.param] * len(columns)) + ")"
    return ", ".join([one] * count)


def _insert(model, columns, rows):
    """One INSERT of every row."""
    if rows:
        db.execute_sql(f'INSERT INTO "{model._meta.table_name}" ({_quoted(columns)}) '
                       f"VALUES {_values(columns, len(rows))}", [v for row in rows for v in row])


def _add_to(model, key, amounts, rows, returning=(), literal=False):
    """Insert each row, or add its amounts to the row already there: one atomic statement.

    The rows' keys are distinct (one row per group), as PostgreSQL requires. Returns the
    `returning` columns of each row after the addition. literal:
    the rows are integers only; on PostgreSQL they are written into the statement as
    numbers rather than passed as parameters. The histogram rows are some 1,500 a batch,
    8 integers each: psycopg2 adapting 12,000 parameters one by one was most of what
    they added to the writer's CPU (bench/RESULTS.md: 27.8 -> 16.7 ms a batch). SQLite
    binds parameters faster than it parses numbers (9.8 -> 11.2 ms): parameters there.
    int() makes anything but an integer fail, not reach the SQL.
    """
    if not rows:
        return []
    table = model._meta.table_name
    columns = (*key, *amounts)
    additions = ", ".join(f'"{c}" = "{table}"."{c}" + EXCLUDED."{c}"' for c in amounts)
    if literal and is_postgres():
        values = ", ".join("(" + ", ".join(map(str, map(int, row))) + ")" for row in rows)
        params = ()
    else:
        values, params = _values(columns, len(rows)), [v for row in rows for v in row]
    cursor = db.execute_sql(
        f'INSERT INTO "{table}" ({_quoted(columns)}) VALUES '
        f"{values} ON CONFLICT ({_quoted(key)}) "
        f"DO UPDATE SET {additions}" + (f" RETURNING {_quoted(returning)}" if returning else ""),
        params)
    return cursor.fetchall() if returning else []


def _quoted(columns):
    return ", ".join(f'"{c}"' for c in columns)


# Spills are named so that gateways before this one never take them: their loader
# failed on a field it did not know and left the file stuck as loading-*, records lost
# (a rolling upgrade, or a rollback, runs both on one data_dir). This one reads both.
SPILL_PREFIX, OLD_SPILL_PREFIX = "usage-records-", "usage-spill-"


def spill(records, directory):
    """Write records the database would not take to a file, so that exiting loses none.

    Only the gateway's user reads it (0600: records name keys, and may hold prompts). It
    gets its final name once complete: a worker starting meanwhile (a reload) loads
    whole files only.
    """
    path = directory / f"{SPILL_PREFIX}{os.getpid()}-{time.time_ns()}.jsonl"
    partial = path.with_suffix(".partial")
    private_dir(directory)
    with open(partial, "w", opener=private_opener) as fh:
        for record in records:
            fh.write(json.dumps(dataclasses.asdict(record)) + "\n")
    os.replace(partial, path)
    return path


# A spill written by another version may name fields this one does not have (a rolling
# upgrade runs both): they are left out, and the record written with the rest.
_RECORD_FIELDS = {f.name for f in dataclasses.fields(Record) if f.init}


def load_spills(directory, writer):
    """Queue the records earlier processes spilled; each file is taken by one process.

    A line that is not a record goes to the dead-letter file and the rest load; a
    record the database refuses is the writer's to settle, like any other.
    """
    loaded = 0
    for path in sorted([*directory.glob(f"{SPILL_PREFIX}*.jsonl"),
                        *directory.glob(f"{OLD_SPILL_PREFIX}*.jsonl")]):
        taken = path.with_name(f"loading-{os.getpid()}-{path.name}")
        try:
            path.rename(taken)  # atomic: two workers starting together cannot both take it
        except OSError:
            continue
        with open(taken, "rb") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    fields = json.loads(line)
                    record = Record(**{k: v for k, v in fields.items() if k in _RECORD_FIELDS})
                except Exception as exc:  # whatever is wrong with it, it is this line's
                    writer.dead_letters.add_line(line, f"{path.name} line {number}: "
                                                       f"{_named(exc)}")
                    continue
                writer.add(record)
                loaded += 1
        taken.unlink()
    if loaded:
        log.info("loaded %d usage record(s) spilled by an earlier exit", loaded)
    return loaded
