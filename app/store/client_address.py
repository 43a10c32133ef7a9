"""Who sent the request: the connection's address, or the one a trusted proxy vouches for.

Behind a reverse proxy every connection comes from the proxy, so a throttle keyed on it
would lock out everyone at once. Only a proxy named in `trusted_proxies` is believed
about X-Forwarded-For: anyone else could write any address there. The header is read
from its right end, where the nearest proxy appended the address it saw, and the first
address that is not itself a trusted proxy is the client.
"""
import functools
import ipaddress

from flask import current_app, request

# Longer is not an address; bounds what a trusted proxy's header can put in a record.
LONGEST = 64


@functools.lru_cache(maxsize=8)
def _networks(entries):
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def _parse(text):
    """An ip_address from `1.2.3.4`, `1.2.3.4:5678`, `::1` or `[::1]:80`; None if not one."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return address.ipv4_mapped or address if address.version == 6 else address


def client_address():
    """The client's address for this request, as text ("-" when the server gave none)."""
    remote = request.remote_addr or "-"
    trusted = _networks(current_app.config["SETTINGS"].trusted_proxies)
    if not trusted:
        return remote

    def is_trusted(address):
        return address is not None and any(address in net for net in trusted)

    if not is_trusted(_parse(remote)):
        return remote
    forwarded = ",".join(request.headers.getlist("X-Forwarded-For")).split(",")
    client = remote
    for hop in reversed(forwarded):
        address = _parse(hop)
        if address is None:  # malformed: the last trusted hop is as far as can be seen
            return client
        client = str(address)[:LONGEST]
        if not is_trusted(address):
            return client
    return client
