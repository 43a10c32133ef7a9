"""Prometheus metrics, summed across gunicorn workers (prometheus-client's multiprocess mode).

gunicorn's configuration points PROMETHEUS_MULTIPROC_DIR at a fresh directory before any
worker starts; each worker then writes its samples to files there, and /metrics adds
them up. Without that variable (tests, one process) the process's own registry is used.
Labels are bounded: endpoints from a fixed list, models only once Ollama answered for them.
"""
import bisect
import collections
import functools
import os
import threading

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
                   "/v1/models/{model}", "/v1/messages", "/api/experimental/web_search",
                   "/api/experimental/web_fetch"}

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
CLOUD_REQUESTS = Counter("ollama_gw_cloud_requests",
                         "Requests that ran on ollama.com (cloud models, web search), by "
                         "endpoint and status: part of ollama_gw_requests.",
                         ["endpoint", "status"])
CLOUD_TOKENS = Counter("ollama_gw_cloud_tokens",
                       "Tokens of requests that ran on ollama.com, by model and kind: part of "
                       "ollama_gw_tokens.", ["model", "kind"])
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
USAGE_DEAD_LETTERS = Counter("ollama_gw_usage_dead_letters",
                             "Usage records the database refused even made safe, and spilled "
                             "lines that could not be read: kept in data_dir's dead-letter file.")
QUEUE_WAITING = Gauge("ollama_gw_queue_waiting",
                      "Requests waiting in the fair queue for an upstream's slot, by key prefix.",
                      ["upstream", "key"], multiprocess_mode="livesum")
QUEUE_WAIT = Histogram("ollama_gw_queue_wait_seconds",
                       "How long requests waited for an upstream's slot, by key prefix.",
                       ["upstream", "key"], buckets=SECONDS)
GPU_SECONDS = Counter("ollama_gw_gpu_seconds",
                      "GPU time requests used (app/accounting/gpu.py: time holding a slot / "
                      "the upstream's slots x its gpu_cost), by upstream, model and key prefix.",
                      ["upstream", "model", "key"])
WEBHOOK_ATTEMPTS = Counter("ollama_gw_webhook_attempts",
                           "Webhook delivery attempts, by outcome.", ["outcome"])


def endpoint_label(path):
    return path if path in KNOWN_ENDPOINTS else "other"


@functools.cache
def _child(metric, *labels):
    """metric.labels(*labels), looked up once: labels() takes a lock and a dict every call."""
    return metric.labels(*labels)


class Tally:
    """This worker's finished requests, summed in plain dicts and written out in one go.

    In multiprocess mode every value update takes a lock and checks the process id; a
    request made nine of them (4 % of a worker's time under load, py-spy). observe()
    only adds to dicts; flush() writes one update per label set and histogram bucket.
    It runs on the usage writer's turn (every usage_flush_seconds), before this worker
    answers /metrics, and at exit: another worker's figures lag by at most one turn.
    """

    def __init__(self):
        self.inflight = 0
        self._lock = threading.Lock()  # flush() runs on the writer's thread too
        self._counts = collections.Counter()  # (metric, labels) -> amount
        self._observed = collections.defaultdict(list)  # (histogram, labels) -> seconds

    def observe(self, record, outcome):
        """Count one finished request (app/accounting/request_record.py calls this)."""
        with self._lock:
            self._add(record, outcome, self._counts, self._observed)

    def observe_queue_wait(self, upstream, key_prefix, seconds):
        """Count one request's wait for an upstream's slot (app/admission/fair_queue.py)."""
        with self._lock:
            self._observed[QUEUE_WAIT, (upstream, key_prefix)].append(seconds)

    @staticmethod
    def _add(record, outcome, counts, observed):
        endpoint = endpoint_label(record.endpoint)
        counts[REQUESTS, (endpoint, str(record.status))] += 1
        observed[LATENCY, (endpoint,)].append(record.latency_ms / 1000)
        if record.ttfb_ms is not None:
            observed[TTFB, (endpoint,)].append(record.ttfb_ms / 1000)
        if record.refusal:
            counts[REFUSALS, (record.refusal,)] += 1
        elif record.status in (502, 504):
            counts[UPSTREAM_ERRORS, ("unreachable" if record.status == 502 else "timeout",)] += 1
        elif outcome is not None and outcome.upstream_error:
            counts[UPSTREAM_ERRORS, ("mid_answer",)] += 1
        if record.model and record.prompt_tokens:
            counts[TOKENS, (record.model, "prompt")] += record.prompt_tokens
        if record.model and record.completion_tokens:
            counts[TOKENS, (record.model, "completion")] += record.completion_tokens
        if record.gpu_seconds:  # a model Ollama failed for is "other": labels stay bounded
            model = record.model if record.status < 400 else "other"
            counts[GPU_SECONDS, (record.upstream or "", model or "",
                                 record.key_prefix or "")] += record.gpu_seconds
        if record.cloud:
            counts[CLOUD_REQUESTS, (endpoint, str(record.status))] += 1
            for kind, amount in (("prompt", record.prompt_tokens),
                                 ("completion", record.completion_tokens)):
                if amount:
                    counts[CLOUD_TOKENS, (record.model or "", kind)] += amount

    def flush(self):
        with self._lock:
            counts, self._counts = self._counts, collections.Counter()
            observed, self._observed = self._observed, collections.defaultdict(list)
        for (metric, labels), amount in counts.items():
            _child(metric, *labels).inc(amount)
        for (metric, labels), values in observed.items():
            _observe_all(_child(metric, *labels), values)
        INFLIGHT.set(self.inflight)


def _observe_all(histogram, values):
    """histogram.observe() for each value, as one update per bucket and one of the sum.

    Reaches into prometheus-client's Histogram (_upper_bounds, _buckets, _sum: stable
    since 0.4, pinned in constraints.txt); tests/accounting/test_usage_gateway.py checks the output.
    """
    bounds = histogram._upper_bounds
    per_bucket = collections.Counter(bisect.bisect_left(bounds, v) for v in values)
    for index, count in per_bucket.items():
        histogram._buckets[index].inc(count)
    histogram._sum.inc(sum(values))


TALLY = Tally()
observe = TALLY.observe


def exposition():
    """(body, content type) of /metrics: every worker's samples, summed."""
    TALLY.flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
