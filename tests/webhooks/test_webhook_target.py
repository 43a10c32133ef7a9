"""Where webhooks may send, as an admin adding one meets it: refused with the reason, on
SQLite and PostgreSQL, from `ollama-gw webhooks add` and the shell's `addwebhook`."""
import json

import pytest

from app.config import ConfigError, load_settings
from app.webhooks import target as webhook_target

# (URL, what the one-line refusal says)
REFUSED = [
    ("http://169.254.169.254/latest/meta-data/", "is in 169.254.0.0/16"),
    ("http://169.254.170.2/v2/credentials", "is in 169.254.0.0/16"),
    ("http://[::ffff:169.254.169.254]/", "is in 169.254.0.0/16"),
    ("http://[::ffff:a9fe:a9fe]/", "is in 169.254.0.0/16"),
    ("http://[64:ff9b::a9fe:a9fe]/", "is in 169.254.0.0/16"),
    ("http://[2002:a9fe:a9fe::1]/", "is in 169.254.0.0/16"),
    ("http://[fe80::1]/", "is in fe80::/10"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "is in fd00:ec2::254/128"),
    ("http://100.100.100.200/latest/meta-data/", "is in 100.100.100.200/32"),
    ("http://168.63.129.16/machine", "is in 168.63.129.16/32"),
    ("http://metadata.google.internal/computeMetadata/v1/", "cloud metadata service"),
    ("http://METADATA.Google.Internal./computeMetadata/v1/", "cloud metadata service"),
    ("http://metadata/computeMetadata/v1/", "cloud metadata service"),
    ("http://2852039166/", "unusual form"),
    ("http://0xa9fea9fe/", "unusual form"),
    ("http://0251.0376.0251.0376/", "unusual form"),
    ("http://169.254.43518/", "unusual form"),
    ("http://example.com:99999/hook", "bad port"),
    ("http://example.com:0/hook", "bad port"),
    ("http://example.com:http/hook", "bad port"),
    ("http://exa mple.com/hook", "spaces or control characters"),
    ("http://example.com\r\nX-Injected: 1/hook", "spaces or control characters"),
    ("http://example.com\r\n/hook", "spaces or control characters"),  # urlsplit drops CRLF
    ("http://exa\tmple.com/hook", "spaces or control characters"),
    ("http://example.com/a\x00b", "spaces or control characters"),
    ("http://[fe80::1%25eth0]/", "cannot hold a %"),
    ("http://metadata%2egoogle%2einternal/", "cannot hold a %"),
    ("http://exa..mple.com/", "not a valid host name"),
    ("http://-bad.example.com/", "not a valid host name"),
    ("http://[::1/", "cannot be parsed"),
    ("http://user:pw@example.com/", "must not hold credentials"),
    ("http://@example.com/", "must not hold credentials"),
    ("ftp://example.com/hook", "must be an http:// or https:// URL"),
    ("javascript:alert(1)", "must be an http:// or https:// URL"),
    ("https://example.com/#frag", "fragment"),
]
ALLOWED = ["http://127.0.0.1:8080/hook", "http://localhost:9000/", "http://[::1]:9000/",
           "http://10.1.2.3/hook", "http://192.168.1.20:9000/hook", "http://172.16.0.9/",
           "https://hooks.example.com/ollama?token=abc", "http://receiver_1.lan:8080/x",
           "http://[fd12:3456::1]/"]


def listed(runner):
    result = runner("webhooks", "list", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("url, reason", REFUSED)
def test_webhooks_add_refuses_with_the_reason_on_one_line(runner, url, reason):
    result = runner("webhooks", "add", url)
    assert result.exit_code == 1
    assert reason in result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert listed(runner) == []


@pytest.mark.parametrize("url", ALLOWED)
def test_webhooks_add_takes_loopback_lan_and_public_receivers(runner, url):
    result = runner("webhooks", "add", url, "--json")
    assert result.exit_code == 0, result.output
    assert [hook["url"] for hook in listed(runner)] == [url]


def test_the_shell_refuses_the_same_urls(runner):
    lines = "".join(f"addwebhook {url}\n" for url, _ in REFUSED[:11]) + "listwebhooks\n"
    result = runner("shell", input=lines)
    assert result.exit_code == 1, result.output  # a piped session whose commands failed
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert [reason in line for (_, reason), line in zip(REFUSED[:11], errors,
                                                        strict=True)] == [True] * 11
    assert "no webhooks yet" in result.output and listed(runner) == []


def test_the_deny_list_is_a_setting(runner, monkeypatch):
    monkeypatch.setenv("OLLAMA_GW_WEBHOOK_DENY_NETWORKS", "10.0.0.0/8, fd12::/16")
    refused = runner("webhooks", "add", "http://10.1.2.3/hook")
    assert refused.exit_code == 1 and "is in 10.0.0.0/8" in refused.output
    assert runner("webhooks", "add", "http://[fd12:3456::1]/").exit_code == 1
    # The setting replaces the default: link-local is allowed once it is left out...
    assert runner("webhooks", "add", "http://169.254.169.254/").exit_code == 0
    # ...but a metadata service's name never is.
    assert runner("webhooks", "add", "http://metadata.google.internal/").exit_code == 1


@pytest.mark.parametrize("value", ["10.0.0.0/33", "not-a-network", "fe80::/129"])
def test_a_bad_deny_network_is_a_configuration_error(value):
    with pytest.raises(ConfigError, match="webhook_deny_networks"):
        load_settings(environ={"OLLAMA_GW_WEBHOOK_DENY_NETWORKS": value})


def test_the_default_denies_link_local_and_metadata_and_allows_private_ranges():
    assert load_settings(environ={}).webhook_deny_networks == \
        webhook_target.DEFAULT_DENY_NETWORKS
    for address in ("169.254.169.254", "::ffff:169.254.169.254", "fe80::1", "fd00:ec2::254",
                    "100.100.100.200", "192.0.0.192"):
        with pytest.raises(webhook_target.TargetError):
            webhook_target.check_address(address)
    for address in ("127.0.0.1", "::1", "10.0.0.1", "192.168.0.10", "172.31.0.1", "fd00::1",
                    "100.64.0.1", "169.253.255.255", "169.255.0.0", "8.8.8.8"):
        webhook_target.check_address(address)  # nothing raised
