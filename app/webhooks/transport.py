"""One webhook attempt over HTTP: to a checked address, within webhook_timeout as a whole.

Each attempt resolves the receiver's host, checks every address it has against
webhook_deny_networks (app/webhooks/target.py) and connects to an address it checked,
never to the name again: a name that resolves elsewhere a moment later (DNS rebinding)
changes nothing. So each attempt opens its own connection, and closes it.

`webhook_timeout` bounds the attempt as a whole (resolving, connecting, TLS, sending, the
answer's status and headers), not each read: a receiver trickling a byte a second would
otherwise hold a sender forever. Under gevent (the gunicorn workers' senders) a
gevent.Timeout interrupts the greenlet wherever it waits. In a plain thread (the CLI)
nothing interrupts a blocking read but shutting its socket, which a watchdog timer does;
the name is resolved in a helper thread that is abandoned if it is slower.

Nothing of a client's request travels with an attempt: no proxy from the environment, no
cookies, no redirects followed, no header but the signed ones. What the receiver answers
is reduced to its status: its body, and even its reason phrase, are never read or shown
(a webhook pointed at an internal service must not become a way to read that service).
"""
import datetime
import functools
import http
import http.client
import socket
import ssl
import threading
import time
from urllib.parse import quote, urlsplit

from app.cooperative import deadline, gevent_active
from app.webhooks import target as webhook_target


class AttemptTimeout(Exception):
    """The attempt ran out of webhook_timeout."""


def signed_headers(message_id, secret, body, signed_at=None):
    """Content-Type and the three Standard Webhooks headers for `body`, signed at `signed_at`."""
    from standardwebhooks import Webhook as Signer

    signed_at = int(time.time() if signed_at is None else signed_at)
    when = datetime.datetime.fromtimestamp(signed_at, datetime.timezone.utc)
    return {
        "Content-Type": "application/json",
        "User-Agent": "ollama-gw-webhooks",
        "webhook-id": message_id,
        "webhook-timestamp": str(signed_at),
        "webhook-signature": Signer(secret).sign(message_id, when, body),
    }


def post(url, message_id, secret, body, timeout,
         deny_networks=webhook_target.DEFAULT_DENY_NETWORKS):
    """Send one attempt within `timeout` seconds; return (HTTP status or None, error or None)."""
    headers = signed_headers(message_id, secret, body)
    too_slow = f"no complete answer within {timeout:g} s (webhook_timeout)"
    clock = Clock(timeout)
    try:
        with deadline(timeout, AttemptTimeout), clock:
            status = _send(url, headers, body.encode("utf-8"), clock, deny_networks)
    except AttemptTimeout:
        return None, too_slow
    except webhook_target.TargetError as exc:
        return None, f"not sent: {exc}"
    except Exception as exc:
        # Whatever the shut socket made the reader raise; or a socket timeout, which is
        # always set to the attempt's time left.
        if clock.cut or isinstance(exc, TimeoutError):
            return None, too_slow
        if not isinstance(exc, (OSError, http.client.HTTPException)):
            raise
        return None, f"cannot reach the receiver: {reason(exc)}"
    if 200 <= status < 300:
        return status, None
    error = describe_status(status)
    if 300 <= status < 400:
        error += " (redirects are not followed: give the final URL)"
    return status, error


def describe_status(status):
    """`HTTP 503 Service Unavailable`: the standard phrase, never the receiver's own words."""
    try:
        return f"HTTP {status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _send(url, headers, body, clock, deny_networks):
    webhook_target.check_url(url, deny_networks)  # stored before the checks existed, maybe
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host, port = parts.hostname, parts.port or (443 if secure else 80)
    found = resolve(host, port, clock)
    for _, sockaddr in found:
        webhook_target.check_address(sockaddr[0].split("%")[0], deny_networks)
    sock = connect(found, clock)
    if secure:
        sock = _tls_context().wrap_socket(sock, server_hostname=host,
                                          do_handshake_on_connect=False)
        clock.watch(sock)
        sock.settimeout(clock.left())
        sock.do_handshake()
    kind = http.client.HTTPSConnection if secure else http.client.HTTPConnection
    connection = kind(host, port)
    connection.sock = sock  # already connected, to the address checked above
    target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~") + (
        "?" + quote(parts.query, safe="/%:@!$&'()*+,;=~?") if parts.query else "")
    try:
        sock.settimeout(clock.left())
        connection.request("POST", target, body, {**headers, "Connection": "close"})
        sock.settimeout(clock.left())
        return connection.getresponse().status  # the body is never read
    finally:
        connection.close()


def resolve(host, port, clock):
    """[(family, sockaddr)] of `host`, within the attempt's time."""
    if gevent_active():  # gevent's resolver yields, and the attempt's gevent.Timeout bounds it
        return _addresses(host, port)
    found = {}

    def run():
        try:
            found["addresses"] = _addresses(host, port)
        except OSError as exc:
            found["error"] = exc

    helper = threading.Thread(target=run, name="webhook-resolve", daemon=True)
    helper.start()
    helper.join(clock.left())
    if helper.is_alive():
        clock.cut = True
        raise AttemptTimeout()
    if "error" in found:
        raise found["error"]
    return found["addresses"]


def _addresses(host, port):
    return [(family, sockaddr) for family, _, _, _, sockaddr
            in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def connect(addresses, clock):
    """A socket connected to the first of `addresses` that answers."""
    error = OSError("the host has no address")
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        clock.watch(sock)
        try:
            sock.settimeout(clock.left())
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            error = exc
            sock.close()
    raise error


@functools.cache
def _tls_context():
    """Certificates checked against the bundle requests uses (certifi), as before."""
    from requests.certs import where

    return ssl.create_default_context(cafile=where())


class Clock:
    """An attempt's time left; in a plain thread, shuts its socket when the time is up."""

    def __init__(self, seconds):
        self.ends = time.monotonic() + seconds
        self.cut = False  # the time ran out (and the socket, if any, was shut)
        self._sock = None
        self._lock = threading.Lock()
        self._timer = None

    def __enter__(self):
        if not gevent_active():  # under gevent, the attempt's gevent.Timeout does it
            self._timer = threading.Timer(max(0.0, self.ends - time.monotonic()), self._expire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc):
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:  # never shut a socket after it was closed (its number is reused)
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def left(self):
        """Seconds left, or AttemptTimeout."""
        left = self.ends - time.monotonic()
        if left <= 0:
            self.cut = True
            raise AttemptTimeout()
        return left

    def watch(self, sock):
        """Shut `sock` if the time runs out while the attempt uses it."""
        with self._lock:
            self._sock = sock
            if self.cut:
                raise AttemptTimeout()

    def _expire(self):
        with self._lock:
            self.cut = True
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read or write
                except OSError:
                    pass


def reason(exc):
    """What went wrong in a few words of the gateway's own, never words the receiver sent.

    (http.client puts a bad status line in its exception: an SSH banner, say.)
    """
    if isinstance(exc, socket.gaierror) and exc.args:  # an unknown host
        return str(exc.args[-1])
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or type(exc).__name__})"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the receiver closed the connection without answering"
    if isinstance(exc, http.client.HTTPException):
        return f"the receiver's answer is not HTTP ({type(exc).__name__})"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return type(exc).__name__
