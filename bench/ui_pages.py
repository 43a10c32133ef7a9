"""How fast are the dashboard's pages with a large history? 30 days of 5 million requests.

Fills a SQLite database with per-request rows (50 keys, 6 models, 3 endpoints, a daily
rhythm), builds the hourly roll-up from them in SQL, as the usage writer would have
kept it, then times each dashboard page through the app in this process, signed in as
an admin. Prints a Markdown table: median and slowest of --runs answers per page.

    bench/ui_pages.py                          # 5,000,000 requests; about 2 minutes
    bench/ui_pages.py --requests 500000        # a quick look
    bench/ui_pages.py --db /tmp/ui.db          # keep the database (reused if it exists)

Nothing leaves this machine: the upstream is a closed port on 127.0.0.1.
"""
import argparse
import importlib
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app import create_app  # noqa: E402
from app.accounting.usage import ROW_COLUMNS, SUM_COLUMNS  # noqa: E402
from app.config import Settings  # noqa: E402
from app.keys import registry as keystore  # noqa: E402
from app.store import db as database  # noqa: E402
from app.store.models import LATENCY_BUCKETS_MS, UsageLabel, UsageRecord  # noqa: E402

DAYS = 30
KEYS, MODELS = 50, ("llama3.2:latest", "qwen2.5:7b", "mistral:latest", "phi3:mini",
                    "nomic-embed-text:latest", "gemma2:9b")
ENDPOINTS = ("/api/chat", "/api/generate", "/v1/chat/completions")


def fill(requests, seed=13):
    """Keys, labels and `requests` per-request rows over the last DAYS days, in bulk."""
    rng = random.Random(seed)
    keys = [keystore.create_key(f"user-{i}", "admin" if i == 0 else "user")[0].id
            for i in range(KEYS)]
    UsageLabel.insert_many([{"name": n} for n in MODELS + ENDPOINTS]).execute()
    labels = {label.name: label.id for label in UsageLabel.select()}
    models, endpoints = [labels[m] for m in MODELS], [labels[e] for e in ENDPOINTS]
    key_weights = [1 / (i + 1) for i in range(KEYS)]  # a few keys do most of the work
    now = time.time()
    start = now - DAYS * 86400
    hours = DAYS * 24
    rhythm = [1.5 if 8 <= (h % 24) <= 18 else 0.5 for h in range(hours)]
    per_hour = [requests * r / sum(rhythm) for r in rhythm]
    sql = (f'INSERT INTO usage_record ({", ".join(ROW_COLUMNS)}) VALUES '
           f'({", ".join("?" * len(ROW_COLUMNS))})')
    connection = database.db.connection()
    connection.execute("PRAGMA synchronous = OFF")
    written = 0
    for h in range(hours):
        count = round(per_hour[h]) if h < hours - 1 else requests - written
        key_ids = rng.choices(keys, key_weights, k=count)
        model_ids = rng.choices(models, k=count)
        rows = []
        for i in range(count):
            at = start + h * 3600 + rng.random() * 3600
            refused = rng.random() < 0.02
            status = 429 if refused else (500 if rng.random() < 0.01 else 200)
            latency = int(rng.lognormvariate(6.5, 1.0))
            completion = None if refused else rng.randint(1, 600)
            rows.append((at, key_ids[i], rng.choice(endpoints), model_ids[i], None, status,
                         3 if refused else 0, None if refused else rng.randint(5, 2000),
                         completion, latency, None if refused else latency // 4,
                         None if refused else latency // 2, 2000, False))
        with database.db.atomic():
            connection.executemany(sql, rows)
        written += count
    rollup()
    return keys


def rollup():
    """The roll-ups of every per-request row, as the usage writer would have kept them."""
    def bucket(column, prefix):
        bounds = [*LATENCY_BUCKETS_MS, None]
        out, low = [], -1
        for high in bounds:
            cond = f"{column} > {low}" + (f" AND {column} <= {high}" if high else "")
            out.append(f"SUM(CASE WHEN {cond} THEN 1 ELSE 0 END)")
            low = high
        return out

    sums = {
        "requests": "COUNT(*)",
        "errors": "SUM(CASE WHEN refusal = 0 AND status >= 400 THEN 1 ELSE 0 END)",
        "refusals": "SUM(CASE WHEN refusal != 0 THEN 1 ELSE 0 END)",
        "aborted": "SUM(aborted)",
        "prompt_tokens": "SUM(COALESCE(prompt_tokens, 0))",
        "completion_tokens": "SUM(COALESCE(completion_tokens, 0))",
        "bytes": "SUM(bytes)", "latency_ms_sum": "SUM(latency_ms)",
        "ttfb_ms_sum": "SUM(COALESCE(ttfb_ms, 0))", "ttfb_count": "COUNT(ttfb_ms)",
        "eval_ms_sum": "SUM(COALESCE(eval_ms, 0))",
        "eval_tokens": "SUM(CASE WHEN eval_ms THEN completion_tokens ELSE 0 END)",
    }
    expressions = [sums[c] for c in SUM_COLUMNS[:12]] + bucket("latency_ms", "latency") + \
        bucket("ttfb_ms", "ttfb")
    database.db.execute_sql(
        f'INSERT INTO usage_hourly (hour, key_id, model_id, endpoint_id, '
        f'{", ".join(SUM_COLUMNS)}) SELECT CAST(at / 3600 AS INTEGER) * 3600, '
        f'COALESCE(key_id, 0), COALESCE(model_id, 0), endpoint_id, {", ".join(expressions)} '
        f'FROM usage_record GROUP BY 1, 2, 3, 4')
    importlib.import_module("migrations.0007_usage_hourly").fill(database.db)
    # The fine histograms, as the writer would have kept them: rebuilt from the rows.
    importlib.import_module("migrations.0014_usage_histogram").rebuild(database.db)


def time_pages(app, admin_secret, busiest, runs):
    client = app.test_client()
    client.environ_base["HTTP_SEC_FETCH_SITE"] = "same-origin"
    assert client.post("/ui/signin", data={"key": admin_secret}).status_code == 302
    pages = [f"/ui/?range={r}" for r in ("1h", "24h", "7d", "30d")] + [
        "/ui/keys", f"/ui/keys/{busiest}?range=30d", f"/ui/keys/{busiest}?range=24h",
        "/ui/audit", "/ui/webhooks"]
    results = []
    for page in pages:
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            answer = client.get(page)
            times.append(time.perf_counter() - began)
            assert answer.status_code == 200, (page, answer.status_code)
        results.append((page, statistics.median(times), max(times)))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--db", help="SQLite file to fill (kept; reused when it exists)")
    args = parser.parse_args(argv)
    path = Path(args.db) if args.db else Path(tempfile.mkdtemp(prefix="ui-bench-")) / "gw.db"
    settings = Settings(data_dir=str(path.parent), database_url=f"sqlite:///{path}",
                        upstreams=("http://127.0.0.1:9",), connect_timeout=0.5, ui=True)
    reuse = path.exists()
    instance = database.open_database(settings.resolved_database_url)
    database.db.initialize(instance)
    database.upgrade(instance)
    with instance.connection_context():
        if reuse:
            keystore.rotate_key(1)
        began = time.perf_counter()
        if not reuse:
            fill(args.requests)
            print(f"filled {args.requests:,} requests in {time.perf_counter() - began:.0f} s")
        _, admin_secret = keystore.rotate_key(1)  # the secret of key 1 (admin) for this run
        busiest = 1
        raw = UsageRecord.select().count()
        hourly = instance.execute_sql("SELECT COUNT(*) FROM usage_hourly").fetchone()[0]
    app = create_app(settings)
    results = time_pages(app, admin_secret, busiest, args.runs)
    print(f"\n{raw:,} per-request rows, {hourly:,} hourly roll-up rows, SQLite, "
          f"{args.runs} runs per page\n")
    print("| page | median ms | slowest ms |\n|---|---:|---:|")
    for page, median, slowest in results:
        print(f"| `{page}` | {median * 1000:.0f} | {slowest * 1000:.0f} |")
    instance.close_all()


if __name__ == "__main__":
    main()
