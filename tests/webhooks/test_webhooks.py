"""Webhooks in-process, on SQLite and PostgreSQL: the outbox, claiming, signing, retries.

Deliveries go to a real HTTP receiver on 127.0.0.1 (tests/webhook_receiver.py); the
dispatcher is driven with run_once(), as the CLI drives it. Later retries are reached by
claiming with a `now` in the future, never by sleeping.
"""
import dataclasses
import json
import threading
import time

import pytest
import standardwebhooks

from app.keys import registry as keystore
from app.store.db import db
from app.store.models import ApiKey, Webhook, WebhookAttempt, WebhookDelivery
from app.webhooks import outbox as hooks
from app.webhooks.delivery import Dispatcher
from tests.webhook_receiver import WebhookReceiver


@pytest.fixture
def receiver():
    with WebhookReceiver() as r:
        yield r


@pytest.fixture
def dispatcher(settings):
    """dispatcher(**settings) -> a Dispatcher with these webhook settings."""

    def make(**overrides):
        return Dispatcher(dataclasses.replace(settings, **overrides))

    return make


def deliveries(**where):
    query = WebhookDelivery.select().order_by(WebhookDelivery.id)
    for field, value in where.items():
        query = query.where(getattr(WebhookDelivery, field) == value)
    return list(query)


def attempt_statuses(delivery):
    return [a.status for a in WebhookAttempt.select().where(WebhookAttempt.delivery == delivery.id)
            .order_by(WebhookAttempt.id)]


def verify(secret, received):
    """The payload, if the Standard Webhooks library accepts the delivery's signature."""
    return standardwebhooks.Webhook(secret).verify(received.body, received.headers)


@pytest.mark.parametrize("url, events, fragment", [
    ("ftp://example.com/x", None, "http:// or https://"),
    ("http:///nohost", None, "with a host"),
    ("https://user:pw@example.com/", None, "credentials"),
    ("https://example.com/#frag", None, "fragment"),
    ("https://example.com/", "key.created,key.exploded", "unknown event(s) key.exploded"),
    ("https://example.com/", " , ", "at least one event"),
    ("https://example.com/", "webhook.test", "unknown event"),
])
def test_add_refuses_what_could_not_be_delivered(migrated, url, events, fragment):
    with pytest.raises(hooks.WebhookOpError, match=None) as caught:
        hooks.add_webhook(url, events)
    assert fragment in str(caught.value)
    assert Webhook.select().count() == 0


def test_add_returns_a_standard_webhooks_secret_and_subscribes_to_all_six_by_default(migrated):
    row, secret = hooks.add_webhook(" https://example.com/hook ")
    assert row.url == "https://example.com/hook"
    assert secret.startswith("whsec_") and len(secret) > 40
    standardwebhooks.Webhook(secret)  # the library accepts it as a signing secret
    assert hooks.event_names(row) == hooks.EVENTS
    assert secret not in json.dumps(hooks.webhook_summary(row))
    other, other_secret = hooks.add_webhook("https://example.com/hook", "key.created,*")
    assert hooks.event_names(other) == ("*",) and other_secret != secret


def test_key_created_is_delivered_signed_with_the_webhooks_secret(migrated, receiver,
                                                                   dispatcher, make_key):
    _, secret = hooks.add_webhook(receiver.url, "key.created")
    key, row = make_key("alice", role="admin")
    [outcome] = dispatcher().run_once()
    assert outcome.ok and outcome.state == "delivered"
    [received] = receiver.received
    event = verify(secret, received)
    assert event["type"] == "key.created"
    assert event["timestamp"].endswith("Z")
    assert event["data"] == {"key_id": row.id, "key_prefix": row.prefix, "key_name": "alice",
                             "role": "admin"}
    assert key not in received.body.decode() and row.key_hash not in received.body.decode()
    [delivery] = deliveries()
    assert received.message_id == delivery.message_id.strip()
    assert received.headers["content-type"] == "application/json"
    assert (delivery.state, delivery.attempts, delivery.last_status) == ("delivered", 1, 200)
    assert attempt_statuses(delivery) == [200]
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(hooks.new_secret()).verify(received.body, received.headers)


def test_revoke_and_rotate_are_reported_once_each_and_never_with_a_secret(migrated, make_key):
    hooks.add_webhook("http://127.0.0.1:9/hook")
    old_key, row = make_key("bob")
    keystore.revoke_key(row.id)
    keystore.revoke_key(row.id)  # already revoked: nothing changes, nothing is reported
    second_key, second = make_key("carol")
    rotated, new_key = keystore.rotate_key(second.id)
    payloads = [json.loads(d.payload) for d in deliveries()]
    assert [p["type"] for p in payloads] == ["key.created", "key.revoked", "key.created",
                                            "key.rotated"]
    assert payloads[1]["data"]["key_id"] == row.id
    assert payloads[3]["data"] == {"key_id": second.id, "key_prefix": rotated.prefix,
                                   "key_name": "carol", "role": "user",
                                   "previous_prefix": second.prefix}
    text = " ".join(d.payload for d in deliveries())
    for secret in (old_key, second_key, new_key, row.key_hash, rotated.key_hash):
        assert secret not in text


def test_an_event_is_stored_with_its_change_or_not_at_all(migrated):
    hooks.add_webhook("http://127.0.0.1:9/hook")
    with pytest.raises(RuntimeError), db.atomic():
        keystore.create_key("doomed", rate_limit="10/minute")
        raise RuntimeError("the caller's transaction fails after the key was made")
    assert ApiKey.select().count() == 0
    assert deliveries() == []


def test_each_webhook_gets_only_the_events_it_subscribed_to(migrated, make_key):
    revocations, _ = hooks.add_webhook("http://127.0.0.1:9/a", "key.revoked")
    everything, _ = hooks.add_webhook("http://127.0.0.1:9/b", "*")
    _, row = make_key()
    keystore.revoke_key(row.id)
    assert [d.event for d in deliveries(webhook=revocations.id)] == ["key.revoked"]
    assert [d.event for d in deliveries(webhook=everything.id)] == ["key.created", "key.revoked"]
    with db.atomic():
        assert hooks.enqueue("quota.exceeded", {"key_id": row.id}) == 1


def test_without_webhooks_enqueue_writes_nothing_and_unknown_events_are_refused(migrated):
    with db.atomic():
        assert hooks.enqueue("request.completed", {"key_id": 1}) == 0
    assert deliveries() == []
    with pytest.raises(ValueError, match="unknown webhook event"):
        hooks.enqueue("request.finished", {})


def test_a_failing_receiver_is_retried_on_the_schedule_until_it_answers(
        migrated, receiver, dispatcher, make_key):
    _, secret = hooks.add_webhook(receiver.url, "key.created")
    receiver.fail_first = 2
    send = dispatcher(webhook_retry_seconds=(30.0, 600.0))
    make_key()
    [first] = send.run_once()
    assert (first.status, first.state) == (500, "pending")
    [delivery] = deliveries()
    assert 29 < delivery.next_attempt_at - time.time() <= 30
    assert delivery.last_error == "HTTP 500 Internal Server Error"  # never the body
    assert send.run_once() == []  # not due yet
    [second] = send.run_once(now=time.time() + 31)
    assert (second.status, second.state) == (500, "pending")
    assert 599 < deliveries()[0].next_attempt_at - time.time() <= 600
    [third] = send.run_once(now=time.time() + 601)
    assert (third.status, third.state) == (200, "delivered")
    [delivery] = deliveries()
    assert (delivery.attempts, delivery.last_error) == (3, None)
    assert attempt_statuses(delivery) == [500, 500, 200]
    assert len({r.message_id for r in receiver.received}) == 1  # one event, three attempts
    assert all(verify(secret, r)["type"] == "key.created" for r in receiver.received)


def test_a_delivery_is_marked_failed_after_its_last_retry(migrated, receiver, dispatcher,
                                                          make_key):
    hooks.add_webhook(receiver.url, "key.created")
    receiver.status = 404
    send = dispatcher(webhook_retry_seconds=(1.0,))
    make_key()
    assert [o.state for o in send.run_once()] == ["pending"]
    assert [o.state for o in send.run_once(now=time.time() + 2)] == ["failed"]
    assert send.run_once(now=time.time() + 10**6) == []
    [delivery] = deliveries()
    assert (delivery.state, delivery.attempts, delivery.last_status) == ("failed", 2, 404)
    assert len(receiver.received) == 2


@pytest.mark.parametrize("status", [204, 202])
def test_a_receiver_answering_any_2xx_has_the_delivery_delivered_after_one_attempt(
        migrated, receiver, dispatcher, make_key, status):
    hooks.add_webhook(receiver.url, "key.created")
    receiver.status = status
    send = dispatcher(webhook_retry_seconds=(1.0, 1.0))
    make_key()
    [outcome] = send.run_once()
    assert (outcome.status, outcome.state, outcome.ok) == (status, "delivered", True)
    assert send.run_once(now=time.time() + 10**6) == []  # nothing left to retry
    [delivery] = deliveries()
    assert (delivery.state, delivery.attempts, delivery.last_status, delivery.last_error) == (
        "delivered", 1, status, None)
    assert outcome.error is None and outcome.describe().startswith(f"delivered: HTTP {status} ")
    assert attempt_statuses(delivery) == [status] and len(receiver.received) == 1


def test_a_hanging_receiver_costs_one_timed_out_attempt(migrated, receiver, dispatcher,
                                                        make_key):
    hooks.add_webhook(receiver.url, "key.created")
    receiver.hang = True
    make_key()
    [outcome] = dispatcher(webhook_timeout=0.5).run_once()
    assert outcome.status is None and outcome.state == "pending"
    assert "0.5 s" in outcome.error
    assert attempt_statuses(deliveries()[0]) == [None]
    receiver.release()


def test_redirects_are_not_followed(migrated, receiver, dispatcher, make_key):
    hooks.add_webhook(receiver.url, "key.created")
    receiver.status = 302
    make_key()
    [outcome] = dispatcher().run_once()
    assert outcome.status == 302 and not outcome.ok
    assert "redirects are not followed" in outcome.error


def test_a_claim_is_exclusive_until_it_lapses(migrated, dispatcher, make_key):
    hooks.add_webhook("http://127.0.0.1:9/hook", "key.created")
    for i in range(3):
        make_key(f"k{i}")
    first, second = dispatcher(), dispatcher()
    now = time.time()
    mine, theirs = first.claim(2, now), second.claim(5, now)
    assert len(mine) == 2 and len(theirs) == 1
    assert {c.id for c in mine}.isdisjoint(c.id for c in theirs)
    assert second.claim(5, now + 1) == []
    # The senders died without recording anything: their claims lapse, and the next
    # claim is the next attempt.
    again = second.claim(5, now + first.lease + 1)
    assert sorted(c.id for c in again) == sorted(c.id for c in mine + theirs)
    assert {c.attempts for c in again} == {2}


def test_concurrent_claimers_never_take_the_same_delivery(migrated, dispatcher):
    hooks.add_webhook("http://127.0.0.1:9/hook", "quota.exceeded")
    with db.atomic():
        for i in range(60):
            hooks.enqueue("quota.exceeded", {"n": i})
    taken, errors = [], []

    def claim_until_empty():
        sender = dispatcher()
        try:
            while batch := sender.claim(3):
                taken.extend(c.id for c in batch)
        except Exception as exc:  # reported below, with the thread's failure
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=claim_until_empty) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert sorted(taken) == sorted(d.id for d in deliveries())  # each exactly once
    assert {d.attempts for d in deliveries()} == {1}


def test_include_prompt_adds_the_go_fields_for_that_webhook_only(migrated):
    assert hooks.wants_prompts() is False
    plain, _ = hooks.add_webhook("http://127.0.0.1:9/plain", "request.completed")
    assert hooks.wants_prompts() is False
    curious, _ = hooks.add_webhook("http://127.0.0.1:9/curious", "request.completed",
                                   include_prompt=True)
    assert hooks.wants_prompts() is True
    data = {"key_id": 7, "key_prefix": "ogw_abcdefgh", "model": "llama3.2", "status": 200}
    prompt = {"prompt": "why is the sky blue?", "stream": False, "images": ["aGk=", "aGk="],
              "raw": True, "apikey": "must never travel"}
    with db.atomic():
        assert hooks.enqueue("request.completed", data, prompt=prompt) == 2
    [to_plain] = deliveries(webhook=plain.id)
    [to_curious] = deliveries(webhook=curious.id)
    assert json.loads(to_plain.payload)["data"] == data
    assert json.loads(to_curious.payload)["data"] == {
        **data, "prompt": "why is the sky blue?", "stream": False, "images": 2, "raw": True}
    assert to_plain.message_id != to_curious.message_id
    hooks.remove_webhook(curious.id)
    assert hooks.wants_prompts() is False


def test_a_long_prompt_is_cut_and_says_so(migrated):
    hooks.add_webhook("http://127.0.0.1:9/curious", "request.completed", include_prompt=True)
    with db.atomic():
        hooks.enqueue("request.completed", {}, prompt={"prompt": "x" * 200_000})
    data = json.loads(deliveries()[0].payload)["data"]
    assert len(data["prompt"]) == hooks.MAX_PROMPT_CHARS and data["prompt_truncated"] is True


def test_removing_a_webhook_drops_its_deliveries_even_one_in_flight(migrated, receiver,
                                                                     dispatcher, make_key):
    row, _ = hooks.add_webhook(receiver.url, "key.created")
    make_key("a")
    make_key("b")
    sender = dispatcher()
    in_flight = sender.claim(1)
    hooks.remove_webhook(row.id)
    assert deliveries() == [] and WebhookAttempt.select().count() == 0
    [outcome] = [sender.deliver(claim) for claim in in_flight]  # recorded nowhere, no error
    assert outcome.ok
    assert WebhookAttempt.select().count() == 0
    with pytest.raises(hooks.WebhookOpError, match="no webhook with id"):
        hooks.remove_webhook(row.id)


def test_removing_a_webhook_writes_a_webhook_removed_audit_entry(migrated):
    from app.store import audit

    row, _ = hooks.add_webhook("https://example.com/hook?token=hidden", "key.created")
    hooks.remove_webhook(row.id)
    [entry] = audit.entries(action="webhook.removed")
    assert entry["target"] == f"webhook {row.id}"
    assert "example.com/hook" in json.dumps(entry) and "hidden" not in json.dumps(entry)
