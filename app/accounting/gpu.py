"""GPU time: what a request cost the GPU it ran on, in seconds of the whole GPU.

A request's GPU time is the time it held one of its upstream's slots divided by the
upstream's slots, times the upstream's gpu_cost:

- the time held is Ollama's `total_duration` where the answer reports it (native /api,
  in nanoseconds, read from the answer's last bytes in passing), else the time from the
  gateway sending the request to the answer's last byte arriving from Ollama (/v1/*:
  Ollama's OpenAI answers carry no durations; an /api answer cut short has none either),
  not to the client's last byte: a slow client does not hold Ollama's slot;
- the slots are the upstream's max_concurrent, or its `parallel` when it has no cap
  (UpstreamSpec.slots). Requests that ran side by side report overlapping durations;
  dividing each by the slots keeps their sum within the GPU's own time;
- a model load (`load_duration`, inside total_duration) is charged to the request that
  caused it; with gpu_load_charge = "spread" it is taken out of that request's time and
  shared evenly by the next gpu_load_spread_requests requests of that model on that
  upstream that this worker finishes (a load not yet fully shared when the worker exits
  is not charged further);
- a request that used no local GPU gets None: refused, never sent, or a cloud model's
  (accounted apart, on its owner's plan: gpu_seconds() is the one place that decides).

Only endpoints that run a model are charged (the proxy marks them: Pending.runs_model).
"""
import collections
import re
import threading

_DURATIONS = re.compile(rb'"(total_duration|load_duration)"\s*:\s*(\d+)')
NS = 1e9


def reported(tail):
    """(total, load) seconds from the last durations Ollama wrote in `tail`, or None each."""
    found = {}
    for name, value in _DURATIONS.findall(tail):
        found[name] = int(value) / NS  # the last wins: the final object ends the answer
    return found.get(b"total_duration"), found.get(b"load_duration")


def held(endpoint, outcome, ended):
    """(seconds the request held its slot, seconds of them loading the model) or (None, 0.0)."""
    sent = getattr(outcome, "sent_at", None)
    if sent is None:
        return None, 0.0
    if endpoint.startswith("/api/") and outcome.complete and not outcome.upstream_error:
        total, load = reported(outcome.tail)
        if total is not None:
            return total, min(load or 0.0, total)
    return max(0.0, (getattr(outcome, "last_byte_at", None) or ended) - sent), 0.0


def gpu_seconds(record, spec, held_seconds, load_seconds=0.0, spreader=None):
    """(GPU seconds, of which model load) of a finished request; (None, None) if it used no
    local GPU: no upstream, never sent, or a cloud model's request (`record.cloud_model`),
    which its owner's plan pays for and which the GPU-time figures and quotas leave out. A
    local model that only searches the web on ollama.com is charged its GPU time."""
    if spec is None or held_seconds is None or getattr(record, "cloud_model", False):
        return None, None
    load = min(load_seconds or 0.0, held_seconds)
    if spreader is not None:
        work = held_seconds - load
        load = spreader.charge(spec.name, record.model, load)
        held_seconds = work + load
    factor = spec.gpu_cost / spec.slots
    return round(held_seconds * factor, 6), round(load * factor, 6)


def shown(seconds):
    """GPU seconds as people read them: 0.84s, 12.5s, 4m05s, 2h03m."""
    if round(seconds, 2) < 10:  # the unit by the figure shown: 9.996 is 10.0s, not 10.00s
        return f"{seconds:.2f}s"
    if round(seconds, 1) < 60:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class LoadSpreader:
    """gpu_load_charge = "spread": each model load shared by the next `requests` requests of
    that model on that upstream (this worker's), not charged to the one that caused it."""

    def __init__(self, requests):
        self.requests = requests
        self._owed = collections.defaultdict(collections.deque)  # (upstream, model) -> shares
        self._lock = threading.Lock()

    def charge(self, upstream, model, load):
        """The load seconds this request pays: a share of each earlier load still owed; its
        own `load` is queued for the requests after it."""
        with self._lock:
            owed = self._owed[(upstream, model)]
            charged = 0.0
            for share in owed:
                charged += share[0]
                share[1] -= 1
            while owed and owed[0][1] <= 0:
                owed.popleft()
            if load:
                owed.append([load / self.requests, self.requests])
            if not owed:
                del self._owed[(upstream, model)]
            return charged


class Meter:
    """Puts GPU seconds on records as requests finish (app/accounting/request_record.py)."""

    def __init__(self, specs, load_charge="request", spread_requests=10):
        self.specs = {spec.name: spec for spec in specs}
        self.spreader = LoadSpreader(spread_requests) if load_charge == "spread" else None

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.upstream_specs, settings.gpu_load_charge,
                   settings.gpu_load_spread_requests)

    def charge(self, record, outcome, ended):
        """Set record.gpu_seconds and record.load_seconds (None: no local GPU used)."""
        seconds, load = held(record.endpoint, outcome, ended)
        record.gpu_seconds, record.load_seconds = gpu_seconds(
            record, self.specs.get(record.upstream), seconds, load, self.spreader)
