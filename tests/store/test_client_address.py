"""The client's address: the connection's, unless a trusted proxy forwarded the request."""
import flask
import pytest

from app.config import ConfigError, Settings, load_settings
from app.store.client_address import client_address


def address(remote, forwarded=None, trusted=()):
    app = flask.Flask(__name__)
    app.config["SETTINGS"] = Settings(trusted_proxies=tuple(trusted))
    headers = {} if forwarded is None else {"X-Forwarded-For": forwarded}
    with app.test_request_context(environ_base={"REMOTE_ADDR": remote}, headers=headers):
        return client_address()


@pytest.mark.parametrize("remote, forwarded, trusted, expected", [
    # No trusted proxies (the default): the header is anyone's to write.
    ("203.0.113.5", "198.51.100.1", (), "203.0.113.5"),
    # A connection from outside the trusted networks: its header is not believed either.
    ("203.0.113.5", "198.51.100.1", ("10.0.0.0/8",), "203.0.113.5"),
    # From a trusted proxy: the address it appended, not what the client wrote before it.
    ("10.0.0.2", "6.6.6.6, 198.51.100.1", ("10.0.0.0/8",), "198.51.100.1"),
    # Through two trusted proxies: the first address from the right that is not one.
    ("10.0.0.2", "198.51.100.1, 10.0.0.3", ("10.0.0.0/8",), "198.51.100.1"),
    ("127.0.0.1", "198.51.100.1", ("127.0.0.1",), "198.51.100.1"),
    # Ports and IPv6 as proxies write them; an IPv4-mapped address is the IPv4 one.
    ("10.0.0.2", "198.51.100.1:4711", ("10.0.0.0/8",), "198.51.100.1"),
    ("10.0.0.2", "[2001:db8::1]:443", ("10.0.0.0/8",), "2001:db8::1"),
    ("::ffff:10.0.0.2", "198.51.100.1", ("10.0.0.0/8",), "198.51.100.1"),
    # No header, or only trusted hops in it: as far as can be seen.
    ("10.0.0.2", None, ("10.0.0.0/8",), "10.0.0.2"),
    ("10.0.0.2", "10.0.0.9", ("10.0.0.0/8",), "10.0.0.9"),
    # A malformed entry ends the walk at the last trusted hop.
    ("10.0.0.2", "198.51.100.1, not-an-address", ("10.0.0.0/8",), "10.0.0.2"),
])
def test_the_client_address(remote, forwarded, trusted, expected):
    assert address(remote, forwarded, trusted) == expected


def test_trusted_proxies_come_from_the_environment_and_are_checked():
    settings = load_settings(environ={"OLLAMA_GW_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8"})
    assert settings.trusted_proxies == ("127.0.0.1", "10.0.0.0/8")
    with pytest.raises(ConfigError, match="trusted_proxies entry 'proxy.internal'"):
        load_settings(environ={"OLLAMA_GW_TRUSTED_PROXIES": "proxy.internal"})
