"""The request path shared by every relaying route: authenticate, read, admit, forward.

Views decide what is allowed for their endpoint; this module does the rest in the
order the product promises: a key that came in a header is checked before a byte of
the body is read, a refused request never reaches Ollama, and a request that reaches
Ollama always gives its concurrency slot back.
"""
import json
import logging
import posixpath
import time
from urllib.parse import urlencode

import requests
from flask import Response, current_app, g, request

from app.accounting import request_record
from app.admission import estimate, gpu_quota, model_policy, quota
from app.admission.fair_queue import QUEUED_PATHS
from app.errors import (
    BadRequest,
    GatewayError,
    Unauthorized,
    UpstreamUnavailable,
)
from app.keys.registry import normalize_model
from app.proxy import auth, compat_options
from app.proxy.fanout import named_upstream
from app.proxy.jsonbody import JsonBody
from app.proxy.relay import (
    ClientDisconnected,
    ClientWatch,
    RelayBody,
    RelayOutcome,
    open_upstream,
    response_headers,
)
from app.proxy.request_body import ClientStalled, read_body, stall_error, upstream_headers
from app.store.db import db
from app.store.models import GpuReservation

log = logging.getLogger(__name__)


def services():
    ext = current_app.extensions
    return ext["key_cache"], ext["limiter"], ext["upstreams"]


def settings():
    return current_app.config["SETTINGS"]


def canonical_path(path):
    """`path` if it names exactly one endpoint; 400 for spellings that could dodge a check.

    Werkzeug decodes %2F, %3F and %23, and the HTTP client later collapses `.` and `..`:
    `/api/./pull` or `/api/x%2F..%2Fpull` would be checked as one path and reach
    Ollama as another.
    """
    if (posixpath.normpath(path) != path or "//" in path
            or any(c in path for c in "?#\\") or any(ord(c) < 0x20 for c in path)):
        raise BadRequest(f"malformed path {path!r}: no empty, '.' or '..' segments, "
                         "encoded '?', '#' or '/', or trailing slash")
    return path


def _authenticate(secret):
    cache, _, _ = services()
    g.key = auth.authenticate(cache, secret)
    pending = request_record.current()
    if pending is not None:
        pending.key = g.key
    return g.key


def current_key():
    """The key from a header, or the legacy query parameter: no body is read for it."""
    conf = settings()
    secret = auth.header_credentials(request.headers) or (
        conf.legacy_apikey and auth.query_credentials(request.args))
    return _authenticate(secret or None)


def authenticated_body():
    """(key, JsonBody) for a request with a JSON body, authenticating as early as possible.

    A key in a header (or the query) is checked before the body is read, so a caller
    without one cannot make the gateway read up to max_body_bytes. Only a legacy client
    whose key is inside the body gets its body read first, and then at most
    max_unauthenticated_body_bytes of it.
    """
    conf = settings()
    secret = auth.header_credentials(request.headers) or (
        conf.legacy_apikey and auth.query_credentials(request.args))
    if secret or not conf.legacy_apikey:
        key = _authenticate(secret or None)
        return key, JsonBody(read_body(conf.max_body_bytes))
    limit = conf.max_unauthenticated_body_bytes
    raw = read_body(limit, too_large=lambda: Unauthorized(
        f"missing API key: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'; "
        f"an `apikey` field is looked for only in bodies up to {limit} bytes "
        "(max_unauthenticated_body_bytes)"))
    body = JsonBody(raw)
    return _authenticate(auth.body_credentials(body.payload)), body


def outgoing_body(body, key, path, changes=None):
    """The body Ollama gets: no gateway key, ollama-api-service's top-level options moved
    into `options`, the key's model policy applied, a quota key's tokens reserved (its
    answer capped at what is left when it sets no cap), and `changes`.

    One rewrite for all of them, and none at all when nothing changes (a large body is
    spliced, never re-encoded: app/proxy/jsonbody.py). The policy sees the options as moved,
    so a cap holds for a top-level `max_tokens` too.
    """
    payload = body.payload
    moved = compat_options.changes(path, body)
    if moved:
        payload = {**payload, "options": moved["options"]}
    # settings() costs more than the rest of a plain body's rewrite: only when needed.
    policy = (model_policy.changes(key, path, payload, settings().model_policy)
              if model_policy.applies(key) else {})
    reserved = (_reserve_quota(key, path, {**payload, **moved, **policy})
                if path in quota.CHARGED and isinstance(payload, dict) else {})
    found = {**moved, **policy, **reserved, **(changes or {})}
    drop = ["apikey", *(name for name, value in found.items() if value is None)]
    return body.rewritten({k: v for k, v in found.items() if v is not None}, drop=drop)


def _reserve_quota(key, path, payload):
    """Estimate the prompt (kept for the usage record) and, for a quota key, reserve the
    request's tokens or refuse it (app/admission/quota.py); the body changes that cap its answer."""
    pending = request_record.current()
    prompt = estimate.prompt_tokens(payload)
    if pending is not None:
        pending.prompt_estimate = prompt
    if not key.token_quota:
        return {}
    limiter = services()[1]
    reservation, send = quota.reserve(key, prompt, quota.answer_cap(key, path, payload),
                                      limiter.holder, limiter.lease_seconds,
                                      clamp=path in model_policy.ALWAYS_CLAMPED)
    g.quota_checked = True  # admit() need not check again
    g.quota_standing = reservation.standing
    if pending is not None:  # its usage record settles it; till then the lease is renewed
        pending.reservation_id = reservation.id
        limiter.hold_reservation(reservation.id)
    return {} if send is None else quota.length_change(path, payload, send)


def _reserve_gpu(key, model, spec, pending, limiter):
    """Reserve the request's estimated GPU time against its key's GPU quota, or refuse it
    (app/admission/gpu_quota.py); its usage record settles the reservation. The estimate
    is for the upstream it will most likely run on, the pool's first choice."""
    seconds = gpu_quota.estimate(key, normalize_model(model).lower() if model else None,
                                 spec, settings().gpu_quota_estimate_seconds)
    reservation = gpu_quota.reserve(key, seconds, limiter.holder, limiter.lease_seconds)
    g.gpu_quota_checked = True
    g.gpu_quota_standing = reservation.standing
    if pending is not None:
        pending.gpu_reservation_id = reservation.id
        limiter.hold_reservation(reservation.id, GpuReservation)


# Query parameters for the gateway only: a legacy key, and the upstream a client names.
GATEWAY_PARAMS = {"apikey", "upstream"}


def query_without_key():
    """The query string to send upstream, without the gateway's own parameters."""
    if not any(k.lower() in GATEWAY_PARAMS for k in request.args):
        return request.query_string
    return urlencode([(k, v) for k, v in request.args.items(multi=True)
                      if k.lower() not in GATEWAY_PARAMS]).encode()


def forward(key, path, body, query=b"", transform=None, rewrite=None, model=None,
            target=None):
    """Admit the request for `key`, send it to an Ollama server and relay the answer.

    The server is `target`, the one the client named (app/proxy/fanout.py), or the best
    of the pool for `model`; if a connection fails
    before Ollama had the request, the next is tried (not with a streamed upload: it
    cannot be sent twice). `transform(json) -> json`, when given, rewrites a small JSON
    answer (e.g. /api/tags filtered to the key's models) instead of streaming it
    through. `rewrite` (see app/proxy/sse.py) takes out of a stream what only the gateway
    asked Ollama for.
    """
    _, limiter, pool = services()
    if target is None and not pool.single:  # a client may pin its request to one
        target = named_upstream(pool)
    members = [target] if target is not None else pool.candidates(model)
    pending = request_record.current()
    if key.gpu_quota and path in QUEUED_PATHS:
        _reserve_gpu(key, model, members[0].spec, pending, limiter)
    admission = limiter.admit(key, quota_reserved=g.get("quota_checked", False),
                              gpu_reserved=g.get("gpu_quota_checked", False))
    outcome = RelayOutcome(status=0, started=time.monotonic())
    if pending is not None:
        pending.outcome = outcome
        pending.runs_model = path in QUEUED_PATHS  # it holds a slot: charged GPU time
    watch = ClientWatch(request.environ, settings().client_send_timeout).start()
    if not isinstance(body, (bytes, type(None))):
        members = members[:1]
    chosen, slots = [], []
    queue = current_app.extensions["fair_queue"] if path in QUEUED_PATHS else None

    def take_slot(remaining):
        """The member of `remaining` (best first) to send to, and its slot if it has a cap.

        Work-conserving: the first upstream that is up with a slot free, or the first
        without a cap (Ollama queues there) rather than wait; if every one is full, the
        request waits in the queues of all of them and runs on the one that frees a slot
        first (app/admission/fair_queue.py). An upstream that is down is tried only when
        none is up.
        """
        now = time.monotonic()
        up = [m for m in remaining if m.available(now)] or remaining[:1]
        if queue is None or not up[0].spec.max_concurrent:
            return up[0], None
        capped, free = [], None
        for member in up:
            if not member.spec.max_concurrent:
                free = member
                break
            capped.append(member)
        at, ticket = queue.acquire_any([(m.name, m.spec.max_concurrent) for m in capped],
                                       key, watch, elsewhere=free is not None)
        if at is None:
            return free, None
        if ticket is not None:  # None: no database, no shared queue (app/admission/fair_queue.py)
            slots.append(ticket)
        return capped[at], ticket

    def free_slots():
        """Give the upstream's slot to the next request (its answer has been read)."""
        while slots:
            queue.release(slots.pop())

    def finish(_outcome=None):
        watch.stop()
        limiter.release(admission)
        while chosen:
            chosen.pop().in_flight -= 1
        free_slots()

    headers = upstream_headers()
    try:
        response = _send_to_first(members, chosen, pending, watch, take_slot, request.method,
                                  path, query, headers, body)
    except ClientStalled:
        finish()
        raise stall_error() from None
    except ClientDisconnected:
        # Gone once Ollama had the request (it may have read the prompt): a hang-up, charged
        # its estimated prompt (app/accounting/request_record.py).
        outcome.client_aborted = bool(chosen)
        finish()
        return Response(status=499)  # nobody is listening; nginx's code for it
    except GatewayError as exc:
        finish()
        exc.headers.update(admission.headers())
        raise
    except BaseException:
        finish()
        raise
    outcome.status = response.status_code
    waited = sum(ticket.waited for ticket in slots)
    timing = _server_timing(outcome.started, time.monotonic(), waited)

    try:
        if transform is not None and response.ok and request.method == "GET":
            watch.stop()
            try:
                return _rewritten(response, transform, {**admission.headers(), **timing})
            finally:
                response.close()
                finish()
        # From here the body owns the cleanup: the WSGI server calls its close().
        relay = RelayBody(response, watch, outcome, finish, path, rewrite, free_slots)
        if slots:
            relay.read_ahead()  # a whole short answer frees its slot now
        relayed = Response(
            relay,
            status=response.status_code,
            headers=response_headers(response, {**admission.headers(), **timing}),
            direct_passthrough=True,
        )
        if pending is not None:
            request_record.relaying(pending)
        return relayed
    except BaseException:
        response.close()
        finish()
        raise


def _send_to_first(members, chosen, pending, watch, take_slot, *request_args):
    """The first upstream's answer that takes the request; the one used goes in `chosen`.

    `take_slot(remaining)` picks the upstream and waits for a slot there first
    (app/admission/fair_queue.py), on the connection the rate limit used (a wait gives it
    back); a slot at an upstream that failed is given back before the next is tried.
    """
    remaining = list(members)
    ready = None  # (member, the request prepared for it): made before the wait for a slot
    while True:
        if pending is not None:
            pending.upstream = remaining[0].name
        if ready is None or ready[0] is not remaining[0]:
            # Once a slot is granted, only the send is left: a freed slot idles 0.2 ms
            # less (bench/queue_handoff.py).
            ready = (remaining[0], remaining[0].client.prepare(*request_args))
        member, slot = take_slot(remaining)
        remaining.remove(member)
        if pending is not None:
            pending.upstream = member.name
        db.close()  # the wait on Ollama may take minutes: give the connection back now
        member.in_flight += 1
        chosen.append(member)
        started = time.monotonic()
        if pending is not None and pending.outcome is not None:
            pending.outcome.sent_at = started  # GPU time runs from here (app/accounting/gpu.py)
        try:
            response = open_upstream(member.client, watch, *request_args,
                                     prepared=ready[1] if ready[0] is member else None)
        except GatewayError as exc:
            chosen.pop().in_flight -= 1
            if not getattr(exc, "retryable", False):
                raise
            if slot is not None:  # given back at once, not when the next one's answer ends
                current_app.extensions["fair_queue"].release(slot)
            member.failed()
            if not remaining:
                raise
            log.warning("upstream %s did not take the request (%s); trying another",
                        member.name, exc.message)
            continue
        member.answered((time.monotonic() - started) * 1000)
        return response


def _server_timing(sent_at, answered_at, queued=0.0):
    """Server-Timing: the gateway's own time, the wait for an upstream's slot, and Ollama's.

    `gateway` runs from the request's arrival (reading its body included) to the moment
    it was ready to leave for Ollama; `queue` is its wait for a slot in the fair queue
    (also in X-Queue-Wait, seconds); `ollama` from then to Ollama's response headers.
    """
    arrived = g.get("started", sent_at)
    gateway = (sent_at - arrived) * 1000
    ollama = (answered_at - sent_at - queued) * 1000
    if not queued:
        return {"Server-Timing": f"gateway;dur={gateway:.2f}, ollama;dur={ollama:.2f}"}
    return {"Server-Timing": f"gateway;dur={gateway:.2f}, queue;dur={queued * 1000:.2f}, "
                             f"ollama;dur={ollama:.2f}", "X-Queue-Wait": f"{queued:.3f}"}


def _rewritten(response, transform, headers):
    """A small JSON answer passed through transform(); 502 if it cannot be read."""
    try:
        data = transform(response.json())
    except (ValueError, TypeError, AttributeError, requests.RequestException) as exc:
        raise UpstreamUnavailable(
            "Ollama's answer could not be read (malformed JSON or a broken connection); "
            "check the Ollama server's log", headers=headers,
        ) from exc
    return current_app.response_class(
        json.dumps(data), status=response.status_code, headers=headers,
        mimetype="application/json",
    )

