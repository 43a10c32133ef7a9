"""Do webhook deliveries slow client requests? (issue 7: "a hanging receiver never delays one")

One gateway (`ollama-gw serve --workers 2`, SQLite) answers sequential non-streamed
`/api/generate` requests in three phases: no webhooks; a receiver that hangs, with
hundreds of deliveries due (every sender of both workers stuck on it); a receiver that
answers at once, with thousands due (the senders busy the whole time). It prints each
phase's request latency and how many deliveries were sent meanwhile.

    bench/webhooks.py [--requests 300] [--deliveries 2000]

All traffic stays on 127.0.0.1; every process and server started is stopped at the end.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
import run as bench  # noqa: E402  (the bench's process and gateway helpers)

from app.store import db as database  # noqa: E402
from app.store.models import WebhookDelivery  # noqa: E402
from app.webhooks import outbox as hooks  # noqa: E402
from tests.webhook_receiver import WebhookReceiver  # noqa: E402

WEBHOOK_ENV = {"OLLAMA_GW_WEBHOOK_TIMEOUT": "120", "OLLAMA_GW_WEBHOOK_CONCURRENCY": "8"}


def start_gateway(run, url):
    env = {**run.gateway_env(url), **WEBHOOK_ENV}
    key = run.add_key(env)
    port = bench.free_port()
    proc = run.procs.start("gw-webhooks", [*bench.ollama_gw_command(), "serve", "--bind",
                                           f"127.0.0.1:{port}", "--workers", "2"],
                           run.out / "gw-webhooks.log", env=env)
    gateway = f"http://127.0.0.1:{port}"
    bench.wait_http(gateway + "/health", proc, "gateway", timeout=60)
    return gateway, key


def latencies(gateway, key, count):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = b'{"model": "llama3.2", "prompt": "hi", "stream": false}'
    taken = []
    for _ in range(count):
        started = time.perf_counter()
        status, _, _ = bench.http("POST", gateway + "/api/generate", body, headers, timeout=30)
        taken.append((time.perf_counter() - started) * 1000)
        if status != 200:
            raise RuntimeError(f"a request got {status}")
    taken.sort()
    return {"p50": statistics.median(taken), "p99": taken[int(len(taken) * 0.99) - 1],
            "max": taken[-1]}


def enqueue(count):
    with database.db.connection_context(), database.db.atomic():
        hooks.subscriptions.invalidate()
        for n in range(count):
            hooks.enqueue("quota.exceeded", {"n": n})


def delivered():
    with database.db.connection_context():
        return WebhookDelivery.select().where(WebhookDelivery.state == "delivered").count()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--deliveries", type=int, default=2000)
    args = parser.parse_args(argv)
    run = bench.Bench(bench.parse_args(["--quick"]))
    rows = []
    url = f"sqlite:///{Path(tempfile.mkdtemp(prefix='bench-hooks-')) / 'gw.db'}"
    try:
        run.start_upstream()
        gateway, key = start_gateway(run, url)
        instance = database.open_database(url)
        database.db.initialize(instance)
        latencies(gateway, key, 20)  # warm both workers
        rows.append(("no webhooks", latencies(gateway, key, args.requests), 0, 0))
        with WebhookReceiver() as hanging:
            hanging.hang = True
            with database.db.connection_context():
                hooks.add_webhook(hanging.url, "quota.exceeded")
            enqueue(args.deliveries // 4)
            if not hanging.wait(lambda r: r.hanging >= 16, 60):
                raise RuntimeError(f"only {hanging.hanging} deliveries hang; 16 expected")
            figures = latencies(gateway, key, args.requests)
            rows.append(("receiver hangs, all 16 senders stuck", figures, len(hanging.received),
                         delivered()))
            with database.db.connection_context():
                hooks.Webhook.delete().execute()
        with WebhookReceiver() as quick:
            with database.db.connection_context():
                hooks.add_webhook(quick.url, "quota.exceeded")
            enqueue(args.deliveries)
            before = delivered()
            started = time.monotonic()
            figures = latencies(gateway, key, args.requests)
            seconds = time.monotonic() - started
            sent = delivered() - before
            rows.append((f"receiver answers at once ({sent / seconds:.0f} deliveries/s)",
                         figures, len(quick.received), sent))
        instance.close_all()
    finally:
        run.procs.stop_all()
        run.cleanup()
    print(f"{args.requests} sequential non-streamed /api/generate requests per phase, "
          "gw-sqlite, 2 workers, webhook_concurrency 8\n")
    print("| phase | p50 ms | p99 ms | max ms | receiver saw | delivered |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, f, seen, done in rows:
        print(f"| {label} | {f['p50']:.2f} | {f['p99']:.2f} | {f['max']:.1f} | {seen} | {done} |")


if __name__ == "__main__":
    main()
