"""Being a good citizen of a gevent worker: yield during long work, bound waits on clients.

Under gunicorn's gevent worker one process serves thousands of connections on one
thread; anything that runs long without yielding stalls all of them. Outside gevent
(tests with Flask's client, the CLI) these helpers do nothing.
"""
import contextlib
import functools
import select
import weakref

# Connections to close once their current answer is sent; app/serving/worker.py does it.
closing_connections = weakref.WeakSet()


@functools.cache
def gevent_active():
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("socket")


def pause():
    """Let other greenlets run (streams on this worker) before going on."""
    if gevent_active():
        import gevent

        gevent.sleep(0)


def poll_now(sock):
    """Whether `sock` has something to read (or was closed), asked without waiting.

    Under gevent, even a poll with a zero timeout is a wait: the greenlet goes to the hub,
    and every other greenlet that is ready runs first (a median 0.6 ms, at worst
    several, for urllib3's check of an idle connection before each request to Ollama;
    bench/queue_handoff.py). Asked of the unpatched poll(), the answer is one system call.
    """
    poll = _original_poll()()
    poll.register(sock, select.POLLIN)
    return bool(poll.poll(0))


@functools.cache
def _original_poll():
    try:
        from gevent import monkey
    except ImportError:
        return select.poll
    return monkey.get_original("select", "poll")


@contextlib.contextmanager
def deadline(seconds, exception):
    """Raise `exception` in this greenlet if the block takes longer than `seconds`."""
    if not gevent_active():
        yield
        return
    import gevent

    with gevent.Timeout(seconds, exception):
        yield


def close_after_response(environ):
    """Close this connection after the answer instead of keeping it alive.

    For an answer sent without reading the request body (401 before a large upload,
    413, 408): gunicorn would otherwise read and discard the rest of the body to reach
    the next request, which is the work refusing early was meant to save. A
    `Connection: close` header from the app is not enough, gunicorn drops it: the
    worker (app/serving/worker.py) has gunicorn send it, so keep-alive clients reconnect.
    """
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        closing_connections.add(sock)
