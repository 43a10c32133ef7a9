"""Talking to Ollama: one pooled HTTP session per process, errors mapped to 502/504.

Client-facing messages say what to check but never name the internal upstream URL
(ollama-api-service leaked it); the log has it.
"""
import http.client
import http.cookiejar
import logging
import time
from urllib.parse import quote

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.utils import requote_uri

from app.cooperative import poll_now
from app.errors import UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger(__name__)

# Never forwarded: hop-by-hop headers, the gateway's own credentials, and what requests recomputes.
_DROP_REQUEST_HEADERS = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    "authorization", "x-api-key", "cookie",
}
_DROP_RESPONSE_HEADERS = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "server", "date",
}


def forwardable_request_headers(headers):
    return {k: v for k, v in headers.items() if k.lower() not in _DROP_REQUEST_HEADERS}


def forwardable_response_headers(headers):
    return [(k, v) for k, v in headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS]


UNREACHABLE = ("cannot reach the Ollama server; check that it is running and that the "
               "gateway's upstream URL (OLLAMA_URL) points to it")


# Read buffer of each answer from Ollama. Every open stream keeps one: http.client's
# default (8 KiB) was the largest allocation per stream (tracemalloc, bench/), for lines
# of about 150 bytes. Reads of whole chunks bypass the buffer, so bulk answers are not
# slowed.
READ_BUFFER = 1024


class _AnswerReader(http.client.HTTPResponse):
    """http.client's response, reading the socket through a READ_BUFFER-sized buffer."""

    def __init__(self, sock, *args, **kwargs):
        super().__init__(_SmallBuffered(sock), *args, **kwargs)


class _SmallBuffered:
    """All http.client's response asks of its socket: makefile('rb')."""

    def __init__(self, sock):
        self._sock = sock

    def makefile(self, mode):
        return self._sock.makefile(mode, buffering=READ_BUFFER)


class _NoYieldCheck:
    """urllib3 asks an idle connection whether Ollama closed it before reusing it; asked
    without going through gevent's hub (app/cooperative.py), which let every ready
    greenlet run first: up to milliseconds before the request left."""

    @property
    def is_connected(self):
        return self.sock is not None and not poll_now(self.sock)


class OllamaHTTPConnection(_NoYieldCheck, urllib3.connection.HTTPConnection):
    response_class = _AnswerReader


class OllamaHTTPSConnection(_NoYieldCheck, urllib3.connection.HTTPSConnection):
    response_class = _AnswerReader


class OllamaHTTPConnectionPool(urllib3.HTTPConnectionPool):
    ConnectionCls = OllamaHTTPConnection


class OllamaHTTPSConnectionPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = OllamaHTTPSConnection


class UpstreamAdapter(HTTPAdapter):
    """requests' adapter, with connections whose answers keep a small read buffer."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": OllamaHTTPConnectionPool, "https": OllamaHTTPSConnectionPool}


class _QuietWhenPoolFull(logging.Filter):
    """Drop urllib3's warning for each connection it closes because its pool already keeps
    pool_maxsize idle ones: after a burst of thousands of streams that was thousands of
    identical lines, for what is meant to happen (idle connections beyond 256 close)."""

    def filter(self, record):
        return not record.getMessage().startswith("Connection pool is full")


logging.getLogger("urllib3.connectionpool").addFilter(_QuietWhenPoolFull())


def _before_sending(exc):
    """Mark a failure that happened before Ollama had the request: another may take it."""
    exc.retryable = True
    return exc


class Upstream:
    """The Ollama server requests are relayed to."""

    def __init__(self, base_url, connect_timeout=5.0, read_timeout=600.0):
        self.base_url = base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.session = requests.Session()
        self.session.trust_env = False  # an HTTP_PROXY meant for the internet must not catch Ollama
        # One session serves every client: it must not keep cookies from one for the next,
        # nor add headers of its own (an Accept-Encoding: gzip the client never sent would
        # come back compressed, since bodies are relayed raw).
        self.session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self.session.headers.clear()
        # Keep enough idle connections for a busy worker; urllib3 opens more when needed.
        self.adapter = UpstreamAdapter(pool_connections=4, pool_maxsize=256, max_retries=0)
        self.session.mount("http://", self.adapter)
        self.session.mount("https://", self.adapter)
        # What every relayed request shares, prepared once: the base URL, parsed and
        # checked, and the Authorization its user:password (if any) stands for.
        shape = requests.Request("GET", self.base_url).prepare()
        self._base = shape.url.rstrip("/")
        self._auth = {k: v for k, v in shape.headers.items() if k == "Authorization"}
        self._health = (0.0, None)

    def prepare(self, method, path, query=b"", headers=None, body=None):
        """The PreparedRequest requests would make, without the per-call work whose answer
        never changes here: parsing the base URL, building an empty cookie jar (this
        session keeps no cookies), merging session settings it does not have."""
        prepared = requests.PreparedRequest()
        prepared.method = method
        rest = quote(path, safe="/:@!$&'()*+,;=-._~")
        if query:
            rest += "?" + query.decode("latin-1")
        prepared.url = self._base + requote_uri(rest)  # what prepare_url() does to them
        prepared.prepare_headers({**headers, **self._auth} if headers else self._auth)
        prepared.prepare_body(body, None)  # Content-Length, or chunked for a stream
        return prepared

    def send(self, method, path, query=b"", headers=None, body=None, prepared=None):
        """Open a streamed request to Ollama; raise 502/504 errors the client can act on.

        Straight to the session's adapter (its connection pool): Session.send() would
        add hooks, cookie extraction and a redirect check, none of which a relay uses
        (about 0.1 ms a request with Request.prepare(); bench/hotpath.py). `prepared`:
        this request as prepare() made it already (while it waited for a slot).
        """
        try:
            return self.adapter.send(
                prepared or self.prepare(method, path, query, headers, body), stream=True,
                timeout=(self.connect_timeout, self.read_timeout), proxies={},
            )
        except requests.ConnectTimeout:
            log.warning("upstream %s: no connection in %ss", self.base_url, self.connect_timeout)
            raise _before_sending(UpstreamTimeout(
                f"Ollama did not accept a connection within {self.connect_timeout:g} s; "
                "check that the Ollama server is up and reachable from the gateway"
            )) from None
        except requests.ReadTimeout:
            log.warning("upstream %s: no answer within %ss", self.base_url, self.read_timeout)
            raise UpstreamTimeout(
                f"Ollama sent no answer within {self.read_timeout:g} s; the model may still be "
                "loading or the server is overloaded (the gateway's read_timeout sets this limit)"
            ) from None
        except requests.ConnectionError as exc:
            log.warning("upstream %s unreachable: %s", self.base_url, exc)
            raise _before_sending(UpstreamUnavailable(UNREACHABLE)) from None
        except requests.exceptions.ChunkedEncodingError as exc:
            log.warning("upstream %s broke off its answer: %s", self.base_url, exc)
            raise UpstreamUnavailable(UNREACHABLE) from None

    def health(self, max_age=5.0):
        """'healthy', 'unhealthy' (answers, but not OK) or 'unreachable'; cached a few seconds.

        The cache keeps an unauthenticated /health from becoming a lever on Ollama.
        """
        checked_at, status = self._health
        if status is not None and time.monotonic() - checked_at < max_age:
            return status
        try:
            response = self.session.get(
                self.base_url + "/api/version", timeout=(min(self.connect_timeout, 2.0), 2.0)
            )
            status = "healthy" if response.ok else "unhealthy"
            response.close()
        except requests.RequestException:
            status = "unreachable"
        self._health = (time.monotonic(), status)
        return status
