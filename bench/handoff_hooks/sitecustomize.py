"""Timestamps along a fair-queue hand-off, for bench/handoff_trace.py: nothing in app/ changes.

Python imports this module at start-up when its directory is on PYTHONPATH and
BENCH_TRACE_DIR is set (bench/handoff_trace.py sets both for the gateway it starts). It
wraps, as their modules are imported, the few functions a hand-off passes through, and
each call writes `<monotonic ns> <pid> <step> <id> <greenlet>` to
BENCH_TRACE_DIR/<pid>.txt. The steps, in a hand-off's order:

  status   http.client read the status line of Ollama's answer (the worker woke)
  head     Upstream.send() returned: requests built the response (id: the connection's
           local port, which the fake's own trace names)
  rel      FairQueue.release() began (id: the entry freed)
  grant    the grant is committed, its wake-up about to leave (id: the entry granted)
  deliver  the worker of the granted entry hands it to the waiting request (its keeper,
           after a datagram; or the releasing greenlet, in the same worker)
  woke     FairQueue.acquire() returns to the request that waited (id: its entry)
  send0    Upstream.send() called for it
  written  urllib3 wrote the request's last byte
"""
import importlib.abc
import importlib.util
import os
import sys
import time

DIRECTORY = os.environ.get("BENCH_TRACE_DIR")
_out = []


def trace(step, ident=0):
    if not _out or _out[0][0] != os.getpid():  # a new file after gunicorn forks a worker
        _out[:] = [(os.getpid(), open(os.path.join(DIRECTORY, f"{os.getpid()}.txt"), "a",
                                      buffering=1))]
    greenlet = sys.modules.get("greenlet")
    current = id(greenlet.getcurrent()) if greenlet else 0
    _out[0][1].write(f"{time.monotonic_ns()} {os.getpid()} {step} {ident} {current}\n")


def _port(response):
    try:
        return response.raw._connection.sock.getsockname()[1]
    except (AttributeError, OSError, IndexError):
        return -1


def _wrap(owner, name, before=None, after=None):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after:
            after(result, *args, **kwargs)
        return result

    setattr(owner, name, wrapper)


def _fair_queue(module):
    queue = module.FairQueue

    def released(self, ticket):
        if ticket is not None and ticket.entry_id is not None:
            trace("rel", ticket.entry_id)

    def granted(self, grants):
        for entry_id, _ in grants:
            trace("grant", entry_id)

    def delivered(self, entry_ids):
        for entry_id in entry_ids:
            trace("deliver", entry_id)

    def woke(ticket, self, *args, **kwargs):
        if ticket is not None and ticket.waited > 0:
            trace("woke", ticket.entry_id)

    _wrap(queue, "release", before=released)
    _wrap(queue, "_announce", before=granted)
    _wrap(queue, "_deliver", before=delivered)
    _wrap(queue, "acquire", after=woke)


def _client(module):
    _wrap(module.Upstream, "send", before=lambda *a, **k: trace("send0"),
          after=lambda response, *a, **k: trace("head", _port(response)))


def _http_client(module):
    _wrap(module.HTTPResponse, "_read_status", after=lambda *a, **k: trace("status"))


def _urllib3(module):
    _wrap(module.HTTPConnection, "request", after=lambda *a, **k: trace("written"))


HOOKS = {"app.admission.fair_queue": _fair_queue, "app.upstreams.client": _client,
         "http.client": _http_client, "urllib3.connection": _urllib3}


class _Hooks(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds nothing itself: lets the usual finder load a hooked module, then wraps it."""

    def __init__(self):
        self._loaders = {}  # module name -> the loader that would have loaded it

    def find_spec(self, name, path, target=None):
        if name not in HOOKS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None:
            return None
        self._loaders[name] = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loaders[spec.name].create_module(spec)

    def exec_module(self, module):
        self._loaders.pop(module.__name__).exec_module(module)
        HOOKS[module.__name__](module)


if DIRECTORY:
    for _name, _hook in HOOKS.items():
        if _name in sys.modules:  # imported before this (http.client, by site)
            _hook(sys.modules[_name])
    sys.meta_path.insert(0, _Hooks())
