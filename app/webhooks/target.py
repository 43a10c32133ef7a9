"""Where webhooks may send: URLs checked when added, addresses checked again when sent.

Whoever adds a webhook makes every gateway POST to it and read the answer, from inside
the network the gateway runs in. Link-local addresses and the cloud's metadata services
(which hand out the machine's credentials) must never be reached that way, however the
URL spells them: `[::ffff:169.254.169.254]`, `2852039166`, a name that resolves there,
or a name that resolved elsewhere when the webhook was added (DNS rebinding). So a URL is
parsed strictly when it is added, and at each attempt the host is resolved, every
address it has is checked against `webhook_deny_networks`, and the connection is made to
the address that was checked (app/webhooks/transport.py), never to the name again. Loopback
and private ranges are allowed by default: teams run receivers on their LAN.
"""
import ipaddress
import re
from urllib.parse import urlsplit

from app.config import FIELDS, parse_networks

MAX_URL_LENGTH = 2000
# Link-local and the clouds' metadata services (app/config.py says which).
DEFAULT_DENY_NETWORKS = FIELDS["webhook_deny_networks"].default
# Names that only ever mean a metadata service, refused whatever webhook_deny_networks says.
METADATA_NAMES = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "instance-data",
    "instance-data.ec2.internal", "rancher-metadata", "metadata.tencentyun.com"})
# IPv6 forms that carry an IPv4 address a connection may end up at.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")


class TargetError(ValueError):
    """A webhook URL or address the gateway will not send to; the message says why."""


def check_url(url, deny_networks=DEFAULT_DENY_NETWORKS):
    """The URL, stripped, if deliveries may be sent to it; else a TargetError saying why.

    A host given by name is only checked against METADATA_NAMES here: what it resolves
    to is checked at every attempt, when it matters.
    """
    url = (url or "").strip()
    if len(url) > MAX_URL_LENGTH:
        raise TargetError(f"a webhook URL is at most {MAX_URL_LENGTH} characters")
    # Before parsing: urlsplit() quietly drops tabs and newlines, and a CRLF would let a
    # URL write headers of its own.
    bad = next((c for c in url if c.isspace() or ord(c) < 0x20 or ord(c) == 0x7f), None)
    if bad is not None:
        raise TargetError(f"a webhook URL cannot contain spaces or control characters "
                          f"(found {bad!r}): percent-encode them")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError as exc:  # an unclosed or invalid [IPv6 address]
        raise TargetError(f"webhook URL {url!r} cannot be parsed: {exc}") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise TargetError(f"webhook URL {url!r} must be an http:// or https:// URL with a host")
    if "@" in parts.netloc:
        raise TargetError("a webhook URL must not hold credentials: listings would show "
                          "them. Receivers authenticate the gateway by the signature")
    if parts.fragment or "#" in url:
        raise TargetError("a webhook URL cannot have a #fragment (it is never sent)")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or parts.netloc.endswith(":"):
        raise TargetError(f"webhook URL {url!r} has a bad port: give 1 to 65535, or none")
    check_host(hostname, deny_networks)
    return url


def check_host(host, deny_networks=DEFAULT_DENY_NETWORKS):
    """Refuse a host that is not an IP address or DNS name, or is one the gateway must avoid."""
    host = host.lower()
    if "%" in host:
        raise TargetError(f"webhook host {host!r} cannot hold a % (no zone ids, no "
                          "percent-encoding)")
    literal = _ip_literal(host)
    if literal is not None:
        check_address(literal, deny_networks)
        return
    name = host.removesuffix(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise TargetError(f"webhook host {host!r} is not a valid host name or IP address "
                          "(an internationalised name goes in its xn-- form)")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        # 2852039166, 0xa9fea9fe, 169.254.43518, 0251.0376.0251.0376: the resolver takes
        # these for IPv4 addresses.
        raise TargetError(f"webhook host {host!r} looks like an IPv4 address in an unusual "
                          "form: write it as four decimal numbers, e.g. 192.168.1.20")
    if name in METADATA_NAMES:
        raise TargetError(f"webhook host {host!r} is a cloud metadata service: webhooks "
                          "may not send there")


def check_address(address, deny_networks=DEFAULT_DENY_NETWORKS):
    """Refuse an IP address in a denied network, in any of its IPv6 disguises."""
    address = ipaddress.ip_address(address) if isinstance(address, str) else address
    candidates = [address]
    if address.version == 6:
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and (address in _NAT64 or address in _COMPATIBLE):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            candidates.append(embedded)
    for candidate in candidates:
        for network in parse_networks(tuple(deny_networks)):
            if candidate.version == network.version and candidate in network:
                raise TargetError(f"webhook address {address} is in {network}, which "
                                  "webhook_deny_networks refuses (link-local and cloud "
                                  "metadata addresses by default)")


def _ip_literal(host):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
