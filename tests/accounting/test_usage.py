"""Usage accounting in-process: what each request used, the roll-up, quotas, statistics.

Requests go through the gateway to the fake Ollama on a real socket; the test then
writes the usage buffer (`flush`) and reads what reached the database.
"""
import dataclasses
import json
import logging
import os
import re
import time

import pytest
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from app import create_app
from app.accounting import stats
from app.accounting.dead_letters import DeadLetters
from app.accounting.request_record import ACCESS_LOG, flush_at_exit
from app.accounting.usage import REFUSALS, Record, UsageWriter, load_spills, spill, token_counts
from app.admission import estimate
from app.store import db as database
from app.store.models import (
    TokenUsage,
    UsageDailyKey,
    UsageHourly,
    UsageLabel,
    UsageRecord,
    WebhookDelivery,
)
from app.webhooks import outbox as webhooks
from tests.conftest import auth_header
from tests.fake_ollama import fake_text

GENERATE = {"model": "llama3.2", "prompt": "why is the sky blue"}  # 5 prompt words
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello there"}]}


class ClosingClient(FlaskClient):
    """Reads each answer to its end and closes it, as a WSGI server does: that is when a
    request's usage is taken. `buffered=False` keeps an answer open, to read it slowly."""

    def open(self, *args, buffered=True, **kwargs):
        return super().open(*args, buffered=buffered, **kwargs)


@pytest.fixture
def make_client(settings, migrated):
    def make(**overrides):
        app = create_app(dataclasses.replace(settings, **overrides))
        app.config["TESTING"] = True
        app.test_client_class = ClosingClient
        return app.test_client()

    return make


@pytest.fixture
def client(make_client):
    return make_client()


def flush(client):
    """Write everything the gateway has buffered; the rows, in order."""
    assert client.application.extensions["usage"].write_pending()
    return list(UsageRecord.select().order_by(UsageRecord.id))


def label(row_id):
    return UsageLabel.get_by_id(row_id).name if row_id else None


@pytest.mark.parametrize("path, body", [
    ("/api/generate", {**GENERATE, "stream": False}),
    ("/api/generate", GENERATE),
    ("/api/chat", {**CHAT, "stream": False}),
    ("/api/chat", CHAT),
], ids=["generate", "generate streamed", "chat", "chat streamed"])
def test_a_completed_answer_records_ollamas_token_counts(client, make_key, fake, path, body):
    secret, key = make_key()
    fake.tokens, fake.token_delay = 7, 0.05  # a line every 50 ms: 350 ms in all
    response = client.post(path, json=body, headers=auth_header(secret))
    assert response.status_code == 200
    [row] = flush(client)
    prompt_words = 5 if path == "/api/generate" else 2
    assert (row.prompt_tokens, row.completion_tokens) == (prompt_words, 7)
    assert (row.key_id, label(row.endpoint_id), label(row.model_id)) == (
        key.id, path, "llama3.2:latest")
    assert (row.status, row.refusal, row.aborted) == (200, 0, False)
    assert row.bytes == len(response.data)
    # From the arrival to Ollama's first byte: its first line (after 50 ms) when streamed,
    # the whole answer (after 350 ms) when not; the rest of a stream comes after.
    if body.get("stream") is False:
        assert 350 <= row.ttfb_ms <= row.latency_ms
    else:
        assert 50 <= row.ttfb_ms <= row.latency_ms - 250
    assert label(row.upstream_id) == fake.url.split("//")[1]  # its name: host:port


def test_a_record_is_dated_when_its_request_arrived_not_when_its_answer_ended(
        client, make_key, fake):
    """Its hour, day and quota period are those it arrived in: an answer that ends after
    midnight charges the day it was asked on."""
    secret, _ = make_key()
    fake.tokens, fake.token_delay = 7, 0.05  # the answer ends 350 ms after it began
    sent = time.time()
    assert client.post("/api/generate", json=GENERATE, headers=auth_header(secret)).status_code \
        == 200
    answered = time.time()
    [row] = flush(client)
    assert sent <= row.at <= answered - 0.3
    assert row.latency_ms >= 350


def test_embeddings_record_their_prompt_tokens(client, make_key, fake):
    secret, _ = make_key()
    body = {"model": "nomic-embed-text", "input": ["one two", "three"]}
    assert client.post("/api/embed", json=body, headers=auth_header(secret)).status_code == 200
    [row] = flush(client)
    assert (row.prompt_tokens, row.completion_tokens) == (3, None)


def test_an_aborted_stream_records_the_tokens_relayed_so_far(client, make_key, fake):
    secret, _ = make_key()
    fake.tokens, fake.token_delay = 50, 0.05
    response = client.post("/api/generate", json=GENERATE, headers=auth_header(secret),
                           buffered=False)
    chunks = iter(response.response)
    relayed = [json.loads(next(chunks)) for _ in range(3)]
    response.close()  # the client hangs up after three tokens
    assert fake.wait_for_cancellation(30)
    [row] = flush(client)
    assert row.aborted is True
    assert row.completion_tokens == len(relayed) == 3  # counted, never a silent zero
    # Ollama never said: the gateway's estimate, marked as one, never a silent zero.
    assert (row.prompt_tokens, row.prompt_estimated) == (
        estimate.prompt_tokens(GENERATE), True)


@pytest.mark.parametrize("make_request, status, refusal", [
    (lambda c, s: c.post("/api/generate", json=GENERATE), 401, "auth"),
    (lambda c, s: c.post("/api/pull", json={"model": "x"}, headers=auth_header(s)), 403,
     "forbidden"),
    (lambda c, s: c.post("/api/generate", data=b"{", headers=auth_header(s)), 400, "invalid"),
], ids=["no key", "admin only", "bad json"])
def test_refusals_are_recorded_with_their_reason(client, make_key, fake, make_request, status,
                                                 refusal):
    secret, key = make_key()
    assert make_request(client, secret).status_code == status
    [row] = flush(client)
    assert (row.status, row.refusal) == (status, REFUSALS[refusal])
    assert row.key_id == (None if refusal == "auth" else key.id)
    assert fake.requests == []


def test_rate_limit_refusals_are_recorded(client, make_key, fake):
    secret, key = make_key(rate_limit="1/hour")
    statuses = [client.get("/api/version", headers=auth_header(secret)).status_code
                for _ in range(3)]
    assert statuses == [200, 429, 429]
    rows = flush(client)
    assert [r.refusal for r in rows] == [0, REFUSALS["rate"], REFUSALS["rate"]]


def test_an_ollama_crash_mid_stream_counts_as_an_error(client, make_key, fake):
    secret, _ = make_key()
    fake.fail_after_tokens = 2
    assert client.post("/api/generate", json=GENERATE,
                       headers=auth_header(secret)).status_code == 200
    [row] = flush(client)
    assert (row.status, row.completion_tokens) == (502, 2)


def test_the_hourly_roll_up_adds_up_the_rows(client, make_key, fake):
    secret, key = make_key()
    fake.tokens = 4
    for _ in range(3):
        client.post("/api/generate", json={**GENERATE, "stream": False},
                    headers=auth_header(secret))
    client.post("/api/chat", json={**CHAT, "stream": False}, headers=auth_header(secret))
    rows = flush(client)
    hourly = list(UsageHourly.select())
    assert sum(h.requests for h in hourly) == len(rows) == 4
    assert sum(h.prompt_tokens for h in hourly) == sum(r.prompt_tokens for r in rows) == 17
    assert sum(h.completion_tokens for h in hourly) == 16
    assert {h.key_id for h in hourly} == {key.id}


def test_the_hourly_roll_up_sums_first_byte_times_apart_from_whole_answers(migrated, make_key):
    _, alice = make_key(name="alice")
    _, bob = make_key(name="bob")
    hour = (int(time.time()) // 3600 - 1) * 3600  # the last hour, wholly past
    writer = idle_writer()
    for key, latency, ttfb in ((alice, 900, 120), (alice, 400, None), (bob, 7000, 6000),
                               (alice, 500, 80)):  # None: refused before any first byte
        writer.add(ended(hour + 60, key_id=key.id, latency_ms=latency, ttfb_ms=ttfb))
    assert writer.write_pending()
    hourly = {h.key_id: (h.requests, h.latency_ms_sum, h.ttfb_ms_sum, h.ttfb_count)
              for h in UsageHourly.select().where(UsageHourly.hour == hour)}
    assert hourly == {alice.id: (3, 1800, 200, 2), bob.id: (1, 7000, 6000, 1)}


def test_tokens_per_second_are_completion_tokens_over_ollamas_eval_time(migrated, make_key):
    """Only answers Ollama timed count (eval_ms): a cut-off stream's tokens have no time."""
    _, alice = make_key(name="alice")
    _, bob = make_key(name="bob")
    hour = (int(time.time()) // 3600 - 1) * 3600
    writer = idle_writer()
    for key, prompt, completion, eval_ms in ((alice, 10, 30, 600), (alice, 7, 12, None),
                                             (bob, 1000, 1, 100), (alice, 5, 20, 400)):
        writer.add(ended(hour + 60, key_id=key.id, prompt_tokens=prompt,
                         completion_tokens=completion, eval_ms=eval_ms))
    assert writer.write_pending()
    hourly = {h.key_id: (h.prompt_tokens, h.completion_tokens, h.eval_ms_sum, h.eval_tokens)
              for h in UsageHourly.select().where(UsageHourly.hour == hour)}
    assert hourly == {alice.id: (22, 62, 1000, 50), bob.id: (1000, 1, 100, 1)}
    by_key = {row["key_name"]: row["tokens_per_second"] for row in stats.usage(None, "key")}
    assert by_key == {"alice": 50.0, "bob": 10.0}  # 50 tokens in 1 s; 1 in 0.1 s


def test_statistics_by_key_model_and_day(client, make_key, fake):
    alice, alice_row = make_key(name="alice")
    bob, _ = make_key(name="bob")
    fake.tokens = 3
    for secret, model, times in ((alice, "llama3.2", 2), (bob, "qwen2.5:0.5b", 1)):
        for _ in range(times):
            client.post("/api/generate", json={"model": model, "prompt": "hi", "stream": False},
                        headers=auth_header(secret))
    client.post("/api/generate", json=GENERATE)  # refused: no key
    flush(client)
    by_key = {row["key_name"]: row for row in stats.usage(time.time() - 3600, "key")}
    assert by_key["alice"]["requests"] == 2 and by_key["alice"]["completion_tokens"] == 6
    assert by_key["bob"]["requests"] == 1
    assert by_key[None]["refused"] == 1
    assert by_key["alice"]["latency_ms_p50"] is not None
    by_model = {row["model"]: row["requests"] for row in stats.usage(None, "model")}
    assert by_model == {"llama3.2:latest": 2, "qwen2.5:0.5b": 1, None: 1}
    [today] = stats.usage(None, "day", key_id=alice_row.id)
    assert today["day"] == time.strftime("%Y-%m-%d", time.gmtime())


@pytest.mark.parametrize("counts, q, expected", [
    ([0] * 14, 0.5, None),
    ([10] + [0] * 13, 0.5, 12.5),  # all in (0, 25]: the middle of the bucket
    ([0, 0, 10] + [0] * 11, 0.95, 97.5),  # (50, 100]
    ([0] * 13 + [4], 0.5, 300000.0),  # beyond the last bound: at least that
])
def test_percentiles_are_read_from_the_histogram(counts, q, expected):
    assert stats.percentile(counts, q) == expected


def test_token_counts_are_read_from_the_last_bytes_of_an_answer():
    final = b'{"done":true,"prompt_eval_count":12,"eval_count":34,"eval_duration":2500000000}\n'
    assert token_counts(b'{"response":"x"}\n' + final, 2, True) == (12, 34, 2500)
    assert token_counts(b'{"response":"x"}\n' * 3, 3, False) == (None, 3, None)
    assert token_counts(b'{"response":"x"}\n' * 3, 3, False, 7) == (7, 3, None)
    assert token_counts(b"", 0, True) == (None, None, None)


# --- token quotas ------------------------------------------------------------------------------

def test_a_token_quota_refuses_once_used_up_and_says_when_it_resets(client, make_key, fake):
    secret, key = make_key(token_quota="12/day")
    # 5 prompt + 4 completion = 9 tokens (the cap, as a quota key without one would be
    # capped at what is left)
    body = {**GENERATE, "stream": False, "options": {"num_predict": 4}}
    for _ in range(2):  # 0 and 9 tokens used before each: both admitted
        assert client.post("/api/generate", json=body, headers=auth_header(secret)).status_code \
            == 200
        flush(client)
    refused = client.post("/api/generate", json=body, headers=auth_header(secret))
    assert refused.status_code == 429
    message = refused.get_json()["error"]
    assert "token quota used up" in message and "12/day" in message and "used 18" in message
    midnight = (int(time.time()) // 86400 + 1) * 86400
    assert abs(int(refused.headers["Retry-After"]) - (midnight - time.time())) <= 5
    assert len(fake.requests) == 2
    [charged] = TokenUsage.select().where(TokenUsage.key_id == key.id)
    assert charged.tokens == 18
    rows = flush(client)
    assert rows[-1].refusal == REFUSALS["quota"]


def test_a_quota_key_without_an_answer_cap_is_capped_at_what_is_left(client, make_key, fake):
    secret, _ = make_key(token_quota="12/day")
    body = {**GENERATE, "stream": False}  # 5 prompt tokens estimated, no num_predict
    assert client.post("/api/generate", json=body, headers=auth_header(secret)).status_code \
        == 200
    assert fake.requests[-1].json()["options"] == {"num_predict": 12 - 5}


def quota_warnings(client):
    """The quota.warning webhooks' data so far, oldest first (after the usage writer's turn)."""
    flush(client)
    return [json.loads(d.payload)["data"] for d in WebhookDelivery.select()
            .where(WebhookDelivery.event == "quota.warning").order_by(WebhookDelivery.id)]


def test_quota_warning_is_sent_once_when_used_tokens_reach_the_share(client, make_key, fake):
    secret, key = make_key(token_quota="100/day")
    webhooks.add_webhook("http://127.0.0.1:9/hook", "quota.warning")

    def embed():  # one token
        assert client.post("/api/embed", headers=auth_header(secret), json={
            "model": "nomic-embed-text", "input": "one"}).status_code == 200

    assert client.post("/api/generate", headers=auth_header(secret), json={
        "model": "llama3.2", "prompt": "hi", "stream": False,
        "options": {"num_predict": 78}}).status_code == 200
    assert quota_warnings(client) == []  # 79 used: below 80 % of 100
    embed()
    assert quota_warnings(client) == [{
        "key_id": key.id, "key_prefix": key.prefix, "key_name": key.name, "token_quota": 100,
        "period": "day", "tokens_used": 80, "warning_at": 80}]
    embed()
    assert len(quota_warnings(client)) == 1  # 81: past it already, no second warning this period


def test_quota_warning_is_due_at_the_share_where_its_product_is_inexact(make_client, make_key,
                                                                        fake):
    """0.55 x 100 is 55.00000000000001 in floating point: the warning is due at 55, not 56."""
    client = make_client(quota_warning_share=0.55)
    secret, key = make_key(token_quota="100/day")
    webhooks.add_webhook("http://127.0.0.1:9/hook", "quota.warning")

    assert client.post("/api/generate", headers=auth_header(secret), json={
        "model": "llama3.2", "prompt": "hi", "stream": False,
        "options": {"num_predict": 53}}).status_code == 200
    assert quota_warnings(client) == []  # 54 used
    assert client.post("/api/embed", headers=auth_header(secret), json={
        "model": "nomic-embed-text", "input": "one"}).status_code == 200
    assert [(w["tokens_used"], w["warning_at"]) for w in quota_warnings(client)] == [(55, 55)]


def test_a_record_made_before_midnight_but_written_after_charges_the_day_it_was_made(
        migrated, make_key, tmp_path):
    """Records wait in the buffer (a database outage's backlog) or in a spill file (an exit
    while the database was away): whenever they are written, they count on the day, hour and
    quota period they were made, never on the day they reached the database."""
    _, key = make_key(token_quota="1000/day")
    midnight = int(time.time()) // 86400 * 86400
    yesterday = midnight - 86400

    def made_before_midnight():
        return Record(at=midnight - 0.5, endpoint="/api/generate", status=200, latency_ms=5,
                      key_id=key.id, quota_period="day", prompt_tokens=3, completion_tokens=4)

    spill([made_before_midnight()], tmp_path)
    writer = UsageWriter()
    writer._thread = object()  # no writer thread: the test runs the turn
    assert load_spills(tmp_path, writer) == 1
    writer.add(made_before_midnight())  # the backlog kept in memory
    assert writer.write_pending()
    assert [(t.period_start, t.tokens) for t in TokenUsage.select()] == [(yesterday, 14)]
    assert [(d.day, d.requests) for d in UsageDailyKey.select()] == [(yesterday, 2)]
    assert [(h.hour, h.requests) for h in UsageHourly.select()] == [(midnight - 3600, 2)]
    [day] = stats.usage(None, "day", key_id=key.id)
    assert day["day"] == time.strftime("%Y-%m-%d", time.gmtime(yesterday))


def test_a_key_whose_usage_exactly_equals_its_quota_is_refused(client, make_key, fake):
    secret, _ = make_key(token_quota="9/day")
    fake.tokens = 4
    body = {**GENERATE, "stream": False}  # 5 prompt + 4 completion = exactly 9 tokens
    assert client.post("/api/generate", json=body, headers=auth_header(secret)).status_code == 200
    flush(client)
    refused = client.post("/api/generate", json=body, headers=auth_header(secret))
    assert refused.status_code == 429 and "used 9" in refused.get_json()["error"]


def test_keys_without_a_quota_are_not_charged(client, make_key, fake):
    secret, _ = make_key()
    client.post("/api/generate", json={**GENERATE, "stream": False}, headers=auth_header(secret))
    flush(client)
    assert TokenUsage.select().count() == 0


# --- nothing lost ------------------------------------------------------------------------------

def test_records_the_database_refuses_at_exit_are_spilled_and_loaded_by_the_next_gateway(
        settings, migrated, tmp_path):
    records = [Record(at=time.time(), endpoint="/api/generate", status=200, latency_ms=5,
                      key_id=1, prompt_tokens=3, completion_tokens=4) for _ in range(3)]
    app = create_app(dataclasses.replace(settings, data_dir=str(tmp_path)))
    writer = app.extensions["usage"]
    for record in records:
        writer._buffer.append(record)  # buffered, as if requests had just ended
    migrated.close_all()
    broken = dataclasses.replace(settings, database_url="postgresql://x@127.0.0.1:1/gone")
    from app.store import db as database

    database.db.initialize(database.open_database(broken.database_url))
    flush_at_exit(app, seconds=0.5)
    assert len(list(tmp_path.glob("usage-records-*.jsonl"))) == 1
    # Gateways before this one load usage-spill-*.jsonl and fail on a field they do not
    # know, leaving the file stuck: they must not find this one during a rolling upgrade.
    assert list(tmp_path.glob("usage-spill-*.jsonl")) == []
    database.db.initialize(migrated)
    fresh = UsageWriter()
    assert load_spills(tmp_path, fresh) == 3
    assert fresh.write_pending()
    assert [r.completion_tokens for r in UsageRecord.select()] == [4, 4, 4]
    assert list(tmp_path.glob("usage-*")) == [] and list(tmp_path.glob("loading-*")) == []
    fresh.stop()


def test_a_full_buffer_drops_its_oldest_records_and_counts_them():
    writer = UsageWriter(capacity=3)
    writer._thread = object()  # no writer thread: nothing empties the buffer here
    for i in range(5):
        writer.add(Record(at=float(i), endpoint="/api/tags", status=200, latency_ms=1))
    assert writer.dropped == 2
    assert [r.at for r in writer.take_all()] == [2.0, 3.0, 4.0]


def test_records_that_arrive_while_the_writer_writes_wait_for_its_next_turn(migrated):
    """A busy gateway writes usage a turn (usage_flush_seconds) at a time: a writer that
    chased each record arriving mid-write ran a transaction every few milliseconds."""
    def ended(at):
        return Record(at=at, endpoint="/api/generate", status=200, latency_ms=5)

    arriving = [ended(3.0)]
    writer = UsageWriter(on_batch=lambda records: arriving and writer.add(arriving.pop()))
    writer._thread = object()  # no writer thread: the test runs the turns
    writer.add(ended(1.0))
    writer.add(ended(2.0))
    assert writer.write_pending()
    assert sorted(r.at for r in UsageRecord.select()) == [1.0, 2.0]
    assert writer.depth == 1  # the record that ended during the write
    assert writer.write_pending()
    assert sorted(r.at for r in UsageRecord.select()) == [1.0, 2.0, 3.0]
    assert writer.depth == 0


# --- a record the database cannot store ------------------------------------------------------

POISONED = ["\\ud800", "a\\u0000b"]  # as a JSON body spells them: unpaired surrogate, NUL


@pytest.mark.parametrize("path, body", [
    ("/api/generate", '{"model": "%s", "prompt": "hi"}'),
    ("/api/chat", '{"model": "%s", "messages": []}'),
    ("/api/embed", '{"model": "%s", "input": "hi"}'),
    ("/api/embeddings", '{"model": "%s", "prompt": "hi"}'),
    ("/api/show", '{"name": "%s"}'),
    ("/api/pull", '{"model": "%s"}'),
    ("/api/not-yet-known", '{"model": "%s"}'),  # relayed as it is (for admin keys)
    ("/generate", '{"model": "%s", "prompt": "hi"}'),  # go-ollama-api's route
    ("/v1/chat/completions", '{"model": "%s", "messages": []}'),
    ("/v1/completions", '{"model": "%s", "prompt": "hi"}'),
    ("/v1/embeddings", '{"model": "%s", "input": "hi"}'),
    ("/v1/responses", '{"model": "%s", "input": "hi"}'),
])
@pytest.mark.parametrize("poisoned", POISONED, ids=["surrogate", "nul"])
def test_a_model_name_no_database_stores_is_refused_on_every_relaying_endpoint(
        client, make_key, fake, path, body, poisoned):
    secret, key = make_key(role="admin" if "not-yet-known" in path else "user")
    answer = client.post(path, data=(body % poisoned).encode(), headers={
        **auth_header(secret), "Content-Type": "application/json"})
    assert answer.status_code == 400
    error = answer.get_json()["error"]
    if path.startswith("/v1/"):
        assert error["type"] == "invalid_request_error" and "not a model name" in error["message"]
    else:
        assert "not a model name" in error
    assert fake.requests == []
    [row] = flush(client)  # the refusal is recorded, without the name
    assert (row.key_id, row.model_id, row.refusal) == (key.id, None, REFUSALS["invalid"])


def test_a_model_name_in_a_url_path_is_never_one_no_database_stores(client, make_key, fake):
    """/v1/models/{model}: a URL's unpaired surrogate decodes to U+FFFD, its NUL is refused."""
    secret, _ = make_key()
    assert client.get("/v1/models/a%00b", headers=auth_header(secret)).status_code == 400
    client.get("/v1/models/%ED%A0%80", headers=auth_header(secret))
    assert [r.path for r in fake.requests] == ["/v1/models/" + "%EF%BF%BD" * 3]


def ended(at, **fields):
    return Record(**{"at": at, "endpoint": "/api/generate", "status": 200, "latency_ms": 5,
                     "model": "llama3.2:latest", "prompt_tokens": 1, **fields})


def idle_writer(**options):
    """A writer without its thread: the test runs its turns."""
    writer = UsageWriter(**options)
    writer._thread = object()
    return writer


@pytest.fixture
def dead_lettered():
    """How many records were moved to the dead letters since the test began (the metric)."""
    def counted():
        return REGISTRY.get_sample_value("ollama_gw_usage_dead_letters_total") or 0

    before = counted()
    return lambda: counted() - before


# The model's label fails the batch's first statement; the prompt, only its last (the
# webhook event, stored in the same transaction).
POISONS = {"model": "a\x00b\ud800", "prompt": "llama3.2:latest"}


@pytest.mark.parametrize("poisoned", POISONS)
@pytest.mark.parametrize("position", [0, 3, 6], ids=["first", "middle", "last"])
def test_a_record_that_fails_its_batch_is_written_made_safe_in_its_place(
        migrated, make_key, position, poisoned, caplog, dead_lettered):
    webhooks.add_webhook("http://127.0.0.1:9/hook", "request.completed", include_prompt=True)
    _, key = make_key(token_quota="1000/day")
    now = time.time()
    records = [ended(now + i / 1000, key_id=key.id, key_prefix=key.prefix, quota_period="day",
                     completion_tokens=i + 1, prompt={"prompt": "hi", "stream": False})
               for i in range(7)]
    records[position] = dataclasses.replace(
        records[position], model=POISONS[poisoned], prompt={"prompt": "\ud800 x\x00"})
    writer = idle_writer(on_batch=webhooks.enqueue_usage)
    for record in records:
        writer.add(record)
    assert writer.write_pending() and writer.depth == 0
    rows = list(UsageRecord.select().order_by(UsageRecord.id))
    assert [r.completion_tokens for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    safe_model = "ab\ufffd" if poisoned == "model" else "llama3.2:latest"
    assert [label(r.model_id) for r in rows] == [
        safe_model if i == position else "llama3.2:latest" for i in range(7)]
    [charged] = TokenUsage.select().where(TokenUsage.key_id == key.id)
    assert charged.tokens == 7 + 28  # the made-safe record's tokens too
    events = [e["data"] for e in _events("request.completed")]  # one per record, in order
    assert [e["completion_tokens"] for e in events] == [1, 2, 3, 4, 5, 6, 7]
    assert (events[position]["model"], events[position]["prompt"]) == (safe_model, "\ufffd x")
    made_safe = [r for r in caplog.records if "made safe" in r.getMessage()]
    assert len(made_safe) == 1 and key.prefix in made_safe[0].getMessage()
    assert dead_lettered() == 0


@pytest.fixture
def data_dir(tmp_path):
    """A data_dir of its own (tmp_path holds the SQLite database)."""
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


@pytest.fixture
def no_umask():
    """Files get exactly the mode they are created with: a private file must ask for it."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_a_record_the_database_refuses_even_made_safe_goes_to_a_private_dead_letter_file(
        migrated, data_dir, caplog, no_umask, dead_lettered):
    writer = idle_writer(dead_letters=DeadLetters(data_dir))
    now = time.time()
    refused = ended(now + 1, key_prefix="ogw_abcdefgh", bytes=2 ** 70)  # past any integer column
    for record in (ended(now), refused, ended(now + 2), ended(now + 3)):
        writer.add(record)
    assert writer.write_pending() and writer.depth == 0
    assert [r.at for r in UsageRecord.select().order_by(UsageRecord.id)] == [
        now, now + 2, now + 3]
    path = data_dir / "usage-dead-letters.jsonl"
    assert os.stat(path).st_mode & 0o777 == 0o600
    [entry] = [json.loads(line) for line in path.read_text().splitlines()]
    assert entry["record"] == dataclasses.asdict(refused) and "made safe" in entry["reason"]
    assert dead_lettered() == 1
    writer.add(ended(now + 4))
    assert writer.write_pending()
    logged = [r for r in caplog.records if "refused even made safe" in r.getMessage()]
    assert len(logged) == 1 and "ogw_abcdefgh" in logged[0].getMessage()
    assert logged[0].levelno == logging.ERROR and str(path) in logged[0].getMessage()
    assert len(path.read_text().splitlines()) == 1 and UsageRecord.select().count() == 4


def test_while_the_database_is_away_a_batch_waits_whole_and_nothing_is_dead_lettered(
        migrated, data_dir, dead_lettered):
    writer = idle_writer(dead_letters=DeadLetters(data_dir))
    now = time.time()
    for i in range(5):
        writer.add(ended(now + i, model="\ud800" if i == 2 else "llama3.2:latest"))
    database.db.initialize(database.open_database("postgresql://x@127.0.0.1:1/gone"))
    try:
        assert not writer.write_pending() and not writer.write_pending()
    finally:
        database.db.initialize(migrated)
    assert writer.depth == 5 and list(data_dir.iterdir()) == []
    assert dead_lettered() == 0
    assert writer.write_pending() and writer.depth == 0
    assert [r.at for r in UsageRecord.select().order_by(UsageRecord.id)] == [
        now + i for i in range(5)]


def losing_the_database(writer, migrated, when):
    """Make the database go away just as the writer is about to write a batch `when` picks."""
    write = writer._write

    def write_or_lose(records):
        if when(records):
            database.db.initialize(database.open_database("postgresql://x@127.0.0.1:1/gone"))
        return write(records)

    writer._write = write_or_lose
    return write


def a_turn_that_loses_the_database(migrated, records, when):
    """An idle writer given `records`, whose turn loses the database at the first batch
    `when(batch)` says: (the writer, its own _write), the database back afterwards."""
    writer = idle_writer()
    write = losing_the_database(writer, migrated, when)
    for record in records:
        writer.add(record)
    try:
        assert not writer.write_pending()
    finally:
        database.db.initialize(migrated)
    return writer, write


def charged_records(key, count):
    now = time.time()
    return [ended(now + i / 1000, key_id=key.id, quota_period="day", completion_tokens=i + 1)
            for i in range(count)]


def test_a_database_lost_while_a_record_is_written_made_safe_keeps_it_for_the_next_turn(
        migrated, make_key, dead_lettered):
    _, key = make_key(token_quota="1000/day")
    records = charged_records(key, 7)
    records[3] = dataclasses.replace(records[3], model=POISONS["model"])
    # Its made-safe copy: the same moment, another record.
    writer, write = a_turn_that_loses_the_database(migrated, records, lambda batch: len(
        batch) == 1 and batch[0].at == records[3].at and batch[0] is not records[3])
    assert [r.completion_tokens for r in writer._buffer] == [4, 5, 6, 7]  # 1-3 were written
    writer._write = write
    assert writer.write_pending() and writer.depth == 0
    rows = list(UsageRecord.select().order_by(UsageRecord.id))
    assert [(r.completion_tokens, label(r.model_id)) for r in rows] == [
        (i + 1, "ab\ufffd" if i == 3 else "llama3.2:latest") for i in range(7)]
    assert [t.tokens for t in TokenUsage.select()] == [7 + 28]
    assert dead_lettered() == 0


def test_a_database_lost_partway_through_a_split_batch_writes_no_record_twice(
        migrated, make_key, dead_lettered):
    """The batch fails on its 6th record and is split: its first half is written, then the
    database goes away. That half is not the next turn's to write again."""
    _, key = make_key(token_quota="1000/day")
    records = charged_records(key, 7)
    records[5] = dataclasses.replace(records[5], model=POISONS["model"])
    writer, write = a_turn_that_loses_the_database(
        migrated, records, lambda batch: batch[0] is records[3])
    assert [r.completion_tokens for r in UsageRecord.select().order_by(UsageRecord.id)] == [
        1, 2, 3]
    assert [r.completion_tokens for r in writer._buffer] == [4, 5, 6, 7]
    writer._write = write
    assert writer.write_pending() and writer.depth == 0
    rows = list(UsageRecord.select().order_by(UsageRecord.id))
    assert [r.completion_tokens for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert sorted((label(h.model_id), h.requests, h.completion_tokens)
                  for h in UsageHourly.select()) == [
        ("ab\ufffd", 1, 6), ("llama3.2:latest", 6, 22)]  # the 6th made safe
    assert [t.tokens for t in TokenUsage.select()] == [7 + 28]
    assert dead_lettered() == 0


def test_a_spill_file_loads_around_lines_that_are_not_records(migrated, data_dir, no_umask,
                                                              dead_lettered):
    now = time.time()
    good = json.dumps(dataclasses.asdict(ended(now, completion_tokens=1)))
    newer = json.dumps({**dataclasses.asdict(ended(now + 1, completion_tokens=2)),
                        "field_of_a_later_version": {"x": 1}})  # a rolling upgrade's spill
    poisoned = json.dumps(dataclasses.asdict(ended(now + 2, model="\ud800",
                                                   completion_tokens=3)))
    unreadable = ['{"at": 1, "endpoint": "/api/generate", "sta', "[1, 2]",
                  '{"endpoint": "/api/generate"}', "\udcff not json"]  # byte 0xff: not UTF-8
    lines = [unreadable[0], good, unreadable[1], newer, unreadable[2], poisoned,
             unreadable[3], ""]
    (data_dir / "usage-spill-1-1.jsonl").write_bytes(
        "\n".join(lines).encode("utf-8", "surrogateescape"))
    writer = idle_writer(dead_letters=DeadLetters(data_dir))
    assert load_spills(data_dir, writer) == 3
    assert writer.write_pending()
    rows = list(UsageRecord.select().order_by(UsageRecord.id))
    assert [(r.completion_tokens, label(r.model_id)) for r in rows] == [
        (1, "llama3.2:latest"), (2, "llama3.2:latest"), (3, "\ufffd")]
    dead = data_dir / "usage-dead-letters.jsonl"
    assert os.stat(dead).st_mode & 0o777 == 0o600
    kept = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [k["line"] for k in kept] == [*unreadable[:3], "\ufffd not json"]
    assert [k["reason"].split(":")[0] for k in kept] == [
        f"usage-spill-1-1.jsonl line {n}" for n in (1, 3, 5, 7)]
    assert dead_lettered() == 4
    assert sorted(p.name for p in data_dir.iterdir()) == ["usage-dead-letters.jsonl"]


def test_a_spill_file_is_private_and_complete_before_it_has_its_name(data_dir, no_umask):
    records = [ended(1.0 + i, model="\ud800" if i else "m", prompt={"prompt": "a\x00"})
               for i in range(3)]
    path = spill(records, data_dir)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert [p.name for p in data_dir.iterdir()] == [path.name]  # no partial file left
    assert path.read_bytes().isascii()
    writer = idle_writer()
    assert load_spills(data_dir, writer) == 3
    assert writer.take_all() == records


# --- statistics over HTTP and /metrics ---------------------------------------------------------

def test_a_key_sees_its_own_statistics(client, make_key, fake):
    alice, _ = make_key(name="alice")
    bob, _ = make_key(name="bob")
    fake.tokens = 2
    client.post("/api/generate", json={**GENERATE, "stream": False}, headers=auth_header(alice))
    client.post("/api/chat", json={**CHAT, "stream": False}, headers=auth_header(bob))
    flush(client)
    own = client.get("/api/stats", headers=auth_header(alice)).get_json()
    assert own["key"]["name"] == "alice"
    assert own["total_requests"] == 1 and own["last_24h_requests"] == 1
    assert own["requests_by_model"] == {"llama3.2:latest": 1}
    assert own["requests_by_endpoint"] == {"/api/generate": 1}
    assert own["completion_tokens"] == 2 and own["average_response_time"] > 0


def test_an_ollama_4xx_answer_counts_as_an_error_in_the_statistics(client, make_key, fake,
                                                                   runner):
    secret, key = make_key(name="alice")
    unknown = client.post("/api/generate", headers=auth_header(secret),
                          json={"model": "no-such-model", "prompt": "hi", "stream": False})
    assert unknown.status_code == 404  # Ollama's own answer: model not found
    client.post("/api/generate", json={**GENERATE, "stream": False}, headers=auth_header(secret))
    flush(client)
    assert sum(h.errors for h in UsageHourly.select()) == 1
    [by_key] = stats.usage(None, "key", key_id=key.id)
    assert (by_key["requests"], by_key["errors"], by_key["refused"]) == (2, 1, 0)
    own = client.get("/api/stats", headers=auth_header(secret)).get_json()
    assert (own["total_requests"], own["errors"], own["refused"]) == (2, 1, 0)
    assert [day["errors"] for day in own["by_day"]] == [1]
    [listed] = json.loads(runner("usage", "--by", "key", "--json").output)
    assert (listed["requests"], listed["errors"]) == (2, 1)


def test_stats_by_day_totals_only_the_calling_keys_requests(client, make_key, fake):
    alice, _ = make_key(name="alice")
    bob, _ = make_key(name="bob")
    fake.tokens = 2
    client.post("/api/generate", json={**GENERATE, "stream": False}, headers=auth_header(alice))
    for _ in range(3):
        client.post("/api/generate", json={**GENERATE, "stream": False},
                    headers=auth_header(bob))
    flush(client)
    own = client.get("/api/stats", headers=auth_header(alice)).get_json()
    assert [(day["day"], day["requests"], day["completion_tokens"]) for day in own["by_day"]] \
        == [(time.strftime("%Y-%m-%d", time.gmtime()), 1, 2)]


def test_everyones_statistics_need_an_admin_key(client, make_key, fake):
    user, _ = make_key(name="user")
    admin, _ = make_key(name="admin", role="admin")
    client.post("/api/generate", json={**GENERATE, "stream": False}, headers=auth_header(user))
    flush(client)
    assert client.get("/api/admin/stats").status_code == 401
    assert client.get("/api/admin/stats", headers=auth_header(user)).status_code == 403
    everyone = client.get("/api/admin/stats", headers=auth_header(admin)).get_json()
    assert [k["key_name"] for k in everyone["keys"]] == ["user"]
    assert everyone["total_requests"] == 1
    assert fake.requests[-1].path == "/api/generate"  # /api/admin/stats never reached Ollama


def test_metrics_need_an_admin_key_unless_public(make_client, make_key, fake):
    user, _ = make_key(name="user")
    admin, _ = make_key(name="admin", role="admin")
    client = make_client()
    client.post("/api/generate", json={**GENERATE, "stream": False}, headers=auth_header(user))
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=auth_header(user)).status_code == 403
    scraped = client.get("/metrics", headers=auth_header(admin))
    assert scraped.status_code == 200 and scraped.mimetype == "text/plain"
    assert 'ollama_gw_requests_total{endpoint="/api/generate",status="200"}' in scraped.text
    assert 'ollama_gw_tokens_total{kind="completion",model="llama3.2:latest"}' in scraped.text
    assert make_client(metrics_public=True).get("/metrics").status_code == 200


def test_the_first_byte_histogram_in_metrics_measures_first_bytes_not_whole_answers(
        make_client, make_key, fake):
    secret, _ = make_key()
    client = make_client(metrics_public=True)

    def counts():
        """(first-byte and whole-answer observations of /api/chat within 2.5 s, all first
        bytes): the registry is the process's, so the test reads differences."""
        text = client.get("/metrics").text

        def sample(name, le=None):
            labels = '{endpoint="/api/chat"' + (f',le="{le}"' if le else "") + "}"
            found = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
            return float(found.group(1)) if found else 0.0

        return (sample("ollama_gw_time_to_first_byte_seconds_bucket", "2.5"),
                sample("ollama_gw_request_duration_seconds_bucket", "2.5"),
                sample("ollama_gw_time_to_first_byte_seconds_count"))

    before = counts()
    fake.token_delay = 0.1  # the first line at 0.1 s, the 25th (and the end) after 2.5 s
    answer = client.post("/api/chat", json={**CHAT, "options": {"num_predict": 25}},
                         headers=auth_header(secret))
    assert answer.status_code == 200
    flush(client)
    first_byte, whole, observed = (a - b for a, b in zip(counts(), before, strict=True))
    assert (first_byte, whole, observed) == (1, 0, 1)


def test_each_relayed_request_gets_one_json_access_log_line_without_secrets(
        client, make_key, fake, capsys):
    secret, key = make_key()
    ACCESS_LOG.flush()  # lines of earlier tests in this process
    capsys.readouterr()
    response = client.post(f"/api/generate?apikey={secret}&keep=1",
                           json={**GENERATE, "stream": False, "prompt": "top secret words"})
    assert response.status_code == 200
    ACCESS_LOG.flush()  # the usage writer's next turn does this within usage_flush_seconds
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if '"path":' in ln]
    entry = json.loads(line)
    assert (entry["key"], entry["status"], entry["path"]) == (key.prefix, 200, "/api/generate")
    assert entry["query"] == "apikey=[redacted]&keep=1"
    assert secret not in line and "top secret" not in line
    assert entry["completion_tokens"] == fake.tokens


def test_the_gateway_reports_its_own_time_in_server_timing(client, make_key, fake):
    secret, _ = make_key()
    response = client.post("/api/generate", json=GENERATE, headers=auth_header(secret))
    timing = response.headers["Server-Timing"]
    assert timing.startswith("gateway;dur=") and ", ollama;dur=" in timing
    answer = [json.loads(line) for line in response.data.splitlines()]
    assert "".join(line["response"] for line in answer) == fake_text(fake.tokens)  # untouched


# --- usage as webhook events -----------------------------------------------------------------

def _events(event):
    from app.store.models import WebhookDelivery

    return [json.loads(d.payload) for d in WebhookDelivery.select().where(
        WebhookDelivery.event == event).order_by(WebhookDelivery.id)]


def test_a_relayed_request_becomes_a_request_completed_event_with_its_usage(client, make_key,
                                                                           fake):
    from app.webhooks import outbox as webhooks

    webhooks.add_webhook("http://127.0.0.1:9/hook", "request.completed")
    secret, key = make_key(name="alice")
    fake.tokens = 3
    client.post("/api/generate", json={**GENERATE, "stream": False}, headers=auth_header(secret))
    client.post("/api/generate", json=GENERATE)  # refused: not a request.completed
    flush(client)
    [event] = _events("request.completed")
    data = event["data"]
    assert (data["key_id"], data["key_prefix"], data["key_name"]) == (key.id, key.prefix, "alice")
    assert (data["endpoint"], data["model"], data["status"]) == (
        "/api/generate", "llama3.2:latest", 200)
    assert (data["prompt_tokens"], data["completion_tokens"]) == (5, 3)
    assert secret not in json.dumps(event) and "prompt" not in data  # no prompt unless asked


def test_the_go_predecessors_fields_come_only_to_a_webhook_that_asks(client, make_key, fake):
    from app.webhooks import outbox as webhooks

    webhooks.add_webhook("http://127.0.0.1:9/plain", "request.completed")
    webhooks.add_webhook("http://127.0.0.1:9/go", "request.completed", include_prompt=True)
    secret, _ = make_key()
    client.post("/api/generate", headers=auth_header(secret),
                json={**GENERATE, "stream": False, "images": ["aGk=", "aGk="], "raw": True})
    flush(client)
    plain, with_prompt = (e["data"] for e in _events("request.completed"))
    assert "prompt" not in plain
    assert (with_prompt["prompt"], with_prompt["stream"], with_prompt["images"],
            with_prompt["raw"]) == (GENERATE["prompt"], False, 2, True)


@pytest.mark.parametrize("key_options, event, reason", [
    ({"rate_limit": "1/hour"}, "ratelimit.exceeded", "rate"),
    ({"token_quota": "1/day"}, "quota.exceeded", "quota"),
])
def test_refusals_for_limits_become_their_events(client, make_key, fake, key_options, event,
                                                 reason):
    from app.webhooks import outbox as webhooks

    webhooks.add_webhook("http://127.0.0.1:9/hook", event)
    secret, key = make_key(**key_options)
    for _ in range(2):
        client.post("/api/generate", json={**GENERATE, "stream": False},
                    headers=auth_header(secret))
        flush(client)
    assert client.post("/api/generate", json=GENERATE,
                       headers=auth_header(secret)).status_code == 429
    flush(client)
    events = _events(event)
    assert events and all(e["data"]["reason"] == reason for e in events)
    assert events[-1]["data"]["key_id"] == key.id and events[-1]["data"]["status"] == 429


def test_a_max_concurrent_refusal_becomes_a_ratelimit_event_with_reason_concurrency(
        client, make_key, fake):
    from app.webhooks import outbox as webhooks

    webhooks.add_webhook("http://127.0.0.1:9/hook", "ratelimit.exceeded")
    secret, key = make_key(max_concurrent=1, rate_limit=None)
    running = client.post("/api/generate", json=GENERATE, headers=auth_header(secret),
                          buffered=False)  # holds the key's one slot until closed
    try:
        refused = client.post("/api/generate", json=GENERATE, headers=auth_header(secret))
        assert refused.status_code == 429
    finally:
        running.close()
    flush(client)
    [event] = _events("ratelimit.exceeded")
    assert (event["data"]["reason"], event["data"]["key_id"], event["data"]["status"]) == (
        "concurrency", key.id, 429)


def test_a_record_that_settles_a_quota_reservation_is_written_at_once(migrated, make_key):
    """Its reservation holds the key's quota until it is written: not a whole turn later."""
    from app.admission import quota
    from app.store.models import QuotaReservation

    _, key = make_key(token_quota="100/day")
    reservation, _ = quota.reserve(key, 1, 5, "test:1", 60)
    writer = UsageWriter(interval=60)  # a turn a minute: only the wake-up writes it
    try:
        writer.add(Record(at=time.time(), endpoint="/api/generate", status=200, latency_ms=5,
                          key_id=key.id, quota_period="day", prompt_tokens=1,
                          completion_tokens=5, reservation_id=reservation.id))
        deadline = time.monotonic() + 30
        while QuotaReservation.select().count() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert QuotaReservation.select().count() == 0
        assert [t.tokens for t in TokenUsage.select()] == [6]
    finally:
        writer.stop()
