"""A fake Ollama server for integration tests (standard library only).

It listens on a real socket and speaks Ollama's wire format, modelled on Ollama
v0.6.8 (server/routes.go, api/types.go, docs/api.md) and, for its OpenAI-compatible
/v1 endpoints, on Ollama's openai package (tests/fake_ollama_v1.py): chunked
`application/x-ndjson` streams written one line per chunk, Go-style JSON, and the
same error texts and status codes.  So the gateway, and the official `ollama`
Python client, can be tested against real streaming, client disconnects and
upstream crashes.  Output is deterministic: N tokens read "word0 word1 ...".

    with FakeOllama(token_delay=0.01) as fake:
        requests.post(fake.url + "/api/generate", json={"model": "llama3.2", "prompt": "hi"})
        assert fake.requests[-1].json()["prompt"] == "hi"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import re
import select
import socket
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

if __name__ == "__main__":
    # `python -m tests.fake_ollama` runs this file as `__main__`, a second copy that the /v1
    # routes (which import `tests.fake_ollama`) would meet half-built: run the real module.
    from tests.fake_ollama import main

    sys.exit(main())

from tests.fake_ollama_v1 import AnthropicRoutes, MediaRoutes, OpenAIRoutes  # noqa: E402 (after the entry point)

VERSION = "0.6.8"
DEFAULT_MODELS = ["llama3.2:latest", "qwen2.5:0.5b", "nomic-embed-text:latest"]
EMBED_DIM = 16
JSON = "application/json; charset=utf-8"  # what gin's c.JSON sends
STEP = 0.02  # sleep granularity: bounds how late a client hang-up is noticed
CATALOG = {  # base name -> (family, parameter_size, quantization_level, size)
    "llama3.2": ("llama", "3.2B", "Q4_K_M", 2019393189),
    "qwen2.5": ("qwen2", "494.03M", "Q4_K_M", 397821319),
    "nomic-embed-text": ("nomic-bert", "137M", "F16", 274302450),
}
ROUTES = {  # (method, path) -> endpoint; POST/DELETE endpoints take a JSON body
    **{
        (m, p): n
        for m in ("GET", "HEAD")
        for p, n in [("/", "root"), ("/api/version", "version"), ("/api/tags", "tags")]
    },
    ("GET", "/api/ps"): "ps",
    ("GET", "/api/status"): "status",
    ("DELETE", "/api/delete"): "delete",
    **{
        ("POST", "/api/" + n): n
        for n in ["show", "generate", "chat", "embed", "embeddings", "copy"]
    },
    **{("POST", "/api/" + n): "progress" for n in ["pull", "push", "create"]},
    # Proxied to ollama.com with the server's account (server/routes.go).
    ("POST", "/api/experimental/web_search"): "web_search",
    ("POST", "/api/experimental/web_fetch"): "web_fetch",
}
# Where Ollama says a cloud model runs (api.ListModelResponse.RemoteHost).
REMOTE_HOST = "https://ollama.com:443"
CLOUD_READER = "ollama-gw (cloud models)"  # app/upstreams/pool.py's User-Agent for its reads
# Requests that occupy one of Ollama's parallel slots (OLLAMA_NUM_PARALLEL).
RUNS_MODEL = {"/api/generate", "/api/chat", "/api/embed", "/api/embeddings"}
# Unknown-model texts differ by endpoint: GetModel failures vs. handleScheduleError.
NOT_FOUND, NOT_PULLED = "model '{name}' not found", "model {q} not found, try pulling it first"


def fake_text(n: int) -> str:
    """The whole text of an answer of `n` tokens: "word0 word1 ... word{n-1}"."""
    return " ".join(f"word{i}" for i in range(n))


def _now(delta: float = 0.0) -> str:
    t = datetime.now(UTC) + timedelta(seconds=delta)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".") + "Z"


def _dumps(obj, sort_keys=False) -> bytes:
    """Encode like Go's json.Marshal: compact, raw UTF-8, HTML characters escaped (and a
    map's keys sorted, as Go sorts them: `sort_keys`)."""
    s = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys)
    for ch in "<>&\u2028\u2029":
        s = s.replace(ch, f"\\u{ord(ch):04x}")
    return s.encode()


def _q(s) -> str:
    """Go's %q, for the plain strings that end up in error texts."""
    return json.dumps(str(s), ensure_ascii=False)


def _words(*texts) -> int:
    """Deterministic stand-in for a prompt's token count (at least 1)."""
    return max(1, sum(len(t.split()) for t in texts if isinstance(t, str)))


def logprob(token: str, req: dict) -> dict:
    """api.Logprob for one answered token: with `top_logprobs` alternatives when asked."""
    entry = {"token": token, "logprob": -0.25, "bytes": list(token.encode())}
    top = req.get("top_logprobs")
    if isinstance(top, int) and top > 0:
        entry["top_logprobs"] = [
            {"token": token if k == 0 else f"alt{k}", "logprob": -0.25 * (k + 1),
             "bytes": list((token if k == 0 else f"alt{k}").encode())} for k in range(top)]
    return entry


def _full(name: str) -> str:
    """Ollama's name defaulting: no tag means ':latest'."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _digest(name: str) -> str:  # also the identity models are compared by (case-insensitive)
    return hashlib.sha256(_full(name).lower().encode()).hexdigest()


def _vector(model: str, text: str) -> list[float]:
    return [
        round(b / 127.5 - 1, 6)
        for b in hashlib.sha256(f"{model}\0{text}".encode()).digest()[:EMBED_DIM]
    ]


class Headers(dict):
    """Request headers under lower-cased names; lookups ignore case."""

    def __getitem__(self, key):
        return super().__getitem__(key.lower())

    def __contains__(self, key):
        return super().__contains__(key.lower())

    def get(self, key, default=None):
        return super().get(key.lower(), default)


@dataclasses.dataclass
class RecordedRequest:
    """One request as received.  Blob uploads are recorded with an empty body."""

    method: str
    path: str  # with the query string
    headers: Headers
    body: bytes

    def json(self):
        return json.loads(self.body)

    def __getitem__(self, key):  # lets tests treat it as a dict, too
        return getattr(self, key)


class _Crash(Exception):
    """Raised to drop the connection the way a crashing Ollama would."""


class _Handler(OpenAIRoutes, AnthropicRoutes, MediaRoutes, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # each NDJSON chunk leaves at once

    def setup(self):
        super().setup()
        self.fake: FakeOllama = self.server.fake
        self.fake._conns.add(self.connection)

    def finish(self):
        self.fake._conns.discard(self.connection)
        super().finish()

    def log_message(self, format, *args):
        pass

    def send_response(self, code, message=None):
        self.send_response_only(code, message)  # Go sends a Date header but no Server header
        self.send_header("Date", self.date_time_string())

    def _dispatch(self):
        path, self._started, self._streaming = self.path.split("?", 1)[0], False, False
        cancellations = self.fake.cancellations  # so a reset() mid-request doesn't inherit this one
        self._counted = self.command == "POST" and (path.startswith("/v1/") or path in RUNS_MODEL)
        self._path, self._slot_ns = path, None
        if self._counted:
            self._slot_ns = self.fake._take_slot()
        try:
            if path.startswith("/api/blobs/") and self.command in ("HEAD", "POST"):
                return self._blob(path[len("/api/blobs/") :])
            body = b"".join(self._body_pieces())
            self.fake._record(self, body)
            if path.startswith("/v1/"):
                return self._v1_dispatch(path, body)
            name = ROUTES.get((self.command, path))
            if name is None:  # gin's NoRoute answer, for wrong methods too
                self._send(404, b"404 page not found", "text/plain")
            elif self.command in ("GET", "HEAD"):
                getattr(self, "_api_" + name)()
            elif (req := self._parse(body)) is not None:
                getattr(self, "_api_" + name)(req)
        except (OSError, _Crash) as e:  # an OSError here means the client went away
            self.close_connection = True
            if isinstance(e, OSError) and not self.fake._stopping:
                cancellations.append(time.monotonic())
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        finally:
            if self._streaming:
                with self.fake._lock:
                    self.fake.active_streams -= 1
            self._done_running()

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def _body_pieces(self):
        """Yield the request body in pieces, sized or chunked."""
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0 and (piece := self.rfile.read(min(left, 65536))):
                left -= len(piece)
                yield piece
            return
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            yield self.rfile.read(size)
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers

    def _parse(self, body: bytes):
        """A JSON object, or None after answering 400 as gin's ShouldBindJSON would."""
        text = body.decode("utf-8", "replace").strip()
        if not text:
            return self._error(400, "missing request body")
        try:
            req = json.loads(text)
        except json.JSONDecodeError as e:  # Go's wording, approximately
            return self._error(
                400,
                "unexpected EOF"
                if e.pos >= len(text)
                else f"invalid character '{text[e.pos]}' looking for beginning of value",
            )
        if req is None or isinstance(req, dict):
            return req or {}  # Go decodes null into an empty struct
        kind = {list: "array", str: "string", bool: "bool"}.get(type(req), "number")
        endpoint = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
        go_type = endpoint.capitalize().replace("Embeddings", "Embedding") + "Request"
        return self._error(
            400, f"json: cannot unmarshal {kind} into Go value of type api.{go_type}"
        )

    def _done_running(self):
        """No longer count this request as running: called as its last bytes go out.

        The gateway can free the request's slot and send the next request once it has
        those bytes, which may be before this thread runs again on a busy machine; counted
        any later, two requests the cap kept apart could be counted at once.
        """
        if self._counted:
            self._counted = False
            self.fake._give_slot(self._path, self._slot_ns)

    def _send(self, status: int, body: bytes = b"", ctype: str | None = None):
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self._done_running()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, ctype: str = JSON):
        self._send(status, _dumps(obj), ctype)

    def _error(self, status: int, msg: str):
        self._json({"error": msg}, status)

    def _begin(self, stream: bool):
        """Start answering: count a stream in `active_streams`, then wait out the model load."""
        if stream:
            with self.fake._lock:
                self.fake.active_streams += 1
            self._streaming = True
        self._sleep(self.fake.first_byte_delay)

    def _line(self, obj):
        """Write one NDJSON line as its own chunk; the first one sends the headers."""
        if not self._started:
            self._started = True
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
        data = _dumps(obj) + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _sleep(self, seconds: float):
        """Sleep in small steps, giving up as soon as the client hangs up
        (Go cancels the request context when it reads EOF on the connection)."""
        end = time.monotonic() + seconds
        while not self.fake._stopping:
            if select.select([self.connection], [], [], 0)[0] and not self.connection.recv(
                1, socket.MSG_PEEK
            ):
                break  # readable and empty: the peer closed
            if (left := end - time.monotonic()) <= 0:
                return
            time.sleep(min(STEP, left))
        raise ConnectionAbortedError("client went away")

    def _tick(self, i: int):
        """Before line i of a stream: the token delay, then the simulated crash if due."""
        self._sleep(self.fake.token_delay)
        if self.fake.fail_after_tokens is not None and i >= self.fake.fail_after_tokens:
            raise _Crash

    def _model(self, req, missing: str, unknown: str) -> str | None:
        """The requested model's name, or None after the endpoint's 400/404 answer."""
        name = req.get("model") or req.get("name") or ""
        if not name and missing:
            return self._error(400, missing)
        if not self.fake._has(name):
            return self._error(404, unknown.format(name=name, q=_q(name)))
        return name

    def _api_root(self):
        self._send(200, b"Ollama is running", "text/plain; charset=utf-8")

    def _api_version(self):
        self._json({"version": VERSION})

    def _api_status(self):  # server/routes.go StatusHandler: whether cloud models are off
        self._json({"cloud": {"disabled": False, "source": "none"}})

    def _api_tags(self):
        self._json({"models": [self.fake._describe(m) for m in self.fake.models]})

    def _api_ps(self):
        models = []
        for name, expires in list(self.fake._loaded.items()):
            info = {k: v for k, v in self.fake._describe(name).items() if k != "modified_at"}
            models.append(
                {**info, "expires_at": _now(expires - time.time()), "size_vram": info["size"]}
            )
        self._json({"models": models})

    def _api_web_search(self, req):
        """api.WebSearchResponse: what ollama.com found (results, each title, url, content)."""
        if not isinstance(req.get("query"), str) or not req["query"]:
            return self._error(400, "query is required")
        count = req.get("max_results") if isinstance(req.get("max_results"), int) else 5
        self._json({"results": [{"title": f"Result {i} for {req['query']}",
                                 "url": f"https://example.com/{i}", "content": fake_text(8)}
                                for i in range(max(1, min(count, 10)))]})

    def _api_web_fetch(self, req):
        """api.WebFetchResponse: a page's title, content and links."""
        if not isinstance(req.get("url"), str) or not req["url"]:
            return self._error(400, "url is required")
        self._json({"title": "Example page", "content": fake_text(12),
                    "links": ["https://example.com/a"]})

    def _api_show(self, req):
        if name := self._model(req, "model is required", NOT_FOUND):
            info = self.fake._describe(name)
            family = info["details"]["family"]
            remote = {k: info[k] for k in ("remote_model", "remote_host") if k in info}
            self._json(
                {
                    **remote,
                    "modelfile": f'# Modelfile generated by "ollama show"\nFROM {name}\n',
                    "parameters": 'stop                           "<|eot_id|>"',
                    "template": "{{ .System }}\n{{ .Prompt }}",
                    "details": info["details"],
                    "model_info": {
                        "general.architecture": family,
                        f"{family}.context_length": 8192,
                    },
                    "capabilities": ["embedding"]
                    if self.fake._is_embedding(name)
                    else ["completion"],
                    "modified_at": info["modified_at"],
                }
            )

    def _api_generate(self, req):
        if model := self._model(req, "", NOT_FOUND):
            self._complete(
                req,
                model,
                False,
                not req.get("prompt"),
                _words(req.get("system"), req.get("prompt")),
            )

    def _api_chat(self, req):
        if model := self._model(req, "model is required", NOT_PULLED):
            msgs = [m for m in req.get("messages") or [] if isinstance(m, dict)]
            self._complete(req, model, True, not msgs, _words(*(m.get("content") for m in msgs)))

    def _complete(self, req, model: str, chat: bool, empty: bool, prompt_count: int):
        """Generate and chat: capability check, load, tokens, final object with metrics."""
        if self.fake._is_embedding(model):
            return self._error(
                400, f"{_q(model)} does not support {'chat' if chat else 'generate'}"
            )

        def frame(text, **extra):
            body = (
                {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
            )
            return {"model": model, "created_at": _now(), **body, **extra}

        if empty and req.get("keep_alive") in (0, "0", "0s", "0m"):  # Ollama's "unload model" call
            self.fake._loaded.pop(_full(model), None)
            return self._json(frame("", done=True, done_reason="unload"))
        stream, t0 = req.get("stream") is not False, self._slot_ns or time.monotonic_ns()
        loading = self.fake._loaded.get(_full(model), 0) <= time.time()
        if loading:  # Ollama's load_duration: from taking the slot to the model being ready
            self._sleep(self.fake.load_delay)
        t_loaded = time.monotonic_ns()
        self._begin(stream and not empty)
        self.fake._loaded[_full(model)] = time.time() + 300
        if empty:  # Ollama's "load model" call
            return self._json(frame("", done=True, done_reason="load"))
        num_predict = (req.get("options") or {}).get("num_predict")
        limited = isinstance(num_predict, int) and num_predict > 0  # <= 0 means no limit
        n, t_prompt = num_predict if limited else self.fake.tokens, time.monotonic_ns()
        wants_logprobs = req.get("logprobs") is True
        for i in range(n):
            self._tick(i)
            if stream:
                token = f"word{i}" if i == 0 else f" word{i}"
                extra = {"logprobs": [logprob(token, req)]} if wants_logprobs else {}
                self._line(frame(token, done=False, **extra))
        if self.fake.fail_after_tokens is not None and n >= self.fake.fail_after_tokens:
            raise _Crash
        # As Ollama measures them: total from the slot taken to now, load inside it (1 ns
        # when the model was loaded already), the first byte's wait as the prompt's.
        load = (t_loaded - t0 if loading else 0) + 1
        evals, prompt_eval = time.monotonic_ns() - t_prompt + 1, t_prompt - t_loaded + 1
        reason = (
            "length" if limited else "stop"
        )  # the runner says "length" when num_predict cuts it off
        final = frame("" if stream else fake_text(n))
        if chat:  # Go's field order: chat has done_reason before done, generate after
            final.update(done_reason=reason, done=True)
        else:
            final.update(
                done=True, done_reason=reason, context=list(range(1, prompt_count + n + 1))
            )
        final.update(
            total_duration=time.monotonic_ns() - t0 + 1,
            load_duration=load,
            prompt_eval_count=prompt_count,
            prompt_eval_duration=prompt_eval,
            eval_count=n,
            eval_duration=evals,
        )
        if wants_logprobs and not stream:  # streamed, each token's came with it
            final["logprobs"] = [logprob(f"word{i}" if i == 0 else f" word{i}", req)
                                 for i in range(n)]
        if stream:
            self._line(final)
            self._done_running()
            if self.fake.end_delay:  # the last line is out, the stream not over yet
                self._sleep(self.fake.end_delay)
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._json(final)

    def _api_embed(self, req):
        raw = req.get("input")
        inputs = [] if raw in (None, "") else [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
            return self._error(400, "invalid input type")
        if model := self._model(req, "model is required", NOT_PULLED):
            t0 = self._slot_ns or time.monotonic_ns()
            self._begin(False)
            self.fake._loaded[_full(model)] = time.time() + 300
            if not inputs:
                return self._json({"model": model, "embeddings": []})
            vectors = [_vector(model, text) for text in inputs]
            vectors = [
                [x / (sum(y * y for y in v) ** 0.5 or 1) for x in v] for v in vectors
            ]  # embed normalizes
            total = time.monotonic_ns() - t0 + 1
            self._json(
                {
                    "model": model,
                    "embeddings": vectors,
                    "total_duration": total,
                    "load_duration": total,
                    "prompt_eval_count": _words(*inputs),
                }
            )

    def _api_embeddings(self, req):
        if model := self._model(req, "model is required", NOT_PULLED):
            self._begin(False)
            prompt = req.get("prompt") or ""
            self._json({"embedding": _vector(model, prompt) if prompt else []})

    def _api_progress(self, req):
        """Pull, push, create: status lines, or only the last one when stream is false."""
        kind = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
        if not (name := req.get("model") or req.get("name")):
            return self._error(400, "model is required" if kind == "push" else "invalid model name")
        digest, size = "sha256:" + _digest(name), self.fake._describe(name)["size"]
        short, layer = digest[7:19], {"digest": digest, "total": size}
        statuses = {
            "pull": [
                {"status": "pulling manifest"},
                {"status": f"pulling {short}", **layer, "completed": size // 2},
                {"status": f"pulling {short}", **layer, "completed": size},
                {"status": "verifying sha256 digest"},
                {"status": "writing manifest"},
            ],
            "push": [
                {"status": "retrieving manifest"},
                {"status": f"pushing {short}", **layer, "completed": size},
                {"status": "pushing manifest"},
            ],
            "create": [
                {"status": f"using existing layer {digest}"},
                {"status": "writing manifest"},
            ],
        }[kind] + [{"status": "success"}]
        stream = req.get("stream") is not False
        self._begin(stream)
        for i, status in enumerate(statuses):
            self._tick(i)
            if i == len(statuses) - 1 and kind != "push":
                self.fake._add(name)  # before "success" reaches the client
            if stream:
                self._line(status)
        if stream:
            self._done_running()
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._json(statuses[-1], ctype="application/json")  # waitForStream's header

    def _api_copy(self, req):
        src, dst = req.get("source") or "", req.get("destination") or ""
        if not src or not dst:
            return self._error(
                400,
                f"source {_q(src)} is invalid" if not src else f"destination {_q(dst)} is invalid",
            )
        if not self.fake._has(src):
            return self._error(404, f"model {_q(src)} not found")
        self.fake._add(dst)
        self._send(200)

    def _api_delete(self, req):
        name = req.get("model") or req.get("name") or ""
        if self._model(req, f"name {_q(name)} is invalid", NOT_FOUND):
            self.fake.models[:] = [m for m in self.fake.models if _digest(m) != _digest(name)]
            self._send(200)

    def _blob(self, digest: str):
        """HEAD/POST /api/blobs/<digest>.  Only digests and sizes are kept, never data."""
        self.fake._record(self, b"")
        h, size = hashlib.sha256(), 0
        for piece in self._body_pieces():
            h.update(piece)
            size += len(piece)
        got = "sha256:" + h.hexdigest()
        if not re.fullmatch(r"sha256[:-][0-9a-fA-F]{64}", digest):
            self._error(400, "invalid digest format")
        elif digest in self.fake.blobs:
            self._send(200)
        elif self.command == "HEAD":
            self._error(404, f"blob {_q(digest)} not found")
        elif got != digest:  # compared literally, so a "sha256-..." path never matches
            self._error(400, f"digest mismatch, expected {_q(digest)}, got {_q(got)}")
        else:
            self.fake.blobs[digest] = size
            self._send(201)


class _Server(ThreadingHTTPServer):
    # Go's net/http listens with the system's somaxconn; socketserver's default of 5
    # resets connections when a gateway opens a few dozen at once.
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        """A client that hangs up on an idle connection is not an error worth a traceback."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class FakeOllama:
    """A fake Ollama server on a real socket; see the module docstring.

    `fail_after_tokens` also cuts pull/push/create progress streams after that
    many status lines; `cancellations` records every request whose client hung
    up before its answer was complete, streamed or not."""

    def __init__(
        self, host="127.0.0.1", port=0, models=None, token_delay=0.0, first_byte_delay=0.0, tokens=5
    ):
        self.host, self.port = host, port
        self._defaults = {
            "models": list(DEFAULT_MODELS if models is None else models),
            "tokens": tokens,
            "token_delay": token_delay,
            "first_byte_delay": first_byte_delay,
        }
        self._server: ThreadingHTTPServer | None = None
        self._conns: set[socket.socket] = set()
        self._lock, self._stopping, self._modified = threading.Lock(), False, _now()
        self._slot_free = threading.Condition(self._lock)
        self.active_streams = 0
        self.reset()

    def reset(self) -> None:
        """Forget requests, cancellations, blobs and loaded models; restore the knobs and models."""
        for key, value in self._defaults.items():
            setattr(self, key, list(value) if key == "models" else value)
        self.fail_after_tokens: int | None = None
        self.end_delay = 0.0  # seconds between a generate/chat stream's last line and its end
        self.tool_call: dict | None = None  # {"name", "input"}: /v1/messages with tools calls it
        self.anthropic_ping = False  # a `ping` after /v1/messages' message_start
        self.requests: list[RecordedRequest] = []
        # The gateway's own reads of its cloud models (app/upstreams/pool.py, User-Agent
        # CLOUD_READER), kept apart: `requests` is what clients' requests became.
        self.probes: list[RecordedRequest] = []
        self.cancellations: list[float] = []
        self.blobs: dict[str, int] = {}  # digest -> size
        # Models made from a cloud model under a name of their own: name -> the cloud
        # model it runs (listed with remote_host, like `:cloud` and `-cloud` ones).
        self.remote: dict[str, str] = {}
        self.running = self.most_running = 0  # model requests being served now, and the peak
        # Like OLLAMA_NUM_PARALLEL: model requests served at once (0: any number); more wait
        # for a slot. Each request's slot is logged in `occupancy` as it is given back:
        # (path, acquired, released), time.monotonic() seconds; a test's ground truth for
        # GPU time. load_delay: seconds a model that is not loaded takes to load.
        self.num_parallel = 0
        self.load_delay = 0.0
        self.occupancy: list[tuple[str, float, float]] = []
        self._loaded: dict[str, float] = {}  # model -> expiry as time.time(), for /api/ps

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        if self._server is None:
            self._stopping = False
            self._server = _Server((self.host, self.port), _Handler)
            self._server.daemon_threads, self._server.fake = True, self
            self.port = self._server.server_address[1]
            threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"fake-ollama:{self.port}",
                daemon=True,
            ).start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open connections, idle keep-alive ones included."""
        if self._server is not None:
            self._stopping = True
            self._server.shutdown()
            self._server.server_close()
            for conn in list(self._conns):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _take_slot(self) -> int:
        """Wait for one of num_parallel slots (if capped), count it running; monotonic ns."""
        with self._slot_free:
            while self.num_parallel and self.running >= self.num_parallel:
                self._slot_free.wait(0.05)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            return time.monotonic_ns()

    def _give_slot(self, path: str, taken_ns: int) -> None:
        released = time.monotonic_ns()
        with self._slot_free:
            self.running -= 1
            self.occupancy.append((path, taken_ns / 1e9, released / 1e9))
            self._slot_free.notify()

    def slot_seconds(self, path_prefix: str = "") -> float:
        """Seconds slots were held by requests whose path starts with `path_prefix`."""
        with self._lock:
            return sum(end - start for path, start, end in self.occupancy
                       if path.startswith(path_prefix))

    def wait_for_cancellation(self, timeout: float) -> bool:
        """True as soon as at least one cancellation is recorded, False after `timeout`."""
        deadline = time.monotonic() + timeout
        while not self.cancellations and time.monotonic() < deadline:
            time.sleep(0.01)
        return bool(self.cancellations)

    def _record(self, handler: _Handler, body: bytes) -> None:
        headers = Headers()
        for k, v in handler.headers.items():
            headers[k.lower()] = f"{headers[k]}, {v}" if k in headers else v
        recorded = RecordedRequest(handler.command, handler.path, headers, body)
        if headers.get("user-agent") == CLOUD_READER:
            self.probes.append(recorded)
        else:
            self.requests.append(recorded)

    def _has(self, name) -> bool:
        return (
            isinstance(name, str)
            and bool(name)
            and _digest(name) in {_digest(m) for m in self.models}
        )

    def _add(self, name: str) -> None:
        if not self._has(name):
            self.models.append(_full(name))

    def _is_embedding(self, name: str) -> bool:
        return "embed" in name.lower() or self._describe(name)["details"]["family"].endswith("bert")

    def _remote_model(self, full: str) -> str | None:
        """The cloud model `full` runs (its tag `cloud` or `…-cloud`, or self.remote), or None."""
        base, _, tag = full.rpartition(":")
        if tag.lower() == "cloud":
            return base
        if tag.lower().endswith("-cloud"):
            return f"{base}:{tag[:-len('-cloud')]}"
        return next((v for k, v in self.remote.items() if _full(k) == full), None)

    def _describe(self, name: str) -> dict:
        """The /api/tags entry for `name`, with plausible details."""
        full = _full(name)
        family, params, quant, size = CATALOG.get(
            full.split(":")[0].lower(), ("llama", "7B", "Q4_0", 3826793677)
        )
        remote = self._remote_model(full)
        return {
            "name": full,
            "model": full,
            # Ollama lists a cloud model as a small stub that runs on ollama.com.
            **({"remote_model": remote, "remote_host": REMOTE_HOST} if remote else {}),
            "modified_at": self._modified,
            "size": size,
            "digest": _digest(full),
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": family,
                "families": [family],
                "parameter_size": params,
                "quantization_level": quant,
            },
        }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description="Run the fake Ollama server in the foreground (Ctrl-C stops it)."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11434)
    p.add_argument("--token-delay", type=float, default=0.0)
    p.add_argument("--first-byte-delay", type=float, default=0.0)
    p.add_argument("--tokens", type=int, default=5)
    a = p.parse_args(argv)
    with FakeOllama(
        a.host,
        a.port,
        token_delay=a.token_delay,
        first_byte_delay=a.first_byte_delay,
        tokens=a.tokens,
    ) as fake:
        print(f"fake Ollama {VERSION} listening on {fake.url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
