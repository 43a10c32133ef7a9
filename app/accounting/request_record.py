"""What each relayed request did, taken as it ends: usage record, access-log line, metrics.

A request that reaches the relay says so with begin(); the gateway fills in its key,
model and the relay's outcome. When the WSGI server closes the response (after its
last byte, or when the client left) finish() builds the Record and hands it on. That
costs a few microseconds on the request's own greenlet; the database write happens
later, in app/accounting/usage.py's writer.
"""
import collections
import dataclasses
import json
import logging
import math
import sys
import time
from urllib.parse import urlencode

from flask import g, request
from werkzeug.wsgi import ClosingIterator

from app import metrics
from app.accounting import gpu
from app.accounting.dead_letters import DeadLetters
from app.accounting.usage import Record, UsageWriter, load_spills, spill, token_counts
from app.keys.registry import normalize_model
from app.redact import redact
from app.store.client_address import client_address
from app.store.models import GpuReservation
from app.webhooks import outbox as webhooks


@dataclasses.dataclass
class Pending:
    """A request in progress, as much as is known of it so far."""

    endpoint: str
    method: str
    at: float
    started: float
    key: object = None  # KeyInfo
    model: str | None = None
    upstream: str | None = None
    outcome: object = None  # RelayOutcome, once the request was forwarded
    relaying: bool = False  # the answer is being streamed by a RelayBody
    prompt: dict | None = None
    status: int = 0
    refusal: str | None = None
    remote: str | None = None
    query: str = ""
    prompt_estimate: int | None = None  # app/admission/estimate.py's, for a model-running request
    reservation_id: int | None = None  # its quota reservation (app/admission/quota.py)
    gpu_reservation_id: int | None = None  # its GPU-quota one (app/admission/gpu_quota.py)
    runs_model: bool = False  # holds an upstream slot: charged GPU time (app/accounting/gpu.py)
    cloud: bool = False  # it uses ollama.com (app/proxy/cloud.py)
    cloud_model: bool = False  # ... and runs there wholly: no local GPU time


def begin(endpoint):
    """Account for this request (a relayed endpoint) from now on."""
    context = g._get_current_object()  # one context-local lookup, not one per attribute
    context.usage = pending = Pending(endpoint, request.method, time.time(),
                                      getattr(context, "started", None) or time.monotonic())
    return pending


def current():
    return g.get("usage")


def keep_prompt(pending, payload):
    """Keep go-ollama-api's webhook fields (prompt, stream, images, raw) if a webhook wants
    them; otherwise no prompt text is held at all."""
    if payload and webhooks.wants_prompts():
        messages = payload.get("messages")
        prompt = payload.get("prompt")
        if prompt is None and isinstance(messages, list) and messages:
            last = messages[-1]
            prompt = last.get("content") if isinstance(last, dict) else None
        pending.prompt = {"prompt": prompt, "stream": payload.get("stream", True),
                          "images": payload.get("images") or [], "raw": payload.get("raw")}


def relaying(pending):
    """The answer starts streaming: count it in flight until finish()."""
    pending.relaying = True
    metrics.TALLY.inflight += 1


def finish(writer, pending, response, log_access, limiter=None, warning_share=0.8,
           meter=None):
    end = time.monotonic()
    outcome = pending.outcome
    relayed = outcome is not None and outcome.first_byte_at is not None
    prompt = completion = eval_ms = None
    estimated = False
    if outcome is not None:
        complete = outcome.complete and not outcome.upstream_error
        # Ollama had the prompt once it answered, or while the client waited for it.
        charged = None if complete or not (relayed or outcome.client_aborted) else (
            pending.prompt_estimate)
        prompt, completion, eval_ms = token_counts(
            outcome.tail, outcome.lines, complete, charged)
        if (complete and prompt is None and completion is None and relayed
                and pending.prompt_estimate is not None and pending.status < 400):
            # A whole answer to a counted request, without Ollama's counts (a stream whose
            # client spelled its options so that Ollama left the usage out): charged as a
            # cut-off one, never as nothing.
            charged = pending.prompt_estimate
            prompt, completion, eval_ms = token_counts(outcome.tail, outcome.lines, False,
                                                       charged)
        estimated = charged is not None
    if limiter is not None and pending.reservation_id is not None:
        limiter.let_go(pending.reservation_id)
    if limiter is not None and pending.gpu_reservation_id is not None:
        limiter.let_go(pending.gpu_reservation_id, GpuReservation)
    status = pending.status
    if relayed and outcome.upstream_error:
        status = 502  # Ollama broke off mid-answer: a failure, whatever status line went out
    key = pending.key
    record = Record(
        at=pending.at, endpoint=pending.endpoint, status=status,
        latency_ms=round((end - pending.started) * 1000),
        key_id=key.id if key else None, key_prefix=key.prefix if key else None,
        key_name=key.name if key else None,
        quota_period=key.token_period if key and key.token_quota else None,
        token_quota=key.token_quota if key else None,
        # round(): 0.7 * 10 is 7.000000000000001, and the warning is due at 7.
        quota_warning_at=math.ceil(round(key.token_quota * warning_share, 6))
        if key and key.token_quota else None,
        reservation_id=pending.reservation_id, prompt_estimated=estimated,
        model=normalize_model(pending.model).lower() if pending.model else None,
        upstream=pending.upstream, refusal=pending.refusal,
        prompt_tokens=prompt, completion_tokens=completion, eval_ms=eval_ms,
        ttfb_ms=round((outcome.first_byte_at - pending.started) * 1000) if relayed else None,
        bytes=outcome.bytes if relayed else (response.content_length or 0),
        aborted=bool(outcome is not None and outcome.client_aborted),
        prompt=pending.prompt, cloud=pending.cloud, cloud_model=pending.cloud_model,
        gpu_period=key.gpu_period if key and key.gpu_quota else None,
        gpu_reservation_id=pending.gpu_reservation_id,
    )
    if meter is not None and pending.runs_model and outcome is not None:
        meter.charge(record, outcome, end)
    dropped = writer.dropped
    writer.add(record)
    if writer.dropped != dropped:
        metrics.USAGE_DROPPED.inc()
    if pending.relaying:
        metrics.TALLY.inflight -= 1
    metrics.observe(record, outcome)
    if log_access:
        ACCESS_LOG.add(_access_line(pending, record))


class AccessLog:
    """JSON access-log lines on stderr (the journal under systemd), written in batches.

    Not through logging, and not a write per request: a LogRecord and its handler's lock
    cost about 25 µs, a write system call a few more. Lines wait for the usage writer's
    next turn (usage_flush_seconds) or until 256 have gathered, and are flushed when the
    worker exits.
    """

    BATCH = 256

    def __init__(self, stream=None):
        self.stream = stream
        self._lines = collections.deque()  # append and popleft are atomic: no lock needed

    def add(self, fields):
        self._lines.append(json.dumps(fields, separators=(",", ":")))
        if len(self._lines) >= self.BATCH:
            self.flush()

    def flush(self):
        lines = [self._lines.popleft() for _ in range(len(self._lines))]
        if lines:
            stream = self.stream or sys.stderr  # tests swap sys.stderr
            stream.write("\n".join(lines) + "\n")
            stream.flush()


ACCESS_LOG = AccessLog()


def _timestamp(at, _cache={}):  # noqa: B006 - a one-entry cache of the formatted second
    second = int(at)
    text = _cache.get(second)
    if text is None:
        _cache.clear()
        text = _cache[second] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{text}.{int(at % 1 * 1000):03d}Z"


def _access_line(pending, record):
    """One JSON object per request: the key's public prefix, never the key; no prompt text.

    The path and query are the only fields a client chooses freely, so a key pasted
    into them is masked there (app/redact.py); the rest are numbers and names we made.
    """
    return {
        "time": _timestamp(record.at),
        "remote": pending.remote, "method": pending.method, "path": redact(pending.endpoint),
        "query": redact(pending.query), "status": pending.status, "ms": record.latency_ms,
        "ttfb_ms": record.ttfb_ms, "bytes": record.bytes, "key": record.key_prefix,
        "model": record.model, "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens, "aborted": record.aborted,
        "refused": record.refusal,
    }


def _query_without_keys(req):
    """The query string with any `apikey` value masked: it is logged."""
    if not req.query_string:
        return ""
    return urlencode([(k, "[redacted]" if k.lower() == "apikey" else v)
                      for k, v in req.args.items(multi=True)])


def flush_at_exit(app, seconds=10.0):
    """Write what the buffer holds before the worker exits; spill what the database refuses."""
    writer = app.extensions["usage"]
    deadline = time.monotonic() + seconds
    while not writer.write_pending() and time.monotonic() < deadline:
        time.sleep(0.5)
    ACCESS_LOG.flush()
    metrics.TALLY.flush()
    left = writer.take_all()
    if left:
        path = spill(left, app.config["SETTINGS"].resolved_data_dir)
        logging.getLogger(__name__).error(
            "the database took no usage records for %g s: %d record(s) saved to %s, to be "
            "written by the next gateway that starts", seconds, len(left), path)


def init_app(app):
    settings = app.config["SETTINGS"]
    limiter = app.extensions["limiter"]
    share = settings.quota_warning_share
    writer = app.extensions["usage"] = UsageWriter(
        settings.usage_buffer_records, settings.usage_flush_seconds,
        on_batch=webhooks.enqueue_usage,  # events stored with the records: the outbox
        on_written=_after_each_write, dead_letters=DeadLetters(settings.resolved_data_dir))
    load_spills(settings.resolved_data_dir, writer)
    log_access = settings.access_log
    meter = gpu.Meter.from_settings(settings)

    @app.before_request
    def _started():
        g.started = time.monotonic()

    @app.after_request
    def _finish_when_closed(response):
        context = g._get_current_object()
        pending = getattr(context, "usage", None)
        if pending is not None:
            req = request._get_current_object()
            pending.status = response.status_code
            pending.refusal = getattr(context, "refusal", None)
            pending.remote = client_address()
            pending.query = _query_without_keys(req)
            _when_closed(response,
                         lambda: finish(writer, pending, response, log_access, limiter, share,
                                          meter))
        return response


def _after_each_write(depth):
    metrics.USAGE_BUFFER.set(depth)
    metrics.TALLY.flush()
    ACCESS_LOG.flush()


def _when_closed(response, callback):
    """Call `callback` once the server closes the response, relayed streams included.

    werkzeug hands a direct_passthrough body (the relay's) to the server as it is, so
    call_on_close would never run for it: the relay's body runs it itself after its own
    cleanup (app/proxy/relay.py), any other is wrapped, and its close() runs first.
    """
    if response.direct_passthrough:
        body = response.response
        if hasattr(body, "call_on_close"):
            body.call_on_close(callback)
        else:
            response.response = ClosingIterator(body, callback)
    else:
        response.call_on_close(callback)
