"""The Debian package on this machine: build, install, serve as the unit would, upgrade, purge.

It installs a package and creates a system user, so it needs root; it is marked
`packaging` (`pytest -m "not packaging"` leaves it out) and `.ci/run` runs it. Without
root or the build tools it is skipped, except under CI, where that is a failure.
PID 1 here is not systemd, so the unit's ExecStart= runs directly, as its User= with
its Environment= and EnvironmentFile= (tests/test_container.py boots systemd itself).
The tests run in file order: install, serve, upgrade, purge.
"""
import json
import os
import pwd
import shutil
import signal
import threading

import pytest
import requests

from tests.fake_ollama import FakeOllama
from tests.gateway_process import free_port
from tests.packaging_tools import (
    BUILD_TOOLS,
    SYSTEM_PATH,
    UnitProcess,
    apt,
    current_deb,
    healthy,
    run,
    start_later_deb,
    unit_service_section,
    wait_for,
)

pytestmark = pytest.mark.packaging

SERVICE_USER = "ollama-gw"
DATA_DIR = "/var/lib/ollama-gw"
CONFIG = "/etc/ollama-gw/config.toml"
DEFAULTS = "/etc/default/ollama-gw"
LEFTOVERS = [DATA_DIR, "/etc/ollama-gw", DEFAULTS, "/opt/venvs/ollama-gw", "/usr/bin/ollama-gw",
             "/lib/systemd/system/ollama-gw.service", "/usr/share/doc/ollama-gw"]


def require_root_and(tools):
    """Skip (fail under CI) unless this is root on a machine with `tools`."""
    missing = [tool for tool in tools if not shutil.which(tool, path=SYSTEM_PATH)]
    if os.geteuid() != 0:
        problem = "needs root: it installs and purges a package"
    elif missing:
        problem = f"needs {', '.join(missing)}: see docs/operations.md, Install on Debian/Ubuntu"
    elif run(["dpkg-query", "-W", "-f", "${Status}", "ollama-gw"], check=False).stdout \
            .endswith(" installed"):
        problem = "ollama-gw is installed on this machine: purge it first (this test does)"
    else:
        return
    if os.environ.get("CI"):
        pytest.fail(problem)
    pytest.skip(problem)


def installed_version():
    return run(["dpkg-query", "-W", "-f", "${Version}", "ollama-gw"]).stdout


def cli(*args, cwd="/root"):
    """The installed command, as root in root's home (which the service user cannot enter)."""
    return run(["ollama-gw", *args], cwd=cwd, env={"PATH": SYSTEM_PATH, "HOME": "/root"},
               timeout=120)


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    """(this tree's .deb, a .deb of the same tree one release later with one more migration)."""
    require_root_and(BUILD_TOOLS)
    later = start_later_deb(tmp_path_factory)
    return current_deb(tmp_path_factory), later.result()


@pytest.fixture(scope="module")
def upstream():
    with FakeOllama() as fake:
        yield fake


@pytest.fixture(scope="module")
def installed(debs, upstream):
    """The current .deb installed, pointed at the fake Ollama; purged afterwards, always."""
    try:
        apt("install", str(debs[0]))
        port = free_port()
        with open(DEFAULTS, "a") as fh:  # an admin's edit of a conffile
            fh.write(f"OLLAMA_URL={upstream.url}\nOLLAMA_GW_BIND=127.0.0.1:{port}\n")
        yield f"http://127.0.0.1:{port}"
    finally:
        if run(["dpkg-query", "-W", "ollama-gw"], check=False).returncode == 0:
            apt("purge", "ollama-gw")  # known to dpkg: installed, or its config left


@pytest.fixture
def service(installed, tmp_path):
    """The unit's ExecStart=, started as the unit would start it; killed on every path."""
    home = pwd.getpwnam(SERVICE_USER).pw_dir
    process = UnitProcess(unit_service_section(), home, tmp_path / "service.log")
    try:
        process.start()
        wait_for(lambda: healthy(installed) or process.proc.poll() is not None, 90,
                 "the service to answer /health")
        assert process.proc.poll() is None, f"the service exited:\n{process.log()}"
        yield process
    finally:
        process.kill()


def test_lintian_reports_no_errors(debs):
    result = run(["lintian", "--fail-on", "error", str(debs[0])], check=False, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_install_creates_user_settings_and_data_directory(installed, upstream):
    assert cli("--version").stdout.strip() == "ollama-gw " + installed_version()
    checked = cli("check")  # the command read OLLAMA_URL from /etc/default/ollama-gw
    assert "all checks passed" in checked.stdout and upstream.url in checked.stdout
    overridden = run(["ollama-gw", "check"], check=False, cwd="/root", env={
        "PATH": SYSTEM_PATH, "HOME": "/root", "OLLAMA_URL": "http://127.0.0.1:9"})
    assert overridden.returncode == 1 and "http://127.0.0.1:9" in overridden.stdout
    user = pwd.getpwnam(SERVICE_USER)
    assert user.pw_dir == DATA_DIR and user.pw_shell == "/usr/sbin/nologin"
    stat = os.stat(DATA_DIR)
    assert (stat.st_uid, stat.st_mode & 0o777) == (user.pw_uid, 0o750)
    assert os.path.exists(f"{DATA_DIR}/ollama-gw.db"), "postinst did not migrate"
    for path in (CONFIG, DEFAULTS):  # may hold a database password
        stat = os.stat(path)
        assert (stat.st_uid, stat.st_gid, stat.st_mode & 0o777) == (0, user.pw_gid, 0o640)
    conffiles = run(["dpkg-query", "-W", "-f", "${Conffiles}", "ollama-gw"]).stdout
    assert CONFIG in conffiles and DEFAULTS in conffiles
    config = open(CONFIG).read()
    assert 'data_dir = "/var/lib/ollama-gw"' in config.splitlines()
    assert "# workers = 2" in config  # the rest commented out at its default
    assert not run(["sh", "-c", "ls -d /opt/venvs/ollama-gw/lib/python3*/site-packages/tests*"],
                   check=False).stdout


def test_key_added_by_root_leaves_only_files_the_service_user_owns(installed):
    created = json.loads(cli("keys", "add", "--name", "root-made", "--json").stdout)
    assert created["key"].startswith("ogw_")
    uid = pwd.getpwnam(SERVICE_USER).pw_uid
    for name in os.listdir(DATA_DIR):  # the database, -wal, -shm, .migrate-lock
        assert os.stat(os.path.join(DATA_DIR, name)).st_uid == uid, name


def test_service_answers_through_the_gateway(service, installed, upstream):
    key = json.loads(cli("keys", "add", "--name", "client", "--json").stdout)["key"]
    answer = requests.post(installed + "/api/generate", timeout=30,
                           headers={"Authorization": f"Bearer {key}"},
                           json={"model": "llama3.2", "prompt": "hi", "stream": False})
    assert answer.status_code == 200, answer.text
    assert answer.json()["done"] is True
    assert "-P -m app.serving.server" in open(f"/proc/{service.proc.pid}/cmdline").read().replace(
        "\0", " "), "ExecStart did not exec gunicorn in its own process"


def stream_lines(url, key, lines, started):
    """Read one /api/generate stream into `lines`; set `started` at the first line."""
    with requests.post(url + "/api/generate", stream=True, timeout=60,
                       headers={"Authorization": f"Bearer {key}"},
                       json={"model": "llama3.2", "prompt": "count"}) as answer:
        for line in answer.iter_lines():
            lines.append(json.loads(line))
            started.set()


def signal_during_stream(service, url, key, sig):
    """Send `sig` to the service while a stream is in flight; return the stream's lines."""
    lines, started = [], threading.Event()
    reader = threading.Thread(target=stream_lines, args=(url, key, lines, started),
                              daemon=True)
    reader.start()
    try:
        assert started.wait(30), "the stream did not start"
        service.signal(sig)
    finally:
        reader.join(90)
    assert not reader.is_alive(), "the stream did not end"
    return lines


def test_hup_then_term_let_a_stream_in_flight_finish(service, installed, upstream):
    key = json.loads(cli("keys", "add", "--name", "streamer", "--json").stdout)["key"]
    upstream.tokens, upstream.token_delay = 20, 0.1  # a 2 s stream
    try:
        reloaded = signal_during_stream(service, installed, key, signal.SIGHUP)
        assert reloaded[-1]["done"] is True and len(reloaded) == 21
        assert healthy(installed) and service.proc.poll() is None
        stopped = signal_during_stream(service, installed, key, signal.SIGTERM)
        assert stopped[-1]["done"] is True and len(stopped) == 21
        assert service.wait(90) == 0, service.log()
    finally:
        upstream.tokens, upstream.token_delay = 5, 0.0


def test_upgrade_keeps_data_and_edited_config_and_migrates(installed, debs):
    before = cli("keys", "list", "--json").stdout
    with open(CONFIG, "a") as fh:
        fh.write('default_rate_limit_user = "7/minute"\n')
    apt("install", str(debs[1]))
    assert installed_version().endswith("+upgrade1")
    assert cli("--version").stdout.strip() == "ollama-gw " + installed_version()
    assert cli("keys", "list", "--json").stdout == before
    assert 'default_rate_limit_user = "7/minute"' in open(CONFIG).read()
    assert "OLLAMA_URL=" in open(DEFAULTS).read()
    status = json.loads(cli("db", "status", "--json").stdout)
    assert status[-1]["name"] == "9999_upgrade_probe" and status[-1]["applied_at"]
    added = json.loads(cli("keys", "add", "--name", "after-upgrade", "--json").stdout)
    assert added["rate_limit"] == "7/minute"


def test_remove_keeps_data_then_purge_removes_everything(installed):
    apt("remove", "ollama-gw")
    assert os.path.exists(f"{DATA_DIR}/ollama-gw.db") and os.path.exists(CONFIG)
    pwd.getpwnam(SERVICE_USER)  # still there
    assert not os.path.exists("/usr/bin/ollama-gw")
    apt("purge", "ollama-gw")
    assert [path for path in LEFTOVERS if os.path.lexists(path)] == []
    with pytest.raises(KeyError):
        pwd.getpwnam(SERVICE_USER)
    assert run(["getent", "group", SERVICE_USER], check=False).returncode == 2
    assert SERVICE_USER not in run(["dpkg-statoverride", "--list"]).stdout
