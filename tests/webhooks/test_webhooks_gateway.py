"""Webhooks from real gateways (`ollama-gw serve`: gunicorn, gevent workers) to a real receiver.

Deadlines are generous: the machines are shared and slow down without warning. Nothing
here measures speed (bench/ does); the tests assert what happens, and in which order.
"""
import json
import signal

import pytest
import requests
import standardwebhooks

from app.store import db as database
from app.store.models import Webhook, WebhookAttempt, WebhookDelivery
from app.webhooks import outbox as hooks
from tests.conftest import empty_database
from tests.gateway_process import GatewayProcess, wait_for
from tests.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.gateway
# Short retries, so a retry is seen within a test; a long attempt timeout, so a hanging
# receiver is still hanging while the test looks.
WEBHOOK_SETTINGS = {"webhook_retry_seconds": "0.5,0.5,0.5", "webhook_timeout": 60,
                    "webhook_concurrency": 2}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(request, tmp_path_factory):
    return empty_database(request, tmp_path_factory.mktemp("hooks"))


@pytest.fixture
def bound(database_url):
    """The gateways' database, bound to the models in this process; emptied of webhooks after."""
    instance = database.open_database(database_url)
    database.db.initialize(instance)
    database.upgrade(instance)
    yield instance
    with instance.connection_context():
        Webhook.delete().execute()  # deliveries and attempts go with them
    instance.close_all()


@pytest.fixture
def receiver():
    with WebhookReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def gateway(database_url, fake_ollama, tmp_path_factory):
    with GatewayProcess(database_url, fake_ollama.url, workers=2, **WEBHOOK_SETTINGS) as gw:
        yield gw.start(tmp_path_factory.mktemp("log") / "gateway.log")


def states(**where):
    query = WebhookDelivery.select(WebhookDelivery.state)
    for field, value in where.items():
        query = query.where(getattr(WebhookDelivery, field) == value)
    with database.db.connection_context():
        return [state for (state,) in query.tuples()]


def enqueue_many(event, count):
    with database.db.connection_context(), database.db.atomic():
        hooks.subscriptions.invalidate()
        for n in range(count):
            hooks.enqueue(event, {"n": n})


def test_events_stored_while_no_gateway_runs_are_sent_once_one_starts(
        database_url, bound, fake, receiver, tmp_path):
    gw = GatewayProcess(database_url, fake.url, workers=2, **WEBHOOK_SETTINGS)
    created = json.loads(gw.cli("webhooks", "add", receiver.url, "--events", "key.created",
                                "--json").stdout)
    key = gw.add_key("--name", "made-offline")
    assert states() == ["pending"]
    receiver.fail_first = 1  # and the first attempt fails: the retry delivers it
    with gw:
        gw.start(tmp_path / "gateway.log")
        assert receiver.wait_for_count(2, 60), receiver.received
        assert wait_for(lambda: states() == ["delivered"], 30)
    first, second = receiver.received
    assert (first.status, second.status) == (500, 200)
    assert first.message_id == second.message_id
    verifier = standardwebhooks.Webhook(created["secret"])
    for received in (first, second):
        event = verifier.verify(received.body, received.headers)
        assert event["type"] == "key.created"
        assert event["data"]["key_id"] == key["id"] and event["data"]["key_prefix"] == key["prefix"]
        assert key["key"] not in received.body.decode()
    [delivery] = json.loads(gw.cli("webhooks", "deliveries", "--json").stdout)
    assert [a["status"] for a in delivery["attempt_log"]] == [500, 200]


def test_an_attempt_cut_by_a_shutdown_is_recorded_and_sent_after_a_restart(
        database_url, bound, fake, receiver, tmp_path):
    hooks.add_webhook(receiver.url, "key.revoked")
    receiver.hang = True
    enqueue_many("key.revoked", 1)
    gw = GatewayProcess(database_url, fake.url, workers=1, **WEBHOOK_SETTINGS)
    with gw:
        gw.start(tmp_path / "first.log")
        assert receiver.wait(lambda r: r.hanging == 1, 60)
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(60) == 0
    with database.db.connection_context():
        [attempt] = WebhookAttempt.select()
        assert attempt.status is None and "interrupted" in attempt.error
        assert WebhookDelivery.get().state == "pending"
    receiver.release()
    with GatewayProcess(database_url, fake.url, workers=1, **WEBHOOK_SETTINGS) as again:
        again.start(tmp_path / "second.log")
        assert wait_for(lambda: states() == ["delivered"], 60), states()
    assert [r.message_id for r in receiver.received] == [receiver.received[0].message_id] * 2


# The two tests above start gateways of their own and come first: the module's `gateway`
# (started by the first test that asks for it) would otherwise send their deliveries.


def test_a_hanging_receiver_does_not_slow_client_requests(gateway, bound, fake, receiver):
    key = gateway.add_key("--name", "busy", "--rate-limit", "none")["key"]
    hooks.add_webhook(receiver.url, "quota.exceeded")
    receiver.hang = True
    enqueue_many("quota.exceeded", 20)
    # Two senders per worker, two workers: four deliveries hang, sixteen wait their turn.
    assert receiver.wait(lambda r: r.hanging >= 4, 60), receiver.received
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "llama3.2", "prompt": "hi", "stream": False}
    for _ in range(20):
        assert requests.get(gateway.url + "/api/tags", headers=headers,
                            timeout=30).status_code == 200
        assert requests.post(gateway.url + "/api/generate", json=body, headers=headers,
                             timeout=30).status_code == 200
    # Every request was answered while the deliveries still hung, and the pool held.
    assert receiver.hanging == 4 and len(receiver.received) == 4
    receiver.release()
    assert wait_for(lambda: states() == ["delivered"] * 20, 120), states()


def test_each_attempt_is_sent_once_by_two_instances_of_two_workers(
        gateway, database_url, bound, fake, receiver, tmp_path):
    with GatewayProcess(database_url, fake.url, workers=2, **WEBHOOK_SETTINGS) as second:
        second.start(tmp_path / "second.log")
        hooks.add_webhook(receiver.url, "ratelimit.exceeded")
        receiver.fail_each = 1  # every first attempt fails: each delivery takes two
        enqueue_many("ratelimit.exceeded", 40)
        assert wait_for(lambda: states() == ["delivered"] * 40, 120), states()
    per_message = {}
    for received in receiver.received:
        per_message.setdefault(received.message_id, []).append(received.status)
    assert len(per_message) == 40
    assert all(statuses == [500, 200] for statuses in per_message.values()), per_message
    with database.db.connection_context():
        attempts = list(WebhookAttempt.select(WebhookAttempt.status).tuples())
        counted = [d.attempts for d in WebhookDelivery.select()]
    assert len(attempts) == len(receiver.received) == 80
    assert counted == [2] * 40


def test_a_relayed_request_reaches_a_receiver_as_a_signed_request_completed(
        gateway, bound, receiver, fake):
    _, secret = hooks.add_webhook(receiver.url, "request.completed")
    created = gateway.add_key("--name", "metered")
    assert requests.post(gateway.url + "/api/generate", timeout=60,
                         headers={"Authorization": f"Bearer {created['key']}"},
                         json={"model": "llama3.2", "prompt": "hi", "stream": False}
                         ).status_code == 200
    assert wait_for(lambda: receiver.received, 60)
    event = standardwebhooks.Webhook(secret).verify(receiver.received[0].body,
                                                    receiver.received[0].headers)
    assert event["type"] == "request.completed"
    assert (event["data"]["key_prefix"], event["data"]["completion_tokens"]) == (
        created["prefix"], fake.tokens)
    assert created["key"] not in receiver.received[0].body.decode()
