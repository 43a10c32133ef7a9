"""CPU cost of the gateway's hot path, in-process, before and after a change.

Load tests on a small shared machine move by ±20 % from one minute to the next; CPU
time per call, measured in alternating rounds, shows a 50 µs change reliably. This
calls the pieces of one /api/generate request directly, without gunicorn or sockets
on the client side (the fake upstream still answers over loopback):

  admit     Limiter.admit(key): the rate-limit upsert in its transaction
  queue     FairQueue.acquire() and release() of a slot at an upstream with slots free
  send      Upstream.send() of a non-streaming request, body read, response closed
  request   the whole Flask request through app.test_client(): auth, admit, send, relay
  write200  UsageWriter._write() of a batch of 200 records (rows, roll-ups, histograms),
            per batch, not per call; into hours already written (the steady state)

    python bench/hotpath.py                          # this checkout
    python bench/hotpath.py --baseline-src ../old    # this checkout vs another, alternating
    python bench/hotpath.py --postgres               # on PostgreSQL (default: SQLite)

Prints µs of CPU per call (median over rounds of each round's mean).
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BODY = {"model": "llama3.2", "prompt": "Why is the sky blue?", "stream": False,
        "options": {"num_predict": 32}}


def measure(src, key, calls):
    """Runs in a fresh process whose sys.path starts at `src`; prints one JSON line."""
    sys.path.insert(0, src)
    os.chdir(src)
    from app import create_app
    from app.keys.registry import KeyInfo, hash_key
    from app.store.models import ApiKey

    app = create_app()
    with app.app_context():
        info = KeyInfo.from_row(ApiKey.get(ApiKey.key_hash == hash_key(key)))
    limiter = app.extensions["limiter"]
    # One Upstream before several upstreams existed (an older checkout), a pool after.
    upstream = app.extensions.get("upstream") or app.extensions["upstreams"].members[0].client
    body = json.dumps(BODY).encode()
    client = app.test_client()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def admit():
        with app.app_context():
            limiter.admit(info)

    def send():
        response = upstream.send("POST", "/api/generate", b"",
                                 {"Content-Type": "application/json"}, body)
        for _ in response.raw.stream(65536, decode_content=False):
            pass
        response.close()

    queue = app.extensions.get("fair_queue")

    def enter_and_leave():
        with app.app_context():
            queue.release(queue.acquire("bench", 100000, info))

    def request():
        response = client.post("/api/generate", data=body, headers=headers)
        response.get_data()
        assert response.status_code == 200, response.status_code
        response.close()

    from app.accounting.usage import Record, UsageWriter

    writer, rng = UsageWriter(), random.Random(1)
    batch = [Record(at=time.time() - rng.random() * 3600, endpoint=rng.choice(
        ("/api/chat", "/api/generate", "/v1/chat/completions")), status=200,
        latency_ms=max(1, round(rng.lognormvariate(7, 1.2))), key_id=rng.randint(1, 20),
        model=rng.choice(("llama3.2:latest", "qwen2.5:7b", "mistral:7b")), prompt_tokens=30,
        completion_tokens=200, ttfb_ms=max(1, round(rng.lognormvariate(5, 1))), eval_ms=900)
        for _ in range(200)]

    def write200():
        writer._write(batch)

    result = {}
    pieces = {"admit": admit, "queue": enter_and_leave, "send": send, "request": request,
              "write200": write200}
    if queue is None:  # a checkout from before the fair queue
        del pieces["queue"]
    for name, fn in pieces.items():
        times = max(1, calls // 20) if name == "write200" else calls  # 200 records a call
        for _ in range(min(200, times)):
            fn()
        start = time.process_time()
        for _ in range(times):
            fn()
        result[name] = (time.process_time() - start) / times * 1e6
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", default=str(REPO), help="checkout to measure [this one]")
    parser.add_argument("--baseline-src", help="another checkout, measured in alternation")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1000, help="calls per piece and round")
    parser.add_argument("--postgres", action="store_true",
                        help="use a throw-away PostgreSQL database (postgres@127.0.0.1:5432)")
    parser.add_argument("--worker", nargs=2, metavar=("SRC", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return measure(args.worker[0], args.worker[1], args.calls)

    srcs = {"this": str(Path(args.src).resolve())}
    if args.baseline_src:
        srcs["baseline"] = str(Path(args.baseline_src).resolve())
    port = _free_port()
    work = Path(tempfile.mkdtemp(prefix="ollama-gw-hotpath-"))
    upstream = subprocess.Popen([sys.executable, str(BENCH / "fake_upstream.py"),
                                 "--port", str(port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    pg_admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    dbs = []
    try:
        envs, keys = {}, {}
        for label, src in srcs.items():
            if args.postgres:
                import psycopg2

                name = f"ollama_gw_hotpath_{os.getpid()}_{label}"
                conn = psycopg2.connect(pg_admin)
                conn.autocommit = True
                conn.cursor().execute(f'CREATE DATABASE "{name}"')
                conn.close()
                dbs.append(name)
                url = pg_admin.rsplit("/", 1)[0] + "/" + name
            else:
                url = f"sqlite:///{work / label}.db"
            env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_GW_")}
            env.update({"DATABASE_URL": url, "OLLAMA_URL": f"http://127.0.0.1:{port}",
                        "PYTHONPATH": src, "OLLAMA_GW_LOG_LEVEL": "warning"})
            out = subprocess.run(
                [sys.executable, "-c", "from cli import main; main()", "keys", "add",
                 "--name", "hotpath", "--rate-limit", "100000000/minute", "--json"],
                env=env, cwd=src, capture_output=True, text=True, check=True, timeout=60)
            envs[label], keys[label] = env, json.loads(out.stdout)["key"]
        samples = {label: [] for label in srcs}
        for round_ in range(args.rounds):
            for label, src in srcs.items():
                out = subprocess.run(
                    [sys.executable, __file__, "--calls", str(args.calls), "--worker", src,
                     keys[label]], env=envs[label], cwd=src, capture_output=True, text=True,
                    timeout=600)
                if out.returncode != 0:
                    sys.exit(f"{label} failed:\n{out.stderr[-3000:]}")
                samples[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {round_ + 1} {label:8} " + "  ".join(
                    f"{k} {v:6.0f} µs" for k, v in samples[label][-1].items()),
                    file=sys.stderr, flush=True)
        print(f"CPU µs per call, median of {args.rounds} rounds × {args.calls} calls "
              f"({'PostgreSQL' if args.postgres else 'SQLite'}):")
        pieces = [k for k in ("admit", "queue", "send", "request", "write200")
                  if all(k in s for ss in samples.values() for s in ss)]
        print(f"{'':10}" + "".join(f"{k:>10}" for k in pieces))
        for label in srcs:
            print(f"{label:10}" + "".join(
                f"{statistics.median(s[k] for s in samples[label]):10.0f}" for k in pieces))
    finally:
        upstream.terminate()
        upstream.wait(10)
        if dbs:
            import psycopg2

            conn = psycopg2.connect(pg_admin)
            conn.autocommit = True
            for name in dbs:
                conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.close()
        for path in work.iterdir():
            path.unlink()
        work.rmdir()


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
