"""The admin HTTP API (/api/keys, /api/admin/audit) and the audit log behind it and the CLI."""
import json

import pytest

from app.keys.registry import hash_key
from app.store import audit
from app.store.models import ApiKey
from tests.conftest import auth_header

ADMIN_ROUTES = [
    ("POST", "/api/keys", {"name": "x"}),
    ("GET", "/api/keys", None),
    ("GET", "/api/keys/1", None),
    ("PATCH", "/api/keys/1", {"rate_limit": "5/minute"}),
    ("DELETE", "/api/keys/1", None),
    ("POST", "/api/keys/1/rotate", None),
    ("GET", "/api/admin/audit", None),
    ("GET", "/api/admin/stats", None),
    ("GET", "/metrics", None),
]


@pytest.fixture
def admin(make_key):
    secret, row = make_key("root", role="admin")
    return auth_header(secret), row


@pytest.fixture
def user(make_key):
    secret, row = make_key("alice")
    return auth_header(secret), row


def call(client, method, path, headers=None, body=None):
    response = client.open(path, method=method, headers=headers or {}, json=body,
                           buffered=True)
    return response.status_code, response.get_json()


@pytest.mark.parametrize("method,path,body", ADMIN_ROUTES)
def test_every_admin_route_refuses_user_keys_and_missing_keys(client, user, admin, method,
                                                              path, body):
    status, answer = call(client, method, path, user[0], body)
    assert status == 403 and "admin key" in answer["error"]
    status, answer = call(client, method, path, None, body)
    assert status == 401 and "missing API key" in answer["error"]
    status, _ = call(client, method, path, {"Authorization": "Bearer ogw_wrong"}, body)
    assert status == 401
    # The refused calls changed nothing: the user's key still works and still is a user's.
    assert ApiKey.get_by_id(user[1].id).revoked_at is None
    assert ApiKey.get_by_id(user[1].id).role == "user"


def test_a_key_made_over_http_works_at_once_and_its_secret_is_shown_only_then(
        client, admin, fake):
    status, made = call(client, "POST", "/api/keys", admin[0],
                        {"name": "Production API Key", "role": "user", "rate_limit": 500})
    assert status == 201
    assert made["key"] == made["api_key"] and made["key"].startswith("ogw_")
    assert made["rate_limit"] == "500/hour"  # ollama-api-service's bare number: per hour
    assert made["key_preview"] == made["prefix"] == made["key"][:12]
    assert made["is_active"] is True
    assert ApiKey.get_by_id(made["id"]).key_hash == hash_key(made["key"])

    status, answer = call(client, "POST", "/api/generate", auth_header(made["key"]),
                          {"model": "llama3.2", "prompt": "hi", "stream": False})
    assert status == 200 and answer["done"] is True

    status, listing = call(client, "GET", "/api/keys", admin[0])
    assert status == 200 and listing["total"] == len(listing["api_keys"]) == 2
    status, one = call(client, "GET", f"/api/keys/{made['prefix']}", admin[0])
    assert one["name"] == "Production API Key"
    everything = json.dumps([listing, one])
    assert made["key"] not in everything and made["key"][12:] not in everything
    assert "hash" not in everything


def test_defaults_follow_the_role_as_in_ollama_api_service(client, admin):
    _, user_key = call(client, "POST", "/api/keys", admin[0], {"name": "u"})
    _, admin_key = call(client, "POST", "/api/keys", admin[0], {"name": "a", "role": "admin"})
    assert user_key["rate_limit"] == "100/hour"
    assert admin_key["rate_limit"] == "1000/hour"


@pytest.mark.parametrize("body,message", [
    ({"role": "user"}, "needs a name"),
    ({"name": "x", "role": "superuser"}, "role must be one of"),
    ({"name": "x", "rate_limit": "lots"}, "not N/unit"),
    ({"name": "x", "rate_limit": 1.5}, "rate_limit must be a string"),
    ({"name": "x", "max_concurrent": "many"}, "max_concurrent must be a whole number"),
    ({"name": "x", "max_concurrent": -1}, "max concurrent requests must be 0"),
    ({"name": "x", "max_ctx": True}, "max_ctx must be a whole number"),
    ({"name": "x", "models": [1, 2]}, "models must be a list"),
    ({"name": "x", "expires": "soon"}, "is not like 30d"),
    ({"name": "x", "keep_alive": "sometimes"}, "keep_alive must be allow or deny"),
    ({"name": "x", "colour": "red"}, "unknown field(s): colour"),
    ({"name": "x", "gpu_quota": "2x/day"}, "GPU quota '2x/day' is not TIME/day"),
    ({"name": "x", "gpu_quota": 7200}, "gpu_quota must be a string"),
    (["name", "x"], "must be a JSON object"),
])
def test_bad_settings_are_a_400_that_says_what_is_wrong(client, admin, body, message):
    before = ApiKey.select().count()
    status, answer = call(client, "POST", "/api/keys", admin[0], body)
    assert status == 400 and message in answer["error"]
    assert ApiKey.select().count() == before


def test_patch_changes_only_what_it_names_and_says_what_changed(client, admin, user):
    ident = user[1].prefix
    status, answer = call(client, "PATCH", f"/api/keys/{ident}", admin[0],
                          {"rate_limit": "5/minute", "models": ["llama3"], "name": "alice"})
    assert status == 200
    assert answer["changed"] == ["models", "rate_limit"]  # the name was already alice
    assert answer["rate_limit"] == "5/minute" and answer["models"] == ["llama3:latest"]
    assert answer["role"] == "user"
    status, again = call(client, "PATCH", f"/api/keys/{ident}", admin[0],
                         {"rate_limit": "5/minute"})
    assert status == 200 and again["changed"] == []


def test_revoke_and_rotate_end_the_old_secret(client, admin, user, make_key, fake):
    secret, row = make_key("bob")
    status, rotated = call(client, "POST", f"/api/keys/{row.id}/rotate", admin[0])
    assert status == 200 and rotated["previous_prefix"] == row.prefix
    assert rotated["key"] != secret and rotated["prefix"] == rotated["key"][:12]
    probe = {"model": "llama3.2", "prompt": "hi", "stream": False}
    client.application.extensions["key_cache"].clear()
    assert call(client, "POST", "/api/generate", auth_header(secret), probe)[0] == 401
    assert call(client, "POST", "/api/generate", auth_header(rotated["key"]), probe)[0] == 200

    status, revoked = call(client, "DELETE", f"/api/keys/{row.id}", admin[0])
    assert status == 200 and revoked["status"] == "revoked" and revoked["is_active"] is False
    assert "revoked" in revoked["message"]
    assert call(client, "DELETE", f"/api/keys/{row.id}", admin[0])[0] == 200  # twice is fine
    client.application.extensions["key_cache"].clear()
    assert call(client, "POST", "/api/generate", auth_header(rotated["key"]), probe)[0] == 401
    status, answer = call(client, "POST", f"/api/keys/{row.id}/rotate", admin[0])
    assert status == 400 and "revoked" in answer["error"]


def test_unknown_and_ambiguous_keys_are_404_and_409_never_a_guess(client, admin, make_key):
    assert call(client, "GET", "/api/keys/999999", admin[0])[0] == 404
    assert call(client, "DELETE", "/api/keys/ogw_nothere", admin[0])[0] == 404
    _, first = make_key("twin")
    _, second = make_key("twin2")
    ApiKey.update(prefix="ogw_Twin0001").where(ApiKey.id == first.id).execute()
    ApiKey.update(prefix="ogw_Twin0002").where(ApiKey.id == second.id).execute()
    status, answer = call(client, "DELETE", "/api/keys/ogw_Twin", admin[0])
    assert status == 409 and "more than one key" in answer["error"]
    assert ApiKey.get_by_id(first.id).revoked_at is None
    assert ApiKey.get_by_id(second.id).revoked_at is None


def test_a_live_keys_name_is_a_409_on_create_and_on_rename(client, admin, user, make_key):
    """ollama-api-service's POST /api/keys and ollama-gw's PATCH: one live key per name."""
    _, bob = make_key("bob")
    for method, path, body in (("POST", "/api/keys", {"name": "alice"}),
                               ("PATCH", f"/api/keys/{bob.id}", {"name": "alice"})):
        status, answer = call(client, method, path, admin[0], body)
        assert status == 409, answer
        assert answer["error"] == (f"a key named 'alice' already exists (key {user[1].id}, "
                                   f"{user[1].prefix}): choose another name, or revoke that "
                                   "key first")
    assert ApiKey.select().where(ApiKey.name == "alice").count() == 1
    assert call(client, "DELETE", "/api/keys/alice", admin[0])[0] == 200
    status, made = call(client, "POST", "/api/keys", admin[0], {"name": "alice"})
    assert status == 201 and call(client, "GET", "/api/keys/alice", admin[0])[1]["id"] == made["id"]


def test_the_audit_log_says_who_did_what_from_where_and_never_a_secret(client, admin, user):
    _, made = call(client, "POST", "/api/keys", admin[0], {"name": "ci", "rate_limit": "9/hour"})
    call(client, "PATCH", f"/api/keys/{made['id']}", admin[0], {"rate_limit": "60/minute"})
    _, rotated = call(client, "POST", f"/api/keys/{made['id']}/rotate", admin[0])
    call(client, "DELETE", f"/api/keys/{made['id']}", admin[0])

    status, log = call(client, "GET", "/api/admin/audit?action=key", admin[0])
    assert status == 200
    mine = [e for e in log["entries"] if e["target"] and f"key {made['id']} " in e["target"]]
    assert [e["action"] for e in mine] == ["key.revoked", "key.rotated", "key.updated",
                                           "key.created"]
    assert {e["via"] for e in mine} == {"http"}
    assert all(e["actor"].startswith(admin[1].prefix) for e in mine)
    assert all(e["source"] == "127.0.0.1" for e in mine)
    updated = next(e for e in mine if e["action"] == "key.updated")
    assert updated["details"] == {"before": {"rate_limit": "9/hour"},
                                  "after": {"rate_limit": "60/minute"}}
    text = json.dumps(log)
    for secret in (made["key"], rotated["key"]):
        assert secret not in text and secret[12:] not in text
    assert call(client, "GET", "/api/admin/audit?since=soon", admin[0])[0] == 400
    assert call(client, "GET", "/api/admin/audit?limit=0", admin[0])[0] == 400


def test_cli_actions_are_audited_with_the_os_user(runner, migrated):
    out = runner("keys", "add", "--name", "batch", "--json")
    made = json.loads(out.output)
    runner("keys", "update", str(made["id"]), "--max-concurrent", "3")
    runner("webhooks", "add", "http://127.0.0.1:9/hook?token=abc")
    runner("keys", "revoke", str(made["id"]), "--yes")
    entries = audit.entries(action=None)
    actions = [e["action"] for e in entries][:4]
    assert actions == ["key.revoked", "webhook.added", "key.updated", "key.created"]
    assert {e["via"] for e in entries[:4]} == {"cli"}
    assert entries[0]["actor"] == audit.os_user()
    webhook = entries[1]
    assert webhook["details"]["after"]["url"] == "http://127.0.0.1:9/hook"  # no token
    text = runner("audit", "--since", "1d").output
    assert "key.revoked" in text and "max_concurrent: - -> 3" in text
    listed = json.loads(runner("audit", "--json", "--action", "webhook").output)
    assert [e["action"] for e in listed] == ["webhook.added"]
    assert made["key"] not in runner("audit", "--json").output


def test_applying_migrations_is_audited(database_url, settings):
    from app.store import db as database
    instance = database.open_database(database_url)
    database.db.initialize(instance)
    applied = database.upgrade(instance)
    assert applied
    entry = audit.entries(action="db.upgraded")[0]
    assert entry["details"]["applied"] == applied and entry["via"] == "cli"
    assert database.upgrade(instance) == []
    assert len(audit.entries(action="db.upgraded")) == 1


def test_actions_inside_acting_as_are_the_consoles(migrated):
    from app.keys import registry as keystore
    with audit.acting_as(audit.cli_actor("shell")):
        keystore.create_key("x")
    assert audit.entries(action="key.created")[0]["via"] == "shell"


def test_a_gpu_quota_is_set_shown_and_cleared_over_http(client, admin, user):
    ident = user[1].prefix
    status, answer = call(client, "PATCH", f"/api/keys/{ident}", admin[0],
                          {"gpu_quota": "30m/day"})
    assert (status, answer["changed"], answer["gpu_quota"]) == (200, ["gpu_period",
                                                                      "gpu_quota"], "30m/day")
    assert (ApiKey.get_by_id(user[1].id).gpu_quota, ApiKey.get_by_id(user[1].id).gpu_period) \
        == (1800, "day")
    status, created = call(client, "POST", "/api/keys", admin[0],
                           {"name": "budgeted", "gpu_quota": "2h/month"})
    assert status == 201 and created["gpu_quota"] == "2h/month"
    status, answer = call(client, "PATCH", f"/api/keys/{ident}", admin[0], {"gpu_quota": "none"})
    assert status == 200 and answer["gpu_quota"] == "none"
    assert ApiKey.get_by_id(user[1].id).gpu_quota is None


def test_a_keys_cloud_setting_over_http(client, admin, fake):
    status, created = call(client, "POST", "/api/keys", admin[0], {"name": "agent"})
    assert status == 201 and created["cloud"] == "default"
    status, created = call(client, "POST", "/api/keys", admin[0],
                           {"name": "agent2", "cloud": "allow"})
    assert status == 201 and created["cloud"] == "allow"
    status, changed = call(client, "PATCH", f"/api/keys/{created['id']}", admin[0],
                           {"cloud": "default"})
    assert status == 200 and (changed["cloud"], changed["changed"]) == ("default", ["cloud"])
    assert ApiKey.get_by_id(created["id"]).cloud is None  # follows cloud_default again
    status, answer = call(client, "PATCH", f"/api/keys/{created['id']}", admin[0],
                          {"cloud": "yes"})
    assert status == 400 and "cloud must be allow, deny or default" in answer["error"]
    status, answer = call(client, "PATCH", f"/api/keys/{created['id']}", admin[0],
                          {"cloud": True})
    assert status == 400 and "cloud must be a string" in answer["error"]
