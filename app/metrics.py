"""Prometheus metrics, summed across gunicorn workers (prometheus-client's multiprocess mode).

gunicorn's configuration points PROMETHEUS_MULTIPROC_DIR at a fresh directory before any
worker starts; each worker then writes its samples to files there, and /metrics adds
them up. Without that variable (tests, one process) the process's own registry is used.
Labels are bounded: endpoints from a fixed list, models only once Ollama answered for them.
"""
import functools
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
KNOWN_ENDPOINTS = {"/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show",
                   "/api/tags", "/api/ps", "/api/version", "/api/pull", "/api/push",
                   "/api/create", "/api/copy", "/api/delete", "/v1/chat/completions",
                   "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models",
                   "/v1/models/{model}"}

REQUESTS = Counter("ollama_gw_requests", "Requests answered, by endpoint and status.",
                   ["endpoint", "status"])
LATENCY = Histogram("ollama_gw_request_duration_seconds",
                    "From the request's arrival to its last byte.", ["endpoint"],
                    buckets=SECONDS)
TTFB = Histogram("ollama_gw_time_to_first_byte_seconds",
                 "From the request's arrival to the first byte of Ollama's answer.",
                 ["endpoint"], buckets=SECONDS)
TOKENS = Counter("ollama_gw_tokens", "Tokens Ollama reported, by model and kind.",
                 ["model", "kind"])
REFUSALS = Counter("ollama_gw_refusals", "Requests the gateway turned away, by reason.",
                   ["reason"])
UPSTREAM_ERRORS = Counter("ollama_gw_upstream_errors",
                          "Ollama unreachable (502), too slow (504) or failing mid-answer.",
                          ["kind"])
INFLIGHT = Gauge("ollama_gw_inflight_streams", "Answers being relayed right now.",
                 multiprocess_mode="livesum")
USAGE_BUFFER = Gauge("ollama_gw_usage_buffer_records",
                     "Usage records waiting to be written to the database.",
                     multiprocess_mode="livesum")
USAGE_DROPPED = Counter("ollama_gw_usage_dropped_records",
                        "Usage records dropped because the buffer was full.")
WEBHOOK_ATTEMPTS = Counter("ollama_gw_webhook_attempts",
                           "Webhook delivery attempts, by outcome.", ["outcome"])


def endpoint_label(path):
    return path if path in KNOWN_ENDPOINTS else "other"


@functools.cache
def _child(metric, *labels):
    """metric.labels(*labels), looked up once: labels() takes a lock and a dict every call."""
    return metric.labels(*labels)


def observe(record, outcome):
    """Count one finished request (app/request_record.py calls this)."""
    endpoint = endpoint_label(record.endpoint)
    _child(REQUESTS, endpoint, str(record.status)).inc()
    _child(LATENCY, endpoint).observe(record.latency_ms / 1000)
    if record.ttfb_ms is not None:
        _child(TTFB, endpoint).observe(record.ttfb_ms / 1000)
    if record.refusal:
        _child(REFUSALS, record.refusal).inc()
    elif record.status in (502, 504):
        _child(UPSTREAM_ERRORS, "unreachable" if record.status == 502 else "timeout").inc()
    elif outcome is not None and outcome.upstream_error:
        _child(UPSTREAM_ERRORS, "mid_answer").inc()
    if record.model and record.prompt_tokens:
        _child(TOKENS, record.model, "prompt").inc(record.prompt_tokens)
    if record.model and record.completion_tokens:
        _child(TOKENS, record.model, "completion").inc(record.completion_tokens)


def exposition():
    """(body, content type) of /metrics: every worker's samples, summed."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
