"""One webhook attempt: sent only to addresses checked at that moment, bounded as a whole by
webhook_timeout under gevent and without, and never reporting what the receiver said."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from app.store.models import Webhook
from app.webhooks import outbox as hooks
from app.webhooks import transport as webhook_http
from app.webhooks.delivery import Dispatcher
from tests.webhook_receiver import MAX_TRICKLE_SECONDS, WebhookReceiver

ROOT = Path(__file__).resolve().parent.parent.parent
TIMEOUT = 1.5
# How late past webhook_timeout a cut attempt may end on a busy machine (well under the
# receiver's MAX_TRICKLE_SECONDS, which is what an attempt without a deadline takes).
SLACK = 4.0


@pytest.fixture
def receiver():
    with WebhookReceiver() as r:
        yield r


@pytest.fixture
def resolved(monkeypatch):
    """resolved(addresses) makes every name resolve to them; records connections tried."""
    connections = []
    real_connect = webhook_http.connect

    def fake(*addresses):
        def addresses_of(host, port):
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET,
                     (a, port, 0, 0) if ":" in a else (a, port)) for a in addresses]
        monkeypatch.setattr(webhook_http, "_addresses", addresses_of)
        return connections

    def recording_connect(addresses, clock):
        connections.append([sockaddr[0] for _, sockaddr in addresses])
        return real_connect(addresses, clock)

    monkeypatch.setattr(webhook_http, "connect", recording_connect)
    return fake


def send(settings):
    [outcome] = Dispatcher(settings).run_once()
    return outcome


def port_of(receiver):
    return int(receiver.url.rsplit(":", 1)[1].split("/")[0])


@pytest.mark.parametrize("addresses", [
    ["169.254.169.254"],
    ["127.0.0.1", "169.254.169.254"],  # one bad address refuses the name
    ["::ffff:169.254.169.254"],
    ["fe80::1%eth0"],
])
def test_a_name_resolving_to_a_denied_address_is_never_connected_to(
        migrated, settings, receiver, resolved, addresses):
    hooks.add_webhook(f"http://hooks.test:{port_of(receiver)}/hooks", "key.created")
    connections = resolved(*addresses)
    hooks.enqueue("key.created", {"key_id": 1})
    outcome = send(settings)
    assert outcome.status is None and outcome.state == "pending"
    assert outcome.error.startswith("not sent: webhook address ")
    assert "webhook_deny_networks" in outcome.error
    assert connections == [] and receiver.received == []


def test_a_name_is_connected_to_at_the_address_that_was_checked(
        migrated, settings, receiver, resolved):
    """hooks.test resolves nowhere: only a connection to the checked address reaches it."""
    port = port_of(receiver)
    hooks.add_webhook(f"http://hooks.test:{port}/hooks?x=1", "key.created")
    connections = resolved("127.0.0.1")
    hooks.enqueue("key.created", {"key_id": 1})
    outcome = send(settings)
    assert outcome.ok, outcome.error
    assert connections == [["127.0.0.1"]]
    [received] = receiver.received
    assert received.headers["host"] == f"hooks.test:{port}"


def test_a_url_stored_before_the_checks_is_not_sent(migrated, settings, receiver):
    Webhook.create(url="http://169.254.169.254/latest/meta-data/", events="*",
                   secret=hooks.new_secret())
    hooks.subscriptions.invalidate()
    hooks.enqueue("key.created", {"key_id": 1})
    outcome = send(settings)
    assert outcome.status is None and "is in 169.254.0.0/16" in outcome.error


def test_loopback_and_localhost_receivers_still_work(migrated, settings, receiver):
    """localhost may resolve to ::1 first, where nothing listens: the next address is tried."""
    hooks.add_webhook(f"http://localhost:{port_of(receiver)}/hooks", "key.created")
    hooks.add_webhook(receiver.url, "key.created")
    hooks.enqueue("key.created", {"key_id": 1})
    outcomes = Dispatcher(settings).run_once()
    assert [o.ok for o in outcomes] == [True, True] and len(receiver.received) == 2


@pytest.mark.parametrize("answer", ["status", "banner"])
def test_a_failure_reports_the_status_never_what_the_receiver_said(
        migrated, settings, receiver, runner, answer):
    if answer == "status":
        receiver.status = 503  # its body: "receiver says no"
    else:
        receiver.raw_answer = b"SSH-2.0-OpenSSH_9.6 internal-secret-banner\r\n"
    hooks.add_webhook(receiver.url, "key.created")
    result = runner("webhooks", "test", "1", "--json")
    outcome = json.loads(result.stdout)
    assert outcome["ok"] is False
    for said in ("receiver says no", "SSH", "internal-secret-banner"):
        assert said not in result.output
    assert outcome["error"] == ("HTTP 503 Service Unavailable" if answer == "status" else
                                "cannot reach the receiver: the receiver's answer is not HTTP "
                                "(BadStatusLine)")


def assert_cut_in_time(elapsed, error, receiver):
    assert TIMEOUT <= elapsed < TIMEOUT + SLACK, elapsed
    assert error == f"no complete answer within {TIMEOUT:g} s (webhook_timeout)"
    # Bytes kept arriving all along: no single read waited webhook_timeout.
    assert receiver.trickled >= 3


def test_a_trickling_receiver_is_cut_at_webhook_timeout_without_gevent(
        migrated, receiver, runner, monkeypatch):
    """`ollama-gw webhooks test` runs in a plain thread: no gevent to interrupt a read."""
    monkeypatch.setenv("OLLAMA_GW_WEBHOOK_TIMEOUT", str(TIMEOUT))
    receiver.trickle = 0.2
    hooks.add_webhook(receiver.url, "key.created")
    started = time.monotonic()
    result = runner("webhooks", "test", "1", "--json")
    elapsed = time.monotonic() - started
    assert result.exit_code == 1
    assert_cut_in_time(elapsed, json.loads(result.stdout)["error"], receiver)


GEVENT_ATTEMPT = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import json, sys, time
    from app import cooperative
    from app.webhooks import transport as webhook_http
    assert cooperative.gevent_active()
    started = time.monotonic()
    status, error = webhook_http.post(sys.argv[1], "msg_1", "whsec_" + "A" * 43, "{}",
                                      float(sys.argv[2]))
    print(json.dumps({"elapsed": time.monotonic() - started, "status": status,
                      "error": error}))
""")


def test_a_trickling_receiver_is_cut_at_webhook_timeout_under_gevent(receiver):
    """As a gunicorn worker's sender runs it: in a greenlet, with gevent's patched sockets."""
    receiver.trickle = 0.2
    child = subprocess.run([sys.executable, "-c", GEVENT_ATTEMPT, receiver.url, str(TIMEOUT)],
                           capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)},
                           timeout=MAX_TRICKLE_SECONDS + 60)
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout)
    assert result["status"] is None
    assert_cut_in_time(result["elapsed"], result["error"], receiver)


@pytest.fixture
def tls_receiver(tmp_path, monkeypatch):
    """(port, ca): an HTTPS receiver for hooks.test on 127.0.0.1, trusted by the sender."""
    import shutil
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=hooks.test",
                    "-addext", "subjectAltName=DNS:hooks.test"], check=True,
                   capture_output=True, timeout=60)
    hosts = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            hosts.append(self.headers["Host"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    monkeypatch.setattr(webhook_http, "_tls_context",
                        lambda: ssl.create_default_context(cafile=str(cert)))
    try:
        yield server.server_address[1], hosts
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_https_checks_the_certificate_against_the_name_not_the_address(tls_receiver,
                                                                      resolved):
    port, hosts = tls_receiver
    resolved("127.0.0.1")
    secret = "whsec_" + "A" * 43
    assert webhook_http.post(f"https://hooks.test:{port}/x", "msg_1", secret, "{}",
                             10) == (204, None)
    assert hosts == [f"hooks.test:{port}"]
    status, error = webhook_http.post(f"https://other.test:{port}/x", "msg_2", secret, "{}",
                                      10)
    assert status is None and "CERTIFICATE_VERIFY_FAILED" in error
    assert len(hosts) == 1
