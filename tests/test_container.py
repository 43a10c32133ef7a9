"""Containers with podman: the unit under a real systemd, and the Dockerfile's image.

No registry serves images here, so the base is Debian 12 made by debootstrap and
imported into podman storage of the test's own (removed afterwards). Root only;
marked `packaging` and `container`; skipped without root or the tools, except under
CI, where that is a failure. About 3 minutes, the Debian base and the .deb
build included (docs/development.md, "Install and test").
"""
import json
import os
import re
import threading

import pytest
import requests

from tests.fake_ollama import FakeOllama
from tests.gateway_process import free_port
from tests.packaging_tools import (
    BUILD_TOOLS,
    CONTAINER_TOOLS,
    REPO,
    Podman,
    current_deb,
    healthy,
    stage_source,
    start_debian_rootfs,
    wait_for,
)
from tests.test_packaging import require_root_and, stream_lines

pytestmark = [pytest.mark.packaging, pytest.mark.container]

BASE = "localhost/ollama-gw-test/debian:bookworm"
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    require_root_and(CONTAINER_TOOLS)
    tool = Podman(tmp_path_factory.mktemp("podman"))
    try:
        yield tool
    finally:
        tool.cleanup()


@pytest.fixture(scope="module")
def base_image(podman, tmp_path_factory):
    """A minimal Debian 12 image, from Debian's packages (made while other tests ran)."""
    archive = start_debian_rootfs(tmp_path_factory).result()
    podman("import", str(archive), BASE)
    return BASE


@pytest.fixture(scope="module")
def upstream():
    with FakeOllama() as fake:
        yield fake


def streamed_through(signal_step, url, key):
    """Run `signal_step()` while a stream is in flight; return the stream's lines."""
    lines, started = [], threading.Event()
    reader = threading.Thread(target=stream_lines, args=(url, key, lines, started),
                              daemon=True)
    reader.start()
    try:
        assert started.wait(30), "the stream did not start"
        signal_step()
    finally:
        reader.join(120)
    assert not reader.is_alive(), "the stream did not end"
    return lines


@pytest.fixture
def slow_streams(upstream):
    upstream.tokens, upstream.token_delay = 20, 0.1  # 2 s each
    yield
    upstream.tokens, upstream.token_delay = 5, 0.0


@pytest.fixture(scope="module")
def systemd_container(podman, base_image, upstream, tmp_path_factory):
    """The .deb installed in a container whose PID 1 is systemd; the unit configured."""
    require_root_and(BUILD_TOOLS)
    context = tmp_path_factory.mktemp("systemd-image")
    (context / "ollama-gw.deb").write_bytes(current_deb(tmp_path_factory).read_bytes())
    (context / "Containerfile").write_text(
        f"FROM {base_image}\nCOPY ollama-gw.deb /tmp/\n"
        "RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y"
        " --no-install-recommends systemd systemd-sysv dbus /tmp/ollama-gw.deb </dev/null\n")
    podman("build", "--layers=false", "--network", "host", "-t",
           "localhost/ollama-gw-test/systemd", str(context))
    port = free_port()
    podman("run", "-d", "--name", "systemd", *podman.run_flags, "--systemd", "always",
           "localhost/ollama-gw-test/systemd", "/sbin/init")
    try:
        state = []

        def booted():
            state[:] = [podman("exec", "systemd", "systemctl", "is-system-running",
                               check=False)]
            return state[0].stdout.strip() in ("running", "degraded")

        try:
            wait_for(booted, 120, "systemd to boot in the container")
        except AssertionError:
            jobs = podman("exec", "systemd", "systemctl", "list-jobs", "--no-pager", check=False)
            raise AssertionError(f"systemd did not boot: {state[0].stdout} {state[0].stderr}"
                                 f"\n{jobs.stdout}{jobs.stderr}") from None
        podman("exec", "systemd", "sh", "-c",
               f"printf 'OLLAMA_URL={upstream.url}\\nOLLAMA_GW_BIND=127.0.0.1:{port}\\n'"
               " >>/etc/default/ollama-gw")
        yield f"http://127.0.0.1:{port}"
    finally:
        podman("rm", "--force", "--time", "10", "systemd", check=False)


def systemctl(podman, *args):
    return podman("exec", "systemd", "systemctl", *args, check=False)


def test_unit_starts_sandboxed_under_systemd(podman, systemd_container):
    started = systemctl(podman, "enable", "--now", "ollama-gw")
    assert started.returncode == 0, started.stderr + systemctl(podman, "status", "ollama-gw").stdout
    # Type=notify: `start` returned after gunicorn said it listens.
    assert healthy(systemd_container)
    pid = systemctl(podman, "show", "-P", "MainPID", "ollama-gw").stdout.strip()
    status = podman("exec", "systemd", "cat", f"/proc/{pid}/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    uid = podman("exec", "systemd", "id", "-u", "ollama-gw").stdout.strip()
    assert fields["Uid"].split()[0] == uid
    verify = podman("exec", "systemd", "systemd-analyze", "verify", "ollama-gw.service",
                    check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = podman("exec", "systemd", "systemd-analyze", "security", "ollama-gw.service",
                      check=False).stdout
    score = float(re.search(r"Overall exposure level for ollama-gw.service: ([\d.]+)",
                            security).group(1))
    print(f"systemd-analyze security ollama-gw.service: {score}")
    assert score <= 2.0
    journal = podman("exec", "systemd", "journalctl", "-u", "ollama-gw", "--no-pager").stdout
    assert "Listening at" in journal


def test_reload_and_stop_let_streams_finish(podman, systemd_container, slow_streams):
    key = json.loads(podman("exec", "systemd", "ollama-gw", "keys", "add", "--name", "unit",
                            "--json").stdout)["key"]

    def reload():
        assert systemctl(podman, "reload", "ollama-gw").returncode == 0

    lines = streamed_through(reload, systemd_container, key)
    assert lines[-1]["done"] is True and len(lines) == 21
    assert systemctl(podman, "is-active", "ollama-gw").stdout.strip() == "active"

    def stop():
        assert systemctl(podman, "stop", "ollama-gw").returncode == 0

    lines = streamed_through(stop, systemd_container, key)
    assert lines[-1]["done"] is True and len(lines) == 21
    result = systemctl(podman, "show", "-P", "Result", "ollama-gw").stdout.strip()
    assert result == "success"  # not SIGKILLed at TimeoutStopSec


@pytest.fixture(scope="module")
def image(podman, base_image, tmp_path_factory):
    """The Dockerfile's image, built on the Debian base (docker format: HEALTHCHECK)."""
    context = stage_source(tmp_path_factory.mktemp("image") / "ollama-gw")
    trust = []  # this machine's CA bundle, in case HTTPS to PyPI goes through a proxy's CA
    if os.path.isfile(HOST_CA):
        trust = ["--volume", f"{HOST_CA}:/run/host-ca.crt:ro",
                 "--build-arg", "PIP_CERT=/run/host-ca.crt"]
    # --layers=false: one commit, not one per instruction (vfs copies the tree at each).
    podman("build", "--layers=false", "--format", "docker", "--network", "host", *trust,
           "--build-arg", f"BASE={base_image}", "-t", "localhost/ollama-gw-test/ollama-gw",
           str(context))
    return "localhost/ollama-gw-test/ollama-gw"


@pytest.fixture
def gateway_container(podman, image, upstream, postgres_url):
    from tests.conftest import reset_postgres

    reset_postgres(postgres_url)
    port = free_port()
    podman("run", "-d", "--name", "gateway", *podman.run_flags,
           "-e", f"OLLAMA_URL={upstream.url}", "-e", f"DATABASE_URL={postgres_url}",
           "-e", f"OLLAMA_GW_BIND=127.0.0.1:{port}", image)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(url) or podman(
            "inspect", "-f", "{{.State.Running}}", "gateway").stdout.strip() != "true",
            120, "the container to answer /health")
        assert healthy(url), podman("logs", "gateway", check=False).stderr
        yield url
    finally:
        podman("rm", "--force", "--time", "10", "gateway", check=False)


def test_image_runs_as_its_user_with_a_health_check(podman, image, gateway_container):
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == "ollama-gw"
    assert config["Entrypoint"] == ["/usr/bin/ollama-gw"] and config["Cmd"] == ["serve"]
    assert podman("healthcheck", "run", "gateway", check=False).returncode == 0
    assert podman("exec", "gateway", "id", "-u").stdout.strip() != "0"


def test_image_serves_keys_added_as_root_and_drains_on_stop(podman, gateway_container,
                                                            slow_streams):
    added = podman("exec", "--user", "0", "gateway", "ollama-gw", "keys", "add", "--name",
                   "container", "--json")
    key = json.loads(added.stdout)["key"]
    answer = requests.post(gateway_container + "/api/generate", timeout=30,
                           headers={"Authorization": f"Bearer {key}"},
                           json={"model": "llama3.2", "prompt": "hi", "stream": False})
    assert answer.status_code == 200, answer.text

    def stop():
        podman("stop", "--time", "60", "gateway")

    lines = streamed_through(stop, gateway_container, key)
    assert lines[-1]["done"] is True and len(lines) == 21
    assert podman("inspect", "-f", "{{.State.ExitCode}}", "gateway").stdout.strip() == "0"


def test_compose_runs_the_image_against_postgresql():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    gateway, db = compose["services"]["gateway"], compose["services"]["db"]
    assert gateway["build"]["context"] == "."
    assert gateway["depends_on"]["db"]["condition"] == "service_healthy" and db["healthcheck"]
    assert gateway["environment"]["DATABASE_URL"].startswith("postgresql://")
    assert "@db:5432/" in gateway["environment"]["DATABASE_URL"]
    assert gateway["stop_grace_period"] == "90s"  # above graceful_timeout, as the unit
