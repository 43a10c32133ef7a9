"""The `ollama-gw` command as an admin uses it: keys, db, check, --config."""
import json
import re

import pytest

from tests.store.test_migrations import MIGRATIONS

SECRET = re.compile(r"ogw_[A-Za-z0-9_-]{43}")


def add_key(runner, *options):
    """`keys add --json` -> the printed object (with the secret)."""
    result = runner("keys", "add", "--json", *options)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_clean_failure(result, *phrases, code=None):
    assert result.exit_code != 0
    if code is not None:
        assert result.exit_code == code
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.output


def test_add_json_prints_one_object_with_the_secret(runner):
    result = runner("keys", "add", "--name", "script", "--json")
    assert result.exit_code == 0
    created = json.loads(result.stdout)  # the whole output is one JSON document
    assert isinstance(created, dict)
    assert created["key"].startswith("ogw_") and len(created["key"]) > 40
    assert created["prefix"] == created["key"][:12]
    assert isinstance(created["id"], int)
    assert created["name"] == "script"
    assert created["rate_limit"] == "100/hour"


def test_add_for_people_shows_the_secret_once_and_says_so(runner):
    result = runner("keys", "add", "--name", "alice", "--role", "admin")
    assert result.exit_code == 0
    secrets = SECRET.findall(result.output)
    assert len(secrets) == 1
    assert result.output.count(secrets[0]) == 1
    assert "shown once" in result.output
    assert "admin" in result.output and "1000/hour" in result.output


@pytest.mark.parametrize("command", [
    ["keys", "list"],
    ["keys", "list", "--json"],
    ["keys", "show", "{id}"],
    ["keys", "show", "{prefix}", "--json"],
    ["keys", "update", "{id}", "--name", "renamed", "--json"],
    ["keys", "revoke", "{id}", "--yes", "--json"],
])
def test_secret_is_never_printed_after_creation(runner, command):
    created = add_key(runner, "--name", "alice")
    result = runner(*[part.format(**created) for part in command])
    assert result.exit_code == 0
    assert created["key"] not in result.output
    assert created["key"][12:] not in result.output
    assert not SECRET.search(result.output)


def test_list_shows_prefix_name_and_status(runner):
    alice = add_key(runner, "--name", "alice")
    add_key(runner, "--name", "bob", "--models", "llama3")
    runner("keys", "revoke", str(alice["id"]), "--yes")
    result = runner("keys", "list")
    assert result.exit_code == 0
    header, *lines = result.output.splitlines()
    assert header.split()[:3] == ["ID", "PREFIX", "NAME"]
    assert len(lines) == 2
    assert alice["prefix"] in lines[0] and "alice" in lines[0] and "revoked" in lines[0]
    assert "bob" in lines[1] and "active" in lines[1] and "llama3:latest" in lines[1]
    active = runner("keys", "list", "--active", "--json")
    assert [k["name"] for k in json.loads(active.stdout)] == ["bob"]


def test_list_with_no_keys_says_how_to_add_one(runner):
    result = runner("keys", "list")
    assert result.exit_code == 0
    assert "keys add --name" in result.output


@pytest.mark.parametrize("field", ["id", "prefix"])
def test_show_finds_a_key_by_id_or_prefix(runner, field):
    created = add_key(runner, "--name", "alice", "--rate-limit", "60/minute")
    result = runner("keys", "show", str(created[field]), "--json")
    assert result.exit_code == 0
    shown = json.loads(result.stdout)
    assert (shown["id"], shown["name"], shown["rate_limit"]) == (created["id"], "alice",
                                                                 "60/minute")
    people = runner("keys", "show", str(created[field]))
    assert "alice" in people.output and created["prefix"] in people.output


def test_update_changes_rate_limit_and_models(runner):
    created = add_key(runner, "--name", "alice")
    result = runner("keys", "update", str(created["id"]), "--rate-limit", "5/minute",
                    "--models", "a,b", "--json")
    assert result.exit_code == 0
    updated = json.loads(result.stdout)
    assert updated["rate_limit"] == "5/minute"
    assert updated["models"] == ["a:latest", "b:latest"]
    shown = json.loads(runner("keys", "show", str(created["id"]), "--json").stdout)
    assert (shown["rate_limit"], shown["models"]) == ("5/minute", ["a:latest", "b:latest"])


def test_revoke_asks_and_no_keeps_the_key(runner):
    created = add_key(runner, "--name", "alice")
    result = runner("keys", "revoke", str(created["id"]), input="n\n")
    assert result.exit_code == 1
    assert "Revoke key" in result.output and "Aborted" in result.output
    shown = json.loads(runner("keys", "show", str(created["id"]), "--json").stdout)
    assert shown["status"] == "active" and shown["revoked_at"] is None


def test_revoke_asks_and_yes_revokes(runner):
    created = add_key(runner, "--name", "alice")
    result = runner("keys", "revoke", created["prefix"], input="y\n")
    assert result.exit_code == 0
    assert "Revoked key" in result.output
    shown = json.loads(runner("keys", "show", str(created["id"]), "--json").stdout)
    assert shown["status"] == "revoked" and shown["revoked_at"]


def test_revoke_with_yes_does_not_ask(runner):
    created = add_key(runner, "--name", "alice")
    result = runner("keys", "revoke", str(created["id"]), "--yes", "--json")
    assert result.exit_code == 0
    assert "?" not in result.output
    assert json.loads(result.stdout)["status"] == "revoked"


def test_rotate_asks_and_no_keeps_the_secret(runner):
    created = add_key(runner, "--name", "alice")
    result = runner("keys", "rotate", str(created["id"]), input="n\n")
    assert result.exit_code == 1
    assert runner("keys", "show", created["key"]).exit_code == 0


def test_rotate_gives_a_new_secret_and_the_old_one_stops_finding_the_key(runner):
    created = add_key(runner, "--name", "alice", "--rate-limit", "5/minute")
    result = runner("keys", "rotate", str(created["id"]), "--yes", "--json")
    assert result.exit_code == 0
    rotated = json.loads(result.stdout)
    assert rotated["key"].startswith("ogw_") and rotated["key"] != created["key"]
    assert rotated["prefix"] == rotated["key"][:12] != created["prefix"]
    assert (rotated["id"], rotated["name"], rotated["rate_limit"]) == (
        created["id"], "alice", "5/minute")
    assert runner("keys", "show", rotated["key"]).exit_code == 0
    assert_clean_failure(runner("keys", "show", created["key"]), "no key matches", code=1)


@pytest.mark.parametrize("args, phrases, code", [
    (["keys", "show", "999"], ["no key with id 999"], 1),
    (["keys", "revoke", "999", "--yes"], ["no key with id 999"], 1),
    (["keys", "rotate", "999", "--yes"], ["no key with id 999"], 1),
    (["keys", "update", "999", "--rate-limit", "5/minute"], ["no key with id 999"], 1),
    (["keys", "show", "ogw_nothere"], ["no key with prefix"], 1),
    (["keys", "show", "ab"], ["too short"], 1),
    (["keys", "add", "--name", "x", "--rate-limit", "lots"], ["'lots'", "60/minute"], 1),
    (["keys", "add", "--name", "x", "--rate-limit", "0/minute"], ["at least 1"], 1),
    (["keys", "add", "--name", "x", "--role", "root"], ["--role", "'root'"], 2),
    (["keys", "add", "--name", "x", "--expires", "soon"], ["'soon'", "30d"], 1),
    (["keys", "add", "--name", "x", "--max-concurrent", "-1"], ["--max-concurrent"], 2),
    (["keys", "add", "--name", "  "], ["needs a name"], 1),
    (["keys", "add"], ["Missing option '--name'"], 2),
])
def test_errors_exit_non_zero_with_a_message_and_no_traceback(runner, args, phrases, code):
    add_key(runner, "--name", "existing")
    result = runner(*args)
    assert_clean_failure(result, *phrases, code=code)
    assert "Error" in result.output
    listed = json.loads(runner("keys", "list", "--json").stdout)
    assert [k["name"] for k in listed] == ["existing"]  # a failed command changes nothing


def test_bad_update_changes_nothing(runner):
    created = add_key(runner, "--name", "alice", "--rate-limit", "5/minute")
    result = runner("keys", "update", str(created["id"]), "--rate-limit", "5/minute",
                    "--expires", "soon")
    assert_clean_failure(result, "30d", code=1)
    shown = json.loads(runner("keys", "show", str(created["id"]), "--json").stdout)
    assert shown["expires_at"] is None


def test_fresh_database_shows_pending_then_upgrade_applies_it(runner):
    status = runner("db", "status")
    assert status.exit_code == 0
    assert re.search(r"^pending\s+0001_initial", status.output, re.M)
    upgrade = runner("db", "upgrade")
    assert upgrade.exit_code == 0
    assert "applied: 0001_initial" in upgrade.output
    assert runner("db", "upgrade").output.strip() == "already up to date"


def test_any_command_applies_the_schema(runner):
    assert runner("keys", "list").exit_code == 0
    status = runner("db", "status")
    assert status.exit_code == 0
    assert re.search(r"^applied\s+0001_initial", status.output, re.M)
    as_json = json.loads(runner("db", "status", "--json").stdout)
    assert [m["name"] for m in as_json] == MIGRATIONS
    assert all(m["applied_at"] for m in as_json)
    upgrade = runner("db", "upgrade")
    assert upgrade.exit_code == 0
    assert "already up to date" in upgrade.output


def test_check_passes_against_a_running_ollama(runner, fake):
    result = runner("check")
    assert result.exit_code == 0, result.output
    assert f"upstream {fake.url}: ok" in result.output
    assert "all checks passed" in result.output


def test_check_names_an_unreachable_upstream(runner, monkeypatch):
    monkeypatch.setenv("OLLAMA_URL", "http://127.0.0.1:1")
    result = runner("check")
    assert_clean_failure(result, "upstream http://127.0.0.1:1: FAILED", "Error: 1 problem found\n")
    assert "all checks passed" not in result.output


def test_check_names_an_unreachable_database(runner, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{blocker}/sub/gateway.db")
    result = runner("check")
    assert_clean_failure(result, "database: FAILED", "Error: 1 problem found\n")


def test_check_counts_problems_in_words(runner, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{blocker}/sub/gateway.db")
    monkeypatch.setenv("OLLAMA_URL", "http://127.0.0.1:1")
    assert_clean_failure(runner("check"), "Error: 2 problems found\n")


def test_check_reports_a_bad_setting(runner, monkeypatch):
    monkeypatch.setenv("OLLAMA_GW_WORKERS", "many")
    assert_clean_failure(runner("check"), "configuration", "workers", code=1)


@pytest.fixture
def config_env(monkeypatch):
    """Undo the OLLAMA_GW_CONFIG that `--config` exports for gunicorn workers."""
    monkeypatch.setenv("OLLAMA_GW_CONFIG", "")
    monkeypatch.delenv("OLLAMA_GW_CONFIG")


def test_missing_config_file_fails_clearly(runner, config_env, tmp_path):
    missing = tmp_path / "missing.toml"
    result = runner("--config", str(missing), "keys", "list")
    assert_clean_failure(result, f"config file {missing} does not exist", code=1)


def test_config_file_is_honoured(runner, config_env, tmp_path):
    config = tmp_path / "gw.toml"
    config.write_text('default_rate_limit_user = "7/minute"\n')
    assert add_key(runner, "--name", "before")["rate_limit"] == "100/hour"
    result = runner("--config", str(config), "keys", "add", "--name", "x", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rate_limit"] == "7/minute"


def test_bad_config_file_fails_naming_the_setting(runner, config_env, tmp_path):
    config = tmp_path / "gw.toml"
    config.write_text('default_rate_limit_user = "lots"\n')
    result = runner("--config", str(config), "keys", "list")
    assert_clean_failure(result, "default_rate_limit_user", code=1)


@pytest.mark.parametrize("option", [
    ["--expires", "99999999999d"], ["--max-concurrent", "99999999999"],
    ["--rate-limit", "99999999999/minute"],
])
def test_huge_values_are_refused_with_a_message_not_a_traceback(runner, option):
    result = runner("keys", "add", "--name", "huge", *option)
    assert result.exit_code == 1
    assert "Traceback" not in result.output and "Error:" in result.output


def test_version_says_which_version_runs(runner):
    from importlib.metadata import version

    result = runner("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"ollama-gw {version('ollama-gw')}"


def test_add_says_which_database_the_key_went_to(runner, settings):
    result = runner("keys", "add", "--name", "where")
    assert result.exit_code == 0
    database = settings.database_url.split("@")[-1]  # the part a redacted URL keeps
    assert "Database: " in result.output and database in result.output


def test_keys_can_be_named_by_their_name(runner):
    created = add_key(runner, "--name", "build-bot")
    shown = json.loads(runner("keys", "show", "build-bot", "--json").stdout)
    assert shown["id"] == created["id"]
    assert_clean_failure(runner("keys", "add", "--name", "build-bot"),
                         "a key named 'build-bot' already exists "
                         f"(key {created['id']}, {created['prefix']})", code=1)
    other = add_key(runner, "--name", "deploy-bot")
    assert_clean_failure(runner("keys", "update", "deploy-bot", "--name", "build-bot"),
                         "a key named 'build-bot' already exists", code=1)
    runner("keys", "revoke", "build-bot", "--yes")
    again = add_key(runner, "--name", "build-bot")  # a revoked key's name is free again
    assert json.loads(runner("keys", "show", "build-bot", "--json").stdout)["id"] == again["id"]
    assert runner("keys", "update", "deploy-bot", "--name", "deploy-bot 2").exit_code == 0
    assert json.loads(runner("keys", "show", str(other["id"]), "--json").stdout)["name"] == (
        "deploy-bot 2")


def test_update_with_nothing_to_change_is_a_usage_error(runner):
    created = add_key(runner, "--name", "alice")
    result = runner("keys", "update", str(created["id"]))
    assert_clean_failure(result, "nothing to change", "--rate-limit", code=2)


def test_update_to_the_same_settings_says_nothing_changed(runner):
    created = add_key(runner, "--name", "alice", "--rate-limit", "5/minute")
    same = runner("keys", "update", "alice", "--rate-limit", "5/minute")
    assert same.exit_code == 0
    assert "already has these settings; nothing changed" in same.output
    changed = runner("keys", "update", "alice", "--rate-limit", "6/minute", "--name", "al")
    assert f"Updated key {created['id']}" in changed.output
    assert "name, rate_limit" in changed.output


def _commands(group, path=()):
    import click

    yield path
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name)


@pytest.mark.parametrize("width", [80, 60])
def test_help_never_cuts_a_summary_or_breaks_an_option_name(width):
    """Every command's --help: summaries whole (no `...`), no word split at a hyphen."""
    from click.testing import CliRunner

    from cli import cli

    for path in _commands(cli):
        output = CliRunner().invoke(cli, [*path, "--help"], terminal_width=width).output
        listed = output.partition("Commands:")[2].splitlines()
        assert not [line for line in listed if line.endswith("...")], (path, output)
        broken = [line for line in output.splitlines() if re.search(r"\w-$", line)]
        assert not broken, (path, broken)


def test_top_level_help_lists_each_command_in_one_complete_sentence():
    from click.testing import CliRunner

    from cli import cli

    listed = CliRunner().invoke(cli, ["--help"], terminal_width=80).output.partition(
        "Commands:")[2].splitlines()
    summaries = [line.split(None, 1)[1] for line in listed if line.strip()
                 and not line.startswith(" " * 5)]
    assert len(summaries) >= 10 and all(s.endswith(".") for s in summaries), summaries


def test_cloud_is_default_until_set_and_default_again_on_request(runner):
    created = add_key(runner, "--name", "cloudy")
    assert created["cloud"] == "default"
    allowed = add_key(runner, "--name", "cloud-ok", "--cloud", "allow")
    assert allowed["cloud"] == "allow"
    result = runner("keys", "update", "cloudy", "--cloud", "deny", "--json")
    assert json.loads(result.stdout)["changed"] == ["cloud"]
    result = runner("keys", "update", "cloudy", "--cloud", "default", "--json")
    assert json.loads(result.stdout)["cloud"] == "default"
    again = runner("keys", "update", "cloudy", "--cloud", "default")
    assert "nothing changed" in again.output
    assert_clean_failure(runner("keys", "update", "cloudy", "--cloud", "maybe"),
                         "'maybe' is not one of 'allow', 'deny', 'default'")
    audit = runner("audit", "--action", "key.updated").output
    assert "cloud: default -> deny" in audit and "cloud: deny -> default" in audit
