"""`ollama-gw webhooks` as an admin uses it, on SQLite and PostgreSQL, with a real receiver."""
import dataclasses
import json
import re

import pytest
import standardwebhooks

from app.webhooks.delivery import Dispatcher
from tests.webhook_receiver import WebhookReceiver

SECRET = re.compile(r"whsec_[A-Za-z0-9+/=]{40,}")


@pytest.fixture
def receiver():
    with WebhookReceiver() as r:
        yield r


def add(runner, *args):
    result = runner("webhooks", "add", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def as_json(runner, *args):
    result = runner(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_add_json_prints_one_object_with_id_and_secret(runner):
    created = add(runner, "https://example.com/hook", "--events", "key.created,key.revoked")
    assert isinstance(created["id"], int)
    assert created["secret"].startswith("whsec_")
    standardwebhooks.Webhook(created["secret"])
    assert created["url"] == "https://example.com/hook"
    assert created["events"] == ["key.created", "key.revoked"]
    assert created["include_prompt"] is False


def test_add_for_people_shows_the_secret_once_and_list_never_does(runner):
    result = runner("webhooks", "add", "https://example.com/hook", "--include-prompt")
    assert result.exit_code == 0
    [secret] = SECRET.findall(result.output)
    assert "shown once" in result.output and "prompts included" in result.output
    for command in (["webhooks", "list"], ["webhooks", "list", "--json"]):
        listed = runner(*command)
        assert listed.exit_code == 0 and "https://example.com/hook" in listed.output
        assert secret not in listed.output and "whsec_" not in listed.output
    [summary] = as_json(runner, "webhooks", "list")
    assert summary["include_prompt"] is True
    assert summary["events"] == ["request.completed", "ratelimit.exceeded", "quota.exceeded",
                                 "quota.warning", "key.created", "key.revoked", "key.rotated"]


@pytest.mark.parametrize("args, message", [
    (["webhooks", "add", "not-a-url"], "must be an http:// or https:// URL"),
    (["webhooks", "add", "http://x/", "--events", "key.made"], "unknown event(s) key.made"),
    (["webhooks", "remove", "99", "--yes"], "no webhook with id 99"),
    (["webhooks", "test", "abc"], "is named by its id"),
    (["webhooks", "deliveries", "42"], "no webhook with id 42"),
    (["webhooks", "test", "\u00b2"], "is named by its id"),
    (["webhooks", "test", "\uff11"], "is named by its id"),  # a full-width 1 is not webhook 1
    (["webhooks", "remove", "99999999999999999999999", "--yes"],
     "no webhook with id 99999999999999999999999"),
    (["webhooks", "retry", "999"], "no delivery with id 999"),
    (["webhooks", "retry", "99999999999999999999999"], "no delivery with id 9999"),
    (["webhooks", "retry", "x1"], "a delivery is named by its id"),
])
def test_mistakes_exit_1_with_a_message(runner, args, message):
    runner("webhooks", "add", "http://127.0.0.1:9/hook")  # webhook 1
    result = runner(*args)
    assert result.exit_code == 1
    assert message in result.output and result.output.count("\n") == 1


def test_a_bad_option_value_is_a_usage_error(runner):
    assert runner("webhooks", "deliveries", "--state", "lost").exit_code == 2


def test_remove_asks_first_unless_yes(runner):
    created = add(runner, "https://example.com/hook")
    refused = runner("webhooks", "remove", str(created["id"]), input="n\n")
    assert refused.exit_code == 1 and "Remove webhook" in refused.output
    assert len(as_json(runner, "webhooks", "list")) == 1
    removed = as_json(runner, "webhooks", "remove", str(created["id"]), "--yes")
    assert removed["id"] == created["id"] and "secret" not in removed
    assert as_json(runner, "webhooks", "list") == []


def test_test_delivers_a_signed_test_event_and_says_how_it_went(runner, receiver):
    created = add(runner, receiver.url, "--events", "key.revoked")
    result = runner("webhooks", "test", str(created["id"]))
    assert result.exit_code == 0, result.output
    assert re.search(r"delivered: HTTP 200 in \d+ ms", result.output)
    [received] = receiver.received
    event = standardwebhooks.Webhook(created["secret"]).verify(received.body, received.headers)
    assert event["type"] == "webhook.test" and event["data"]["webhook_id"] == created["id"]
    [delivery] = as_json(runner, "webhooks", "deliveries", str(created["id"]))
    assert (delivery["event"], delivery["state"], delivery["attempts"]) == (
        "webhook.test", "delivered", 1)
    assert [a["status"] for a in delivery["attempt_log"]] == [200]


def test_a_failed_test_exits_1_and_is_not_retried(runner, receiver):
    created = add(runner, receiver.url)
    receiver.status = 503
    result = runner("webhooks", "test", str(created["id"]))
    assert result.exit_code == 1
    assert "failed: HTTP 503" in result.output and "Service Unavailable" in result.output
    assert "receiver says no" not in result.output  # the body is never shown
    scripted = runner("webhooks", "test", str(created["id"]), "--json")
    assert scripted.exit_code == 1
    outcome = json.loads(scripted.stdout)
    assert (outcome["ok"], outcome["status"], outcome["state"]) == (False, 503, "failed")
    failed = as_json(runner, "webhooks", "deliveries", "--state", "failed")
    assert [d["state"] for d in failed] == ["failed", "failed"]
    assert as_json(runner, "webhooks", "deliveries", "--state", "pending") == []


def test_a_test_of_an_unreachable_receiver_says_why(runner, receiver):
    created = add(runner, receiver.url)
    receiver.stop()
    result = runner("webhooks", "test", str(created["id"]))
    assert result.exit_code == 1 and "Connection refused" in result.output


def test_deliveries_lists_what_key_commands_enqueued_without_their_secrets(runner):
    first = add(runner, "https://example.com/a", "--events", "key.created")
    add(runner, "https://example.com/b", "--events", "key.revoked")
    key = as_json(runner, "keys", "add", "--name", "ci")
    assert runner("keys", "revoke", str(key["id"]), "--yes").exit_code == 0
    listed = as_json(runner, "webhooks", "deliveries")
    assert [(d["event"], d["state"], d["attempts"]) for d in listed] == [
        ("key.revoked", "pending", 0), ("key.created", "pending", 0)]  # newest first
    assert [d["event"] for d in as_json(runner, "webhooks", "deliveries",
                                        str(first["id"]))] == ["key.created"]
    assert len(as_json(runner, "webhooks", "deliveries", "--limit", "1")) == 1
    table = runner("webhooks", "deliveries")
    assert table.exit_code == 0 and "key.revoked" in table.output and "pending" in table.output
    for output in (table.output, json.dumps(listed)):
        assert key["key"] not in output
    counts = as_json(runner, "webhooks", "list")[0]["deliveries"]
    assert counts == {"pending": 1, "delivered": 0, "failed": 0}


def test_with_no_webhooks_list_and_deliveries_say_so(runner):
    assert "no webhooks yet" in runner("webhooks", "list").output
    assert "no deliveries" in runner("webhooks", "deliveries").output


def test_a_failed_delivery_is_retried_by_its_delivery_id(runner, receiver, settings):
    add(runner, "http://127.0.0.1:9/other", "--events", "key.revoked")  # ids then differ
    created = add(runner, receiver.url, "--events", "key.created")
    as_json(runner, "keys", "add", "--name", "a")
    as_json(runner, "keys", "add", "--name", "b")
    receiver.status = 503
    once = dataclasses.replace(settings, webhook_retry_seconds=())  # one attempt, then failed
    assert [o.state for o in Dispatcher(once).run_once()] == ["failed", "failed"]
    first, second = reversed(as_json(runner, "webhooks", "deliveries", str(created["id"])))
    table = runner("webhooks", "deliveries").output.splitlines()
    assert table[0].split()[:3] == ["DELIVERY", "WEBHOOK", "EVENT"]
    assert table[1].split()[:2] == [str(second["id"]), str(created["id"])]
    result = runner("webhooks", "retry", str(second["id"]))
    assert result.exit_code == 0 and f"delivery {second['id']} will be sent again" in result.output
    after = {d["id"]: d for d in as_json(runner, "webhooks", "deliveries")}
    assert (after[second["id"]]["state"], after[second["id"]]["attempts"]) == ("pending", 0)
    assert after[first["id"]]["state"] == "failed"  # only the one named
    again = runner("webhooks", "retry", str(second["id"]))
    assert again.exit_code == 1 and "is pending: only a failed one is retried" in again.output


def test_a_failed_test_does_not_count_as_a_failed_delivery(runner, receiver):
    created = add(runner, receiver.url)
    receiver.status = 503
    assert runner("webhooks", "test", str(created["id"])).exit_code == 1
    assert as_json(runner, "webhooks", "list")[0]["deliveries"] == {
        "pending": 0, "delivered": 0, "failed": 0}
    header, row = runner("webhooks", "list").output.splitlines()
    assert row.split()[header.split().index("FAILED")] == "0"
    # It is still listed with the deliveries, where its outcome is seen.
    assert [d["event"] for d in as_json(runner, "webhooks", "deliveries", "--state",
                                        "failed")] == ["webhook.test"]
