"""Gateway keys: secrets shown once and stored hashed, found safely, changed with checks."""
import datetime
import hashlib

import pytest

from app.keys.registry import (
    KeyInfo,
    KeyNameTaken,
    KeyOpError,
    create_key,
    find_key,
    list_keys,
    next_numbered_name,
    normalize_model,
    parse_models,
    revoke_key,
    rotate_key,
    update_key,
)
from app.store.models import ApiKey, utcnow


def _set_prefix(row, prefix):
    ApiKey.update(prefix=prefix).where(ApiKey.id == row.id).execute()


def test_secret_is_prefixed_long_and_random(make_key):
    first, _ = make_key()
    second, _ = make_key()
    assert first.startswith("ogw_")
    assert len(first) >= 40
    assert first != second


def test_secret_is_stored_only_as_its_sha256(make_key):
    secret, row = make_key()
    stored = ApiKey.get_by_id(row.id)
    assert stored.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    for column, value in stored.__data__.items():
        assert secret not in str(value), f"column {column} holds the secret"
        assert secret[len("ogw_"):] not in str(value), f"column {column} holds the secret"


def test_prefix_is_the_first_twelve_characters(make_key):
    secret, row = make_key()
    assert row.prefix == secret[:12]


def test_key_is_found_by_id_prefix_and_full_secret(make_key):
    secret, row = make_key(name="found")
    make_key(name="other")
    assert find_key(row.id).id == row.id
    assert find_key(str(row.id)).id == row.id
    assert find_key(row.prefix).id == row.id
    assert find_key(secret).id == row.id


def test_prefix_shared_by_two_keys_is_refused_not_guessed(make_key):
    _, first = make_key(name="first")
    _, second = make_key(name="second")
    _set_prefix(first, "ogw_Abcdef12")
    _set_prefix(second, "ogw_Abcdef34")
    with pytest.raises(KeyOpError, match="more than one"):
        find_key("ogw_Abcdef")
    assert find_key("ogw_Abcdef34").id == second.id


def test_prefix_is_matched_case_sensitively(make_key):
    # Secrets are case-sensitive base64: ogw_abc… and ogw_ABC… are different keys.
    _, lower = make_key(name="lower")
    _, upper = make_key(name="upper")
    _set_prefix(lower, "ogw_abcdefgh")
    _set_prefix(upper, "ogw_ABCDEFGH")
    assert find_key("ogw_abcdefgh").id == lower.id
    assert find_key("ogw_ABCD").id == upper.id
    _set_prefix(upper, "ogw_ZZZZZZZZ")
    with pytest.raises(KeyOpError, match="no key"):
        find_key("ogw_ABCDEFGH")


@pytest.mark.parametrize("ident, message", [
    ("ogw_", "too short"),
    ("abc", "no key named 'abc'"),
    ("999", "no key with id 999"),
    ("ogw_zzzzzzzz", "no key with prefix"),
    ("ogw_" + "x" * 43, "no key matches that secret"),
])
def test_unknown_or_vague_identifiers_are_refused(make_key, ident, message):
    make_key()
    with pytest.raises(KeyOpError, match=message):
        find_key(ident)


def test_revoke_sets_revoked_at_and_is_idempotent(make_key):
    _, row = make_key()
    revoked = revoke_key(row.id)
    assert revoked.revoked_at is not None
    assert abs(revoked.revoked_at - utcnow()) < datetime.timedelta(minutes=1)
    again = revoke_key(row.prefix)
    assert again.revoked_at == revoked.revoked_at
    assert [k.id for k in list_keys(include_revoked=False)] == []
    assert [k.id for k in list_keys()] == [row.id]


def test_rotate_gives_a_new_secret_and_keeps_the_key(make_key):
    old_secret, row = make_key(name="rotating", rate_limit="5/minute", models="llama3",
                               max_concurrent=2, role="admin")
    rotated, new_secret = rotate_key(row.prefix)
    assert new_secret != old_secret and new_secret.startswith("ogw_")
    assert rotated.prefix == new_secret[:12] != row.prefix
    assert rotated.key_hash == hashlib.sha256(new_secret.encode()).hexdigest()
    assert (rotated.id, rotated.name, rotated.role) == (row.id, "rotating", "admin")
    assert (rotated.rate_limit, rotated.rate_period) == (5, 60)
    assert (rotated.max_concurrent, rotated.models) == (2, "llama3:latest")
    assert find_key(new_secret).id == row.id
    with pytest.raises(KeyOpError):
        find_key(old_secret)
    with pytest.raises(KeyOpError):
        find_key(row.prefix)


def test_revoked_key_cannot_be_rotated(make_key):
    _, row = make_key()
    revoke_key(row.id)
    with pytest.raises(KeyOpError, match="revoked"):
        rotate_key(row.id)


def test_update_changes_limits_models_role_and_expiry(make_key):
    _, row = make_key(name="before")
    updated, _ = update_key(row.id, name="after", rate_limit="10/day", models="llama3, qwen*",
                            role="admin", max_concurrent=3, expires="2w")
    assert updated.name == "after"
    assert (updated.rate_limit, updated.rate_period) == (10, 86400)
    assert parse_models(updated.models) == ("llama3:latest", "qwen*")
    assert updated.role == "admin"
    assert updated.max_concurrent == 3
    expected = utcnow() + datetime.timedelta(weeks=2)
    assert abs(updated.expires_at - expected) < datetime.timedelta(minutes=1)


def test_update_can_clear_limits(make_key):
    _, row = make_key(models="llama3", max_concurrent=2, expires="1d")
    cleared, _ = update_key(row.id, rate_limit="none", models="", max_concurrent=0, expires="never")
    assert cleared.rate_limit is None
    assert cleared.models is None
    assert cleared.max_concurrent is None
    assert cleared.expires_at is None
    assert KeyInfo.from_row(cleared).allows_model("anything")


def test_update_leaves_unnamed_settings_alone(make_key):
    _, row = make_key(rate_limit="5/minute", models="llama3", role="admin")
    updated, changed = update_key(row.id, name="renamed")
    assert changed == ["name"]
    assert (updated.rate_limit, updated.rate_period, updated.models, updated.role) == (
        5, 60, "llama3:latest", "admin")


def test_update_to_the_settings_a_key_already_has_changes_nothing(make_key):
    _, row = make_key(name="same", rate_limit="5/minute", models="llama3")
    updated, changed = update_key(row.id, name="same", rate_limit="5/minute", models="llama3")
    assert changed == []
    assert (updated.name, updated.rate_limit, updated.models) == ("same", 5, "llama3:latest")


def test_key_is_found_by_its_name_the_live_one_before_revoked_namesakes(make_key):
    _, alice = make_key(name="alice")
    assert find_key("alice").id == alice.id
    revoke_key(alice.id)
    _, again = make_key(name="alice")
    assert find_key("alice").id == again.id
    revoke_key(again.id)
    with pytest.raises(KeyOpError, match=f"more than one key \\(ids {alice.id}, {again.id}\\)"):
        find_key("alice")


def test_a_live_keys_name_is_refused_for_a_new_key_and_for_a_rename(make_key):
    _, alice = make_key(name="alice")
    _, bob = make_key(name="bob")
    message = f"a key named 'alice' already exists \\(key {alice.id}, {alice.prefix}\\)"
    with pytest.raises(KeyNameTaken, match=message):
        create_key("alice")
    with pytest.raises(KeyNameTaken, match=message):
        update_key(bob.id, name=" alice ")
    assert ApiKey.select().count() == 2 and ApiKey.get_by_id(bob.id).name == "bob"
    assert update_key(alice.id, name="alice")[1] == []  # its own name is no clash
    assert create_key("Alice")[0].name == "Alice"  # names are compared exactly


def test_a_revoked_keys_name_is_free_again_and_a_revoked_key_may_be_renamed_to_a_live_name(
        make_key):
    _, alice = make_key(name="alice")
    revoke_key(alice.id)
    again, _ = create_key("alice")
    assert update_key(alice.id, name="alice")[1] == []
    _, old = make_key(name="old")
    revoke_key(old.id)
    assert update_key(old.id, name="alice")[0].name == "alice"
    with pytest.raises(KeyNameTaken):
        create_key("alice")
    assert find_key("alice").id == again.id


def test_a_creator_that_raced_past_the_name_check_gets_the_same_error(make_key, monkeypatch):
    """Two workers check at once and both find the name free: the index refuses one."""
    _, alice = make_key(name="alice")
    _, bob = make_key(name="bob")
    monkeypatch.setattr("app.keys.registry._require_free_name", lambda *args, **kwargs: None)
    with pytest.raises(KeyNameTaken, match=f"already exists \\(key {alice.id}, "):
        create_key("alice")
    with pytest.raises(KeyNameTaken, match=f"already exists \\(key {alice.id}, "):
        update_key(bob.id, name="alice")
    assert [row.name for row in ApiKey.select().order_by(ApiKey.id)] == ["alice", "bob"]


def test_numbered_names_continue_after_the_highest_any_key_has(make_key):
    assert next_numbered_name("shell key") == "shell key 1"
    _, first = make_key(name="shell key 1")
    make_key(name="shell key 3")
    make_key(name="shell key x")
    make_key(name="shell keys 9")
    revoke_key(first.id)
    assert next_numbered_name("shell key") == "shell key 4"


@pytest.mark.parametrize("changes, message", [
    ({"role": "root"}, "role must be one of user, admin"),
    ({"rate_limit": "lots"}, "60/minute"),
    ({"rate_limit": "0/minute"}, "at least 1"),
    ({"max_concurrent": -1}, "0 \\(no limit\\) to 1000000"),
    ({"expires": "soon"}, "30d"),
    ({"name": "  "}, "name cannot be empty"),
    ({"name": "x" * 201}, "at most 200 characters"),
])
def test_update_refuses_bad_values_and_changes_nothing(make_key, changes, message):
    _, row = make_key(name="kept", rate_limit="5/minute")
    with pytest.raises(KeyOpError, match=message):
        update_key(row.id, **changes)
    kept = ApiKey.get_by_id(row.id)
    assert (kept.name, kept.role, kept.rate_limit, kept.rate_period) == ("kept", "user", 5, 60)


@pytest.mark.parametrize("options, message", [
    ({"name": ""}, "needs a name"),
    ({"name": "x" * 201}, "at most 200"),
    ({"name": "x", "role": "root"}, "role must be one of"),
    ({"name": "x", "rate_limit": "10/fortnight"}, "60/minute"),
])
def test_create_refuses_bad_values(migrated, options, message):
    with pytest.raises(KeyOpError, match=message):
        create_key(**options)
    assert list_keys() == []


@pytest.mark.parametrize("role, limit", [("user", (100, 3600)), ("admin", (1000, 3600))])
def test_default_rate_limit_depends_on_the_role(migrated, role, limit):
    row, _ = create_key("defaults", role=role)
    assert (row.rate_limit, row.rate_period) == limit


def test_configured_default_rate_limits_are_used(migrated):
    defaults = {"user": "7/minute", "admin": "70/minute"}
    user, _ = create_key("u", role="user", default_rate_limits=defaults)
    admin, _ = create_key("a", role="admin", default_rate_limits=defaults)
    assert (user.rate_limit, user.rate_period) == (7, 60)
    assert (admin.rate_limit, admin.rate_period) == (70, 60)


def test_expiring_key_is_expired_after_its_lifetime(make_key):
    _, row = make_key(expires="1h")
    info = KeyInfo.from_row(ApiKey.get_by_id(row.id))
    assert not info.is_expired()
    assert info.is_expired(now=utcnow() + datetime.timedelta(hours=1, seconds=1))


@pytest.mark.parametrize("name, normalized", [
    ("llama3", "llama3:latest"),
    ("llama3:latest", "llama3:latest"),
    ("llama3:8b", "llama3:8b"),
    (" llama3 ", "llama3:latest"),
    ("hf.co/org/model:Q4", "hf.co/org/model:Q4"),
    ("hf.co/org/model", "hf.co/org/model:latest"),
    ("localhost:5000/llama3", "localhost:5000/llama3:latest"),
    ("registry.io:443/ns/model:7b", "registry.io:443/ns/model:7b"),
])
def test_model_names_are_normalized_like_ollama(name, normalized):
    assert normalize_model(name) == normalized


def _info(models):
    return KeyInfo(1, "ogw_abcdefgh", "t", "user", None, 3600, None, parse_models(models),
                   None, None)


@pytest.mark.parametrize("allowed, model, ok", [
    (None, "anything:7b", True),
    ("", "llama3", True),
    ("llama3", "llama3", True),
    ("llama3", "llama3:latest", True),
    ("llama3:latest", "llama3", True),
    ("llama3", "llama3:70b", False),
    ("llama3", "llama3.2", False),
    ("llama3:8b", "llama3", False),
    ("llama3*", "llama3:70b", True),
    ("llama3*", "llama3.2", True),
    ("llama3*", "qwen2.5:0.5b", False),
    ("llama3:*", "llama3", True),
    ("llama3, qwen2.5:0.5b", "qwen2.5:0.5b", True),
    ("llama3, qwen2.5:0.5b", "qwen2.5:7b", False),
    ("hf.co/org/model:Q4", "hf.co/org/model:Q4", True),
    ("hf.co/org/model:Q4", "hf.co/org/model:Q8", False),
    ("hf.co/org/model", "hf.co/org/model", True),
    ("hf.co/org/*", "hf.co/org/model:Q4", True),
    ("hf.co/org/*", "hf.co/other/model:Q4", False),
    # Letter case is ignored, as Ollama ignores it when it resolves a name.
    ("llama3", "LLAMA3", True),
    ("Llama3:8B", "llama3:8b", True),
    ("QWEN*", "qwen2.5:0.5b", True),
    ("llama3", "LLAMA3:70B", False),
])
def test_model_allow_list(allowed, model, ok):
    assert _info(allowed).allows_model(model) is ok
