"""Usage accounting as gunicorn runs it: several workers, signals, a database that goes away.

Usage is read back the way an admin reads it, with `ollama-gw usage --json`.
"""
import concurrent.futures
import dataclasses
import json
import os
import re
import signal
import sqlite3
import threading
import time

import pytest
import requests

from app.accounting.usage import Record
from tests.conftest import empty_database
from tests.gateway_process import GatewayProcess, wait_for
from tests.tcp_proxy import proxied_database
from tests.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.gateway
GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}  # 1 prompt token


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    return empty_database(request, tmp_path)


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def usage_of(gw, key_prefix):
    """The key's row of `ollama-gw usage --by key --json` (requests, tokens, …)."""
    rows = json.loads(gw.cli("usage", "--by", "key", "--since", "1d", "--json").stdout)
    return next((row for row in rows if row["key_prefix"] == key_prefix), None)


def test_sigterm_with_streams_in_flight_loses_no_usage_record(database, fake, tmp_path):
    with GatewayProcess(database, fake.url, workers=2) as gw:
        gw.start(tmp_path / "term.log")
        created = gw.add_key("--name", "busy", "--rate-limit", "none")
        fake.token_delay = 0.2
        started = threading.Barrier(25)
        finals = []

        def stream(_):
            answer = requests.post(gw.url + "/api/generate", headers=bearer(created["key"]),
                                   json={**GENERATE, "stream": True,
                                         "options": {"num_predict": 10}},
                                   stream=True, timeout=120)
            lines = answer.iter_lines()
            next(lines)
            started.wait(60)  # every stream is under way before SIGTERM
            finals.append(json.loads(list(lines)[-1]))

        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(stream, i) for i in range(24)]
            started.wait(60)
            gw.proc.send_signal(signal.SIGTERM)
            for future in futures:
                future.result()
        assert gw.proc.wait(90) == 0
        assert [f["eval_count"] for f in finals] == [10] * 24  # every stream finished
        recorded = usage_of(gw, created["prefix"])
    assert recorded["requests"] == 24
    assert recorded["completion_tokens"] == 240 and recorded["aborted"] == 0


def test_a_token_quota_holds_across_workers(database, fake, tmp_path):
    with GatewayProcess(database, fake.url, workers=2) as gw:
        gw.start(tmp_path / "quota.log")
        created = gw.add_key("--name", "metered", "--rate-limit", "none",
                             "--token-quota", "60/day")
        # 1 prompt + 5 completion = 6 tokens a request, reserved as it is admitted: the
        # quota allows 10, whether or not the earlier ones were charged yet.
        body = {**GENERATE, "options": {"num_predict": 5}}

        def status():
            return requests.post(gw.url + "/api/generate", json=body,
                                 headers=bearer(created["key"]), timeout=60)

        answers = [status() for _ in range(10)]
        assert [a.status_code for a in answers] == [200] * 10
        refusals = [status() for _ in range(8)]  # whichever worker takes each
        assert all(r.status_code == 429 and "token quota used up" in r.json()["error"]
                   for r in refusals)
        assert all(int(r.headers["Retry-After"]) > 0 for r in refusals)
        # Usage is written on the usage writer's turn: the last refusals a moment later.
        assert wait_for(lambda: usage_of(gw, created["prefix"])["refused"] >= 8, 30)
        recorded = usage_of(gw, created["prefix"])
        assert recorded["prompt_tokens"] + recorded["completion_tokens"] == 60


def test_metrics_are_summed_over_every_worker(database, fake, tmp_path):
    with GatewayProcess(database, fake.url, workers=2, metrics_public="true") as gw:
        gw.start(tmp_path / "metrics.log")
        key = gw.add_key("--name", "counted", "--rate-limit", "none")["key"]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: requests.post(
                gw.url + "/api/generate", json=GENERATE, headers=bearer(key),
                timeout=60).status_code, range(20)))
        assert statuses == [200] * 20
        sample = re.compile(r'^ollama_gw_requests_total\{endpoint="/api/generate",'
                            r'status="200"\} (\S+)$', re.M)
        # Each worker adds its figures on its usage writer's turn (every 0.25 s), so the
        # scrape waits for both; whichever worker answers it then reports both.
        def scrape():
            return requests.get(gw.url + "/metrics", timeout=30).text

        assert wait_for(lambda: float(sample.search(scrape()).group(1)) == 20, 30)
        for _ in range(4):
            text = scrape()
            assert float(sample.search(text).group(1)) == 20
        assert 'ollama_gw_tokens_total{kind="completion",model="llama3.2:latest"} 100.0' in text
        assert ('ollama_gw_request_duration_seconds_count{endpoint="/api/generate"} 20.0'
                in text)
        assert ('ollama_gw_request_duration_seconds_bucket{endpoint="/api/generate",le="+Inf"} '
                '20.0' in text)


def test_access_log_lines_are_json_with_the_key_prefix(database, fake, tmp_path):
    with GatewayProcess(database, fake.url, workers=1) as gw:
        gw.start(tmp_path / "access.log")
        created = gw.add_key("--name", "logged")
        requests.post(gw.url + "/api/generate", json=GENERATE, headers=bearer(created["key"]),
                      timeout=60)
        assert wait_for(lambda: '"path":"/api/generate"' in gw.log(), 30)
        line = next(line for line in gw.log().splitlines() if '"path":"/api/generate"' in line)
        entry = json.loads(line[line.index("{"):])
        assert (entry["key"], entry["status"], entry["model"]) == (
            created["prefix"], 200, "llama3.2:latest")


def test_records_made_while_postgres_is_away_are_written_once_it_is_back(
        own_postgres, fake, tmp_path):
    with proxied_database(own_postgres) as (proxy, through_proxy):
        with GatewayProcess(through_proxy, fake.url, workers=1, key_cache_seconds=300) as gw:
            gw.start(tmp_path / "away.log")
            created = gw.add_key("--name", "steady", "--rate-limit", "none")
            assert requests.post(gw.url + "/api/generate", json=GENERATE, timeout=60,
                                 headers=bearer(created["key"])).status_code == 200
            proxy.cut()
            # The key is cached and unlimited: requests need no database, only their records.
            for _ in range(5):
                assert requests.post(gw.url + "/api/generate", json=GENERATE, timeout=60,
                                     headers=bearer(created["key"])).status_code == 200
            assert wait_for(lambda: "could not write" in gw.log(), 30)
            proxy.restore()
            direct = GatewayProcess(own_postgres, fake.url)  # the CLI, not through the proxy
            assert wait_for(lambda: (usage_of(direct, created["prefix"]) or {})
                            .get("requests") == 6, 60)


def test_a_sqlite_write_that_waits_for_the_lock_does_not_stall_other_streams(fake, tmp_path):
    path = tmp_path / "locked.db"
    with GatewayProcess(f"sqlite:///{path}", fake.url, workers=1) as gw:
        gw.start(tmp_path / "locked.log")
        streaming = gw.add_key("--name", "reader", "--rate-limit", "none")["key"]
        counted = gw.add_key("--name", "writer", "--rate-limit", "1000/hour")["key"]
        fake.token_delay = 0.05
        stream = requests.post(gw.url + "/api/generate", headers=bearer(streaming),
                               stream=True, timeout=120,
                               json={**GENERATE, "stream": True,
                                     "options": {"num_predict": 200}})
        lines = stream.iter_lines()
        next(lines)
        holder = sqlite3.connect(path, isolation_level=None, timeout=30)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        waiting = concurrent.futures.ThreadPoolExecutor(1).submit(
            lambda: requests.post(gw.url + "/api/generate", json=GENERATE,
                                  headers=bearer(counted), timeout=120).status_code)
        held_until = time.monotonic() + 2
        during = 0
        while time.monotonic() < held_until:
            next(lines)
            during += 1
        holder.execute("COMMIT")
        holder.close()
        assert not waiting.done() or waiting.result() == 200
        assert waiting.result(timeout=60) == 200  # it waited for the lock, then counted
        stream.close()
    # ~40 tokens in those 2 s; a worker frozen in SQLite's busy wait relays none.
    assert during >= 10


# --- a record the database cannot store ------------------------------------------------------
# 1 prompt token + 5 completion tokens a request (fake.tokens = 5).

def generate(gw, key, body=None):
    return requests.post(gw.url + "/api/generate", headers=bearer(key), timeout=60,
                         json=GENERATE if body is None else None, data=body)


def ten_requests_are_counted_and_the_quota_holds(gw, created, recorded_before, quota):
    """10 good requests served and written after whatever came first; then the quota, used
    up exactly, refuses the next."""
    # Each asks for at most 5 tokens, as a quota key's client should (an uncapped request
    # reserves all that is left of the quota, and Ollama may use it: docs/http-api.md).
    capped = json.dumps({**GENERATE, "options": {"num_predict": 5}}).encode()
    assert [generate(gw, created["key"], capped).status_code for _ in range(10)] == [200] * 10
    assert wait_for(lambda: usage_of(gw, created["prefix"])["requests"] == recorded_before + 10,
                    60)
    recorded = usage_of(gw, created["prefix"])
    assert recorded["prompt_tokens"] + recorded["completion_tokens"] == quota
    refused = generate(gw, created["key"], capped)
    assert refused.status_code == 429 and "token quota used up" in refused.json()["error"]


def test_a_model_name_no_database_stores_is_refused_and_accounting_goes_on(
        database, fake, tmp_path):
    with GatewayProcess(database, fake.url, workers=2, data_dir=tmp_path / "data") as gw:
        gw.start(tmp_path / "poison.log")
        created = gw.add_key("--name", "poisoner", "--rate-limit", "none",
                             "--token-quota", "60/day")
        fake.tokens = 5
        for poisoned in ("\\ud800", "a\\u0000b"):
            answer = generate(gw, created["key"], b'{"model": "%s", "prompt": "hi"}' % (
                poisoned.encode()))
            assert answer.status_code == 400 and "not a model name" in answer.json()["error"]
            answer = requests.post(
                gw.url + "/v1/chat/completions", headers=bearer(created["key"]), timeout=60,
                data=b'{"model": "%s", "messages": []}' % poisoned.encode())
            assert answer.status_code == 400
            assert "not a model name" in answer.json()["error"]["message"]
        assert [r for r in fake.requests if r.method == "POST"] == []  # not its health checks
        ten_requests_are_counted_and_the_quota_holds(gw, created, 4, 60)
        # The 4 poisoned and the last: its record is written after its answer is sent.
        assert wait_for(lambda: usage_of(gw, created["prefix"])["refused"] == 5, 60)


def test_a_record_the_database_refuses_is_written_made_safe_and_accounting_goes_on(
        database, fake, tmp_path):
    """The front door takes a prompt with an unpaired surrogate, and a webhook that wants
    prompts puts it in the event stored with the record: the batch failed, forever."""
    with WebhookReceiver() as receiver, GatewayProcess(
            database, fake.url, workers=2, data_dir=tmp_path / "data") as gw:
        gw.start(tmp_path / "prompt.log")
        gw.cli("webhooks", "add", receiver.url, "--events", "request.completed",
               "--include-prompt")
        created = gw.add_key("--name", "prompter", "--rate-limit", "none",
                             "--token-quota", "66/day")
        fake.tokens = 5
        assert generate(gw, created["key"], b'{"model": "llama3.2", "prompt": "\\ud800", '
                        b'"stream": false, "options": {"num_predict": 5}}').status_code == 200
        ten_requests_are_counted_and_the_quota_holds(gw, created, 1, 66)
        assert wait_for(lambda: len(receiver.received) == 11, 60)  # one event per request
        prompts = [r.json["data"]["prompt"] for r in receiver.received]
        assert sorted(prompts) == ["hi"] * 10 + ["\ufffd"]
        assert len({r.message_id for r in receiver.received}) == 11
        assert gw.log().count("written with its text made safe") == 1


def test_a_spill_file_with_a_poisoned_record_is_written_at_start_and_accounting_goes_on(
        database, fake, tmp_path):
    data_dir = tmp_path / "data"
    with GatewayProcess(database, fake.url, workers=1, data_dir=data_dir,
                        metrics_public="true") as gw:
        created = gw.add_key("--name", "spilled", "--rate-limit", "none",
                             "--token-quota", "78/day")
        fake.tokens = 5
        spilled = Record(at=time.time(), endpoint="/api/generate", status=200, latency_ms=5,
                         key_id=created["id"], key_prefix=created["prefix"], key_name="spilled",
                         quota_period="day", model="llama3.2:latest", prompt_tokens=1,
                         completion_tokens=5)
        lines = [json.dumps(dataclasses.asdict(dataclasses.replace(spilled, model=model)))
                 for model in ("\ud800", "a\x00b")]  # written as their JSON escapes
        lines.append(json.dumps({**dataclasses.asdict(spilled), "from_a_later_version": 1}))
        lines.append('{"at": 1, "endpoint": "/api/gen')  # cut short
        data_dir.mkdir()
        (data_dir / "usage-spill-1-1.jsonl").write_text("\n".join(lines) + "\n")
        gw.start(tmp_path / "spill.log")
        ten_requests_are_counted_and_the_quota_holds(gw, created, 3, 78)
        dead = data_dir / "usage-dead-letters.jsonl"
        assert os.stat(dead).st_mode & 0o777 == 0o600
        assert [json.loads(line)["line"] for line in dead.read_text().splitlines()] == [
            lines[-1]]
        assert "ollama_gw_usage_dead_letters_total 1.0" in requests.get(
            gw.url + "/metrics", timeout=30).text
        # The spilled, the ten and the refused one, whose record is written after its answer.
        expected = {"\ufffd": 1, "llama3.2:latest": 12,
                    "a\x00b" if "sqlite" in database else "ab": 1}

        def by_model():
            models = json.loads(gw.cli("usage", "--by", "model", "--since", "1d", "--json").stdout)
            return {row["model"]: row["requests"] for row in models}

        assert wait_for(lambda: by_model() == expected, 60), by_model()
