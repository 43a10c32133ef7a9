"""Several Ollama servers behind one gateway: who is up, who has the model, who is least busy.

Each worker keeps a view of every upstream: the models it has (/api/tags), the models it
has loaded (/api/ps), whether it answers, and how many of this worker's requests are in
flight there (with one upstream, only that). A monitor refreshes the view and reports it
for `ollama-gw upstreams` every `upstream_refresh_seconds`; an upstream
that fails is down, and is probed again after 1 s, then twice as long each time, up to a
minute. A request goes to an upstream that is up and has its model, one with the model
loaded first, then the least busy for its weight; the gateway tries the next when a
connection fails before Ollama had the request (app/proxy/gateway.py).
"""
import dataclasses
import logging
import os
import random
import socket
import threading
import time
from urllib.parse import urlsplit

import requests

from app.config import UpstreamSpec
from app.errors import BadRequest
from app.keys.registry import normalize_model
from app.upstreams.client import Upstream

log = logging.getLogger(__name__)
LONGEST_BACKOFF = 60.0
# Sent with the reads of an upstream's cloud models, which no client asked for: its log
# (and the tests' fake Ollama) can tell them from relayed requests.
CLOUD_READER = "ollama-gw (cloud models)"


def _name(model):
    return normalize_model(model).lower()


@dataclasses.dataclass(eq=False)
class Member:
    """One upstream as this worker sees it."""

    spec: UpstreamSpec
    client: Upstream
    models: frozenset | None = None  # normalized, lower-case; None: not read yet
    loaded: frozenset = frozenset()
    up: bool = True
    failures: int = 0
    retry_at: float = 0.0
    in_flight: int = 0
    latency_ms: float | None = None  # recent time to Ollama's response headers
    checked_at: float | None = None
    # Models /api/tags lists with a remote_host (they run on ollama.com): normalized,
    # lower-case; None: not read yet. `remote_at`: when (monotonic) they were read.
    remote: frozenset | None = None
    remote_at: float = 0.0
    reading: object = dataclasses.field(default_factory=threading.Lock)

    @property
    def name(self):
        return self.spec.name

    def has(self, model):
        return self.models is None or _name(model) in self.models

    def available(self, now):
        return self.up or now >= self.retry_at

    def failed(self, now=None):
        """A request or probe failed: down, and left alone for a while that doubles."""
        now = time.monotonic() if now is None else now
        if self.up:
            log.warning("upstream %s is down; retrying it in a second", self.name)
        self.up = False
        self.failures += 1
        self.retry_at = now + min(LONGEST_BACKOFF, 2 ** (self.failures - 1))

    def answered(self, latency_ms=None):
        if not self.up:
            log.info("upstream %s answers again", self.name)
        self.up, self.failures = True, 0
        if latency_ms is not None:
            self.latency_ms = latency_ms if self.latency_ms is None else \
                0.8 * self.latency_ms + 0.2 * latency_ms

    def at_cap(self):
        return self.spec.max_concurrent is not None and self.in_flight >= self.spec.max_concurrent


class UpstreamPool:
    def __init__(self, specs, connect_timeout=5.0, read_timeout=600.0, refresh_seconds=5.0):
        self.members = [Member(spec, Upstream(spec.url, connect_timeout, read_timeout))
                        for spec in specs]
        self.refresh_seconds = refresh_seconds
        self.holder = f"{socket.gethostname()}:{os.getpid()}"[:128]
        self._monitor = None

    @property
    def single(self):
        return len(self.members) == 1

    def named(self, name):
        """The upstream called `name`; 400 naming the known ones if there is none."""
        for member in self.members:
            if member.name == name:
                return member
        raise BadRequest(f"no upstream named {name!r}; known: "
                         f"{', '.join(m.name for m in self.members)}")

    def candidates(self, model=None, now=None):
        """Where to send a request for `model`, best first.

        The upstreams that have the model: those that are up first — one with it loaded,
        then the least busy for its weight (ties drawn at random by weight, so idle
        upstreams share the load), those at their max_concurrent last — then those that
        are down, soonest retry first, as a last resort. If none has the model, the ones
        that are up: Ollama answers its own 404.
        """
        if self.single:
            return list(self.members)
        now = time.monotonic() if now is None else now
        wanted = _name(model) if model else None

        def rank(m):
            return (m.at_cap(), wanted not in m.loaded, m.in_flight / m.spec.weight,
                    -random.random() ** (1 / m.spec.weight))

        having = [m for m in self.members if not model or m.has(model)]
        if not having:
            having = [m for m in self.members if m.available(now)] or self.members
        live = sorted((m for m in having if m.available(now)), key=rank)
        down = sorted((m for m in having if not m.available(now)), key=lambda m: m.retry_at)
        return live + down

    # -- the view, kept fresh

    def start(self):
        """Refresh the view in the background (a greenlet under gunicorn's gevent worker)."""
        if self._monitor is None:
            self._monitor = threading.Thread(target=self._watch, name="upstream-monitor",
                                             daemon=True)
            self._monitor.start()

    def _watch(self):
        while True:
            if self.single:  # nothing to choose between: only report its requests in flight
                self._publish()
            else:
                self.refresh()
            time.sleep(self.refresh_seconds)

    def refresh(self, now=None):
        """Read every due upstream's models and loaded models; mark who answers."""
        now = time.monotonic() if now is None else now
        for member in self.members:
            if member.up or now >= member.retry_at:
                self._probe(member)
        self._publish()

    def _probe(self, member):
        session, timeout = member.client.session, (min(member.client.connect_timeout, 2.0), 5.0)
        try:
            started = time.monotonic()
            tags = session.get(member.client.base_url + "/api/tags", timeout=timeout)
            ps = session.get(member.client.base_url + "/api/ps", timeout=timeout)
            tags.raise_for_status()
            ps.raise_for_status()
            listed = tags.json().get("models") or []
            member.models = frozenset(_name(m.get("name") or m.get("model") or "")
                                      for m in listed)
            member.remote, member.remote_at = remote_names(listed), time.monotonic()
            member.loaded = frozenset(_name(m.get("name") or m.get("model") or "")
                                      for m in ps.json().get("models") or [])
        except (requests.RequestException, ValueError, AttributeError) as exc:
            log.debug("upstream %s probe failed: %s", member.name, exc)
            member.failed()
        else:
            member.answered((time.monotonic() - started) * 500)  # two round trips
        member.checked_at = time.time()

    def remote_models(self, now=None):
        """The models any upstream's /api/tags lists with a remote_host, as last read.

        The monitor reads them with the model lists (several upstreams); otherwise, or if
        its view is older than two refreshes, this reads /api/tags here, once per
        upstream_refresh_seconds whatever the traffic: other requests meanwhile use the
        view being replaced, or wait for the first one. An upstream that does not answer
        keeps its last view (none: nothing is known remote there).
        """
        now = time.monotonic() if now is None else now
        for member in self.members:
            if member.remote is None or now - member.remote_at > 2 * self.refresh_seconds:
                self._read_remote(member, now)
        if self.single:
            return self.members[0].remote or frozenset()
        return frozenset().union(*(member.remote or () for member in self.members))

    def _read_remote(self, member, now):
        if not member.reading.acquire(blocking=member.remote is None):
            return  # another request is reading them: this one uses the last view
        try:
            if member.remote is not None and now - member.remote_at <= 2 * self.refresh_seconds:
                return  # read while this one waited
            client = member.client
            try:
                tags = client.session.get(client.base_url + "/api/tags",
                                          headers={"User-Agent": CLOUD_READER},
                                          timeout=(min(client.connect_timeout, 2.0), 5.0))
                tags.raise_for_status()
                member.remote = remote_names(tags.json().get("models") or [])
            except (requests.RequestException, ValueError, AttributeError) as exc:
                log.debug("upstream %s: could not read its cloud models: %s", member.name, exc)
                if member.remote is None:
                    member.remote = frozenset()
            member.remote_at = time.monotonic()
        finally:
            member.reading.release()

    def _publish(self):
        """Write this worker's view for `ollama-gw upstreams` (best effort)."""
        from app.store.db import db
        from app.store.models import UpstreamStatus

        rows = [{"holder": self.holder, "upstream": m.name, "up": m.up,
                 "in_flight": m.in_flight, "updated_at": time.time()} for m in self.members]
        try:
            with db.connection_context():
                UpstreamStatus.insert_many(rows).on_conflict(
                    conflict_target=[UpstreamStatus.holder, UpstreamStatus.upstream],
                    preserve=[UpstreamStatus.up, UpstreamStatus.in_flight,
                              UpstreamStatus.updated_at]).execute()
        except Exception as exc:  # the CLI's view goes stale; requests are not affected
            log.debug("could not record upstream status: %s", exc)

    def health(self):
        """[(shown name, 'healthy'|'unreachable'), …] for /health: the monitor's view, or a probe.

        /health needs no key, so an upstream known only by its default name, its
        `host:port`, is shown as `upstream N` (its place in the list). Only shown: the
        name itself keys the fair queue, and renaming it would split a rolling upgrade's
        old and new instances into two queues.
        """
        if self._monitor is None or self.single:  # no probing monitor: ask, cached 5 s
            states = [m.client.health() for m in self.members]
        else:
            states = ["healthy" if m.up else "unreachable" for m in self.members]
        return [(_shown_name(m.spec, i), state)
                for i, (m, state) in enumerate(zip(self.members, states, strict=True), 1)]


def remote_names(listed):
    """The names of /api/tags entries that run elsewhere (Ollama marks them remote_host)."""
    return frozenset(_name(m.get("name") or m.get("model") or "") for m in listed
                     if isinstance(m, dict) and m.get("remote_host"))


def _shown_name(spec, position):
    """The name an admin gave the upstream, or `upstream N` in place of its host:port."""
    return f"upstream {position}" if spec.name == urlsplit(spec.url).netloc else spec.name


def probe(url, connect_timeout):
    """('healthy'|'unreachable'|'unhealthy', models, loaded models), asked of the server
    itself now (`ollama-gw upstreams`, the dashboard), not a worker's view."""
    session = Upstream(url, connect_timeout).session
    timeout = (min(connect_timeout, 2.0), 5.0)
    try:
        tags = session.get(url + "/api/tags", timeout=timeout)
        ps = session.get(url + "/api/ps", timeout=timeout)
        if not (tags.ok and ps.ok):
            return "unhealthy", [], []
        return ("healthy", sorted(m.get("name", "") for m in tags.json().get("models") or []),
                sorted(m.get("name", "") for m in ps.json().get("models") or []))
    except (requests.RequestException, ValueError, AttributeError):
        return "unreachable", [], []
    finally:
        session.close()


def init_app(app):
    settings = app.config["SETTINGS"]
    pool = app.extensions["upstreams"] = UpstreamPool(
        settings.upstream_specs, settings.connect_timeout, settings.read_timeout,
        settings.upstream_refresh_seconds)
    from app.cooperative import gevent_active

    if gevent_active():  # one upstream too: `ollama-gw upstreams` shows its requests in flight
        pool.start()
