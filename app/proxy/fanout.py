"""Requests for every upstream at once: model lists, model management, blob uploads.

With several Ollama servers, /api/tags, /api/ps and /v1/models answer with the union of
what the servers that are up list (each model once), and model management — pull,
push, create, copy, delete, blobs — goes to the upstream a client names (header
`X-Ollama-Upstream` or query `upstream`) or to all of them, one after another; a blob
upload is copied to all of them as it arrives.
"""
import itertools
import json
import queue
import threading

from flask import Response, current_app, request

from app.errors import GatewayError, UpstreamUnavailable
from app.proxy import cloud
from app.proxy.relay import CHUNK_SIZE, ClientDisconnected
from app.proxy.request_body import upstream_headers
from app.store.db import db

HEADER, PARAM = "X-Ollama-Upstream", "upstream"


def named_upstream(pool):
    """The upstream the client named, or None (then: all of them)."""
    name = request.headers.get(HEADER) or request.args.get(PARAM)
    return pool.named(name.strip()) if name else None


def _services():
    return current_app.extensions["limiter"], current_app.extensions["upstreams"]


def _admitted(key):
    limiter, pool = _services()
    admission = limiter.admit(key)
    db.close()
    return limiter, pool, admission


def _json(data, status, admission):
    return current_app.response_class(json.dumps(data), status=status,
                                      headers=admission.headers(), mimetype="application/json")


def union(key, path, query, field, ident):
    """GET `path` from every upstream that is up; the `field` lists merged, each item once.

    Only the models the key may use are listed; an upstream that fails is left out (and marked
    down), and only if all fail is the answer a 502.
    """
    shown = cloud.shown(key)
    limiter, pool, admission = _admitted(key)
    merged, seen, answer = [], set(), None
    try:
        for member in pool.candidates():
            try:
                response = member.client.send("GET", path, query,
                                              upstream_headers())
            except GatewayError:
                member.failed()
                continue
            try:
                data = response.json() if response.ok else None
            except ValueError:
                data = None
            finally:
                response.close()
            if not isinstance(data, dict):
                continue
            member.answered()
            answer = data
            for item in data.get(field) or []:
                name = item.get(ident) if isinstance(item, dict) else None
                if name and name not in seen and shown(name, item):
                    seen.add(name)
                    merged.append(item)
    finally:
        limiter.release(admission)
    if answer is None:
        raise UpstreamUnavailable("no Ollama server answered; check that they are running",
                                  headers=admission.headers())
    return _json({**answer, field: merged}, 200, admission)


def to_all(key, path, body, query):
    """Model management on every upstream, one after another.

    A streamed answer (pull, push, create with `stream` left on) is every server's
    progress lines in turn, a line `{"error": …}` for one that fails; otherwise the
    answer is the first failure, or the last success.
    """
    limiter, pool, admission = _admitted(key)
    headers = upstream_headers()
    streamed = request.method == "POST" and path in ("/api/pull", "/api/push", "/api/create") \
        and (json.loads(body or b"{}").get("stream", True) is not False)
    if not streamed:
        try:
            last = None
            for member in pool.members:
                status, content, ctype = _whole_answer(member, path, query, headers, body)
                last = (status, content, ctype)
                if status >= 400:
                    break
            return Response(last[1], status=last[0], headers=admission.headers(),
                            content_type=last[2])
        finally:
            limiter.release(admission)

    method = request.method  # the generator runs after the request context is gone

    def progress():
        try:
            for member in pool.members:
                try:
                    response = member.client.send(method, path, query, headers, body)
                except GatewayError as exc:
                    member.failed()
                    yield (json.dumps({"error": f"upstream {member.name}: {exc.message}"})
                           + "\n").encode()
                    continue
                try:
                    yield from response.raw.stream(CHUNK_SIZE, decode_content=False)
                finally:
                    response.close()
        finally:
            limiter.release(admission)

    return Response(progress(), status=200, headers=admission.headers(),
                    content_type="application/x-ndjson")


def _whole_answer(member, path, query, headers, body, method=None):
    """(status, body, content type) of one upstream's answer, or a 502 saying which failed."""
    try:
        response = member.client.send(method or request.method, path, query, headers, body)
    except GatewayError as exc:
        member.failed()
        return exc.status, json.dumps({"error": f"upstream {member.name}: {exc.message}"}), \
            "application/json"
    try:
        return response.status_code, response.content, response.headers.get(
            "Content-Type", "application/json")
    finally:
        response.close()


def upload_to_all(key, path, query, upload, length):
    """A blob to every upstream at once, each fed the same chunks as they arrive.

    HEAD answers 200 only if every upstream has the blob. A POST succeeds only if every
    upstream took it; an upstream that stops reading for read_timeout is given up on.
    """
    limiter, pool, admission = _admitted(key)
    headers = upstream_headers()
    try:
        if request.method == "HEAD":
            statuses = [_whole_answer(m, path, query, headers, None)[0] for m in pool.members]
            status = 200 if all(s == 200 for s in statuses) else max(statuses)
            return Response(status=status, headers=admission.headers())
        results = _tee(pool.members, path, query, headers, upload, length,
                       current_app.config["SETTINGS"].read_timeout)
        failed = [r for r in results if r[0] >= 300]
        status, content, ctype = failed[0] if failed else results[-1]
        return Response(content, status=status, headers=admission.headers(), content_type=ctype)
    finally:
        limiter.release(admission)


_ABORT = object()  # fed to every copy when the client's upload breaks off


class _QueueBody:
    """A request body fed by another greenlet, chunk by chunk (None ends it)."""

    def __init__(self, chunks, length):
        self._chunks = chunks
        self._length = length

    def __iter__(self):
        while (chunk := self._chunks.get()) is not None:
            if chunk is _ABORT:
                raise ClientDisconnected()  # requests drops the connection: no partial blob
            yield chunk

    def __len__(self):
        return self._length


def _tee(members, path, query, headers, upload, length, stall_seconds):
    feeds = [queue.Queue(maxsize=8) for _ in members]
    results = [None] * len(members)

    def send(i, member):
        try:
            results[i] = _whole_answer(member, path, query, headers,
                                       _QueueBody(feeds[i], length), method="POST")
        finally:
            feeds[i] = None  # nothing reads this one any more

    senders = [threading.Thread(target=send, args=(i, m), daemon=True)
               for i, m in enumerate(members)]
    for sender in senders:
        sender.start()
    try:
        for chunk in itertools.chain(upload, [None]):  # as it arrives: never all in memory
            _feed(feeds, results, members, chunk, stall_seconds)
    except BaseException:
        _feed(feeds, results, members, _ABORT, stall_seconds)
        raise
    finally:
        for sender in senders:
            sender.join()
    return results


def _feed(feeds, results, members, chunk, stall_seconds):
    for i, feed in enumerate(feeds):
        if feed is None:
            continue
        try:
            feed.put(chunk, timeout=stall_seconds)
        except queue.Full:
            feeds[i] = None
            results[i] = (504, json.dumps({"error": f"upstream {members[i].name} stopped "
                                                    "taking the upload"}), "application/json")
