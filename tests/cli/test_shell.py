"""`ollama-gw shell`, go-ollama-api's console, driven through a terminal as a person would.

The console runs in a pty (pexpect) beside a running gateway on the same database: a
key it generates works at once, a key it removes stops working, and the audit log
says the console did it.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import requests

from tests import leak_check
from tests.conftest import reset_postgres
from tests.gateway_process import GatewayProcess, wait_for

pytestmark = pytest.mark.gateway
PROMPT = "ollama-gw> "
SECRET = re.compile(r"ogw_[A-Za-z0-9_-]{43}")
GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway(request, tmp_path_factory, fake_ollama):
    """One gateway per backend for the whole module: each test makes its own keys."""
    tmp = tmp_path_factory.mktemp("shell")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp}/shell.db"
    else:
        url = request.getfixturevalue("postgres_url")
        reset_postgres(url)
    with GatewayProcess(url, fake_ollama.url, workers=1, data_dir=tmp / "data") as gw:
        gw.start(tmp / "gateway.log")
        yield gw


@pytest.fixture
def console(gateway):
    """Start a console session; every one started is closed at the end, failures included."""
    sessions = []

    def start():
        child = pexpect.spawn(sys.executable, ["-m", "cli", "shell"], env=gateway.env,
                              encoding="utf-8", timeout=60, dimensions=(40, 200))
        sessions.append(child)
        child.expect_exact(PROMPT)
        return child

    yield start
    for child in sessions:
        child.close(force=True)


def run(child, line):
    """Type a line, return what the console printed before its next prompt."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    out = child.before.split("\r\n", 1)[-1]  # what follows the echoed line
    leak_check.remember_secrets(SECRET.findall(out))
    return out


def works(gateway, secret):
    return requests.post(gateway.url + "/api/generate", json=GENERATE, timeout=60,
                         headers={"Authorization": f"Bearer {secret}"}).status_code


def keys(gateway):
    return {k["id"]: k for k in json.loads(gateway.cli("keys", "list", "--json").stdout)}


def test_generatekey_makes_a_working_key_while_the_gateway_runs(gateway, console):
    child = console()
    out = run(child, "generatekey build server")
    [secret] = SECRET.findall(out)
    assert "10/minute" in out and "'build server'" in out
    assert works(gateway, secret) == 200
    made = [k for k in keys(gateway).values() if k["name"] == "build server"]
    assert len(made) == 1 and made[0]["rate_limit"] == "10/minute"

    out = run(child, "generatekeys 3")
    assert len(set(SECRET.findall(out))) == 3
    listing = run(child, "listkeys")
    assert listing.count("10/minute") == 4 and "build server" in listing
    assert not SECRET.search(listing)  # prefixes only, never a secret


def test_removekey_takes_the_pasted_key_and_the_gateway_refuses_it(gateway, console):
    child = console()
    [secret] = SECRET.findall(run(child, "generatekey"))
    assert works(gateway, secret) == 200
    out = run(child, f"removekey {secret}")
    assert "Revoked key" in out and secret not in out
    assert wait_for(lambda: works(gateway, secret) == 401, 30)
    entries = [e for e in audit_entries(gateway) if e["action"] == "key.revoked"]
    assert entries and entries[0]["via"] == "shell"


def audit_entries(gateway):
    return json.loads(gateway.cli("audit", "--json").stdout)


def test_webhook_commands_and_mistakes(gateway, console):
    child = console()
    out = run(child, "addwebhook http://127.0.0.1:9/hook")
    assert re.search(r"whsec_\S+", out) and "Added webhook" in out
    hook_id = re.search(r"Added webhook (\d+)", out).group(1)
    assert "http://127.0.0.1:9/hook" in run(child, "listwebhooks")
    assert f"Deleted webhook {hook_id}" in run(child, f"deletewebhook {hook_id}")
    assert "no webhooks yet" in run(child, "listwebhooks")
    assert "error: no webhook with id" in run(child, f"deletewebhook {hook_id}")
    assert "unknown command 'frobnicate'" in run(child, "frobnicate now")
    assert "must be a number from 1 to 100" in run(child, "generatekeys 1000")
    assert "usage: removekey KEY" in run(child, "removekey")
    assert "error: no key" in run(child, "removekey ogw_nothere")
    help_text = run(child, "help")
    for command in ("generatekey", "generatekeys", "listkeys", "removekey", "addwebhook",
                    "deletewebhook", "listwebhooks", "help", "exit"):
        assert command in help_text
    assert run(child, "").strip() == ""  # an empty line does not repeat the last command
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0
    assert {e["via"] for e in audit_entries(gateway)
            if e["action"].startswith("webhook.")} == {"shell"}


def test_history_is_kept_between_sessions_without_secrets(gateway, console):
    first = console()
    [secret] = SECRET.findall(run(first, "generatekey"))
    run(first, f"removekey {secret}")
    run(first, "listwebhooks")
    first.sendeof()  # Ctrl-D leaves too
    first.expect(pexpect.EOF)
    history = (Path(gateway.env["OLLAMA_GW_DATA_DIR"]) / "shell_history").read_text()
    assert "removekey ogw_" in history and secret not in history

    second = console()
    second.send("\x1b[A")  # up arrow: the last line comes back, ready to edit
    second.sendline("")
    second.expect_exact(PROMPT)
    assert "listwebhooks" in second.before and "no webhooks yet" in second.before


def test_piped_commands_and_no_stdin_end_cleanly(gateway):
    piped = subprocess.run([sys.executable, "-m", "cli", "shell"], input="listkeys\nhelp\n",
                           env=gateway.env, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and "generatekey" in piped.stdout
    # As under systemd: stdin is /dev/null. The Go console spun at 100 % CPU here.
    with open("/dev/null") as devnull:
        quiet = subprocess.run([sys.executable, "-m", "cli", "shell"], stdin=devnull,
                               env=gateway.env, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_generated_names_never_collide_across_sessions(gateway, console):
    first, second = console(), console()
    number = int(re.search(r"'shell key (\d+)'", run(first, "generatekey"))[1])
    assert f"'shell key {number + 1}'" in run(second, "generatekey")
    assert f"'shell key {number + 2}'" in run(first, "generatekey")
    out = run(second, f"generatekey shell key {number}")
    assert f"error: a key named 'shell key {number}' already exists" in out
    assert not SECRET.search(out)
    names = [k["name"] for k in keys(gateway).values() if k["status"] == "active"]
    assert len(names) == len(set(names))


def test_a_piped_session_whose_command_failed_exits_non_zero(gateway):
    piped = subprocess.run([sys.executable, "-m", "cli", "shell"],
                           input="removekey ogw_nothere\nlistkeys\n", env=gateway.env,
                           capture_output=True, text=True, timeout=120)
    assert piped.returncode == 1, piped.stdout
    assert "error: no key" in piped.stdout and "PREFIX" in piped.stdout  # it went on
    unknown = subprocess.run([sys.executable, "-m", "cli", "shell"], input="frobnicate\n",
                             env=gateway.env, capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 1


def test_listkeys_prints_times_as_keys_list_does(gateway):
    created = gateway.add_key("--name", "timed")
    assert works(gateway, created["key"]) == 200
    assert wait_for(lambda: keys(gateway)[created["id"]]["last_used_at"], 30)
    listing = subprocess.run([sys.executable, "-m", "cli", "shell"], input="listkeys\n",
                             env=gateway.env, capture_output=True, text=True, timeout=120)
    [row] = [line for line in listing.stdout.splitlines() if created["prefix"] in line]
    cli_row = [line for line in gateway.cli("keys", "list").stdout.splitlines()
               if created["prefix"] in line][0]
    used = re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", cli_row)[0]
    assert row.rstrip().endswith(used) and "+00:00" not in listing.stdout


def test_the_console_says_so_when_the_database_cannot_be_opened(tmp_path):
    env = {"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "cli", "shell"], input="listkeys\n",
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "cannot open the database" in result.stderr
