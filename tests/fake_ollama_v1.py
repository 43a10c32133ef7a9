"""Ollama's OpenAI-compatible API (/v1) for the fake Ollama.

Modelled on Ollama's openai/openai.go and middleware/openai.go: the same objects in
Go's field order, `text/event-stream` answers one event per HTTP chunk, the usage
chunk (`"choices": []`) only with `stream_options.include_usage`, `data: [DONE]` at
the end of chat and completion streams, and errors as
`{"error": {"message", "type", "param", "code"}}`. `stream` defaults to false here, as
in the OpenAI API. The fake's knobs (tokens, delays, crashes) apply as on /api.
Anthropic's Messages API (/v1/messages) follows anthropic/anthropic.go and
middleware/anthropic.go: `event:` + `data:` SSE events, and the usage counted only in
the final `message_delta` (message_start's is Ollama's estimate: here deliberately off).
"""
import email.parser
import email.policy
import json
import random
import time
import urllib.parse

from tests import fake_ollama as base  # partly initialised when this is imported: used late

V1_JSON = "application/json"  # the middleware sets it without a charset
SSE = "text/event-stream"
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error"}
PICTURE = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAA"
           "AABJRU5ErkJggg==")  # a 1x1 PNG


def _usage(prompt, completion):
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class OpenAIRoutes:
    """Mixed into the fake's request handler: answers paths under /v1."""

    def _v1_dispatch(self, path, body):
        if self.command == "GET" and path == "/v1/models":
            return self._v1_models()
        if self.command == "GET" and path.startswith("/v1/models/"):
            return self._v1_model(path[len("/v1/models/"):])
        handler = {"/v1/chat/completions": self._v1_chat, "/v1/completions": self._v1_complete,
                   "/v1/embeddings": self._v1_embed, "/v1/responses": self._v1_responses,
                   "/v1/messages": self._v1_messages, "/v1/images/generations": self._v1_image,
                   "/v1/images/edits": self._v1_image}
        if self.command == "POST" and path == "/v1/audio/transcriptions":
            return self._v1_transcribe(body)
        if self.command != "POST" or path not in handler:
            return self._send(404, b"404 page not found", "text/plain")
        try:
            req = json.loads(body or b"null")
        except ValueError as exc:
            return self._v1_error(400, str(exc))
        if not isinstance(req, dict):
            return self._v1_error(400, "json: cannot unmarshal into Go value of type request")
        handler[path](req)

    # -- plumbing

    def _v1_json(self, obj, status=200):
        self._send(status, base._dumps(obj) + b"\n", V1_JSON)  # Go's json.Encoder adds a newline

    def _v1_error(self, status, message):
        self._v1_json({"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error"),
                                 "param": None, "code": None}}, status)

    def _event(self, payload: bytes):
        """One SSE event as its own HTTP chunk; the first one sends the headers."""
        if not self._started:
            self._started = True
            self.send_response(200)
            self.send_header("Content-Type", SSE)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))

    def _data(self, obj):
        self._event(b"data: " + base._dumps(obj) + b"\n\n")

    def _end_stream(self):
        self._done_running()  # before the last bytes: see _done_running
        self.wfile.write(b"0\r\n\r\n")

    def _v1_model_or_error(self, req, unknown):
        name = req.get("model") or ""
        if not self.fake._has(name):
            self._v1_error(404, unknown.format(name=name, q=base._q(name)))
            return None
        return name

    def _generate(self, stream, req, count_from=0):
        """Yield (number, token text) for the answer's tokens, honouring the fake's knobs."""
        self._begin(stream)
        max_tokens = req.get("max_tokens") or req.get("max_output_tokens")
        n = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else self.fake.tokens
        for i in range(n):
            self._tick(i)
            yield i + count_from, f"word{i}" if i == 0 else f" word{i}"
        if self.fake.fail_after_tokens is not None and n >= self.fake.fail_after_tokens:
            raise base._Crash
        self._reason = "length" if isinstance(max_tokens, int) and max_tokens > 0 else "stop"

    # -- endpoints

    def _v1_chat(self, req):
        messages = req.get("messages")
        if not messages:
            return self._v1_error(400, "[] is too short - 'messages'")
        if not (model := self._v1_model_or_error(req, base.NOT_PULLED)):
            return
        prompt = base._words(*(m.get("content") for m in messages if isinstance(m, dict)))
        head = {"id": f"chatcmpl-{random.randrange(999)}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model, "system_fingerprint": "fp_ollama"}
        wants_logprobs = req.get("logprobs") is True

        def logprobs(tokens):  # openai.ChoiceLogprobs, only when asked
            return {"logprobs": {"content": [base.logprob(t, req) for t in tokens]}} \
                if wants_logprobs else {}

        if not req.get("stream"):
            tokens = [token for _, token in self._generate(False, req)]
            text = "".join(tokens)
            return self._v1_json({**head, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text},
                 "finish_reason": self._reason, **logprobs(tokens)}],
                "usage": _usage(prompt, len(text.split()))})
        n = 0
        for n, token in self._generate(True, req, count_from=1):  # noqa: B007 (n: the count)
            self._data({**head, "choices": [{"index": 0, "delta": {
                "role": "assistant", "content": token}, "finish_reason": None,
                **logprobs([token])}]})
        final = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": self._reason}]}
        self._data(final)
        if (req.get("stream_options") or {}).get("include_usage"):
            self._data({**final, "choices": [], "usage": _usage(prompt, n)})
        self._event(b"data: [DONE]\n\n")
        self._end_stream()

    def _v1_complete(self, req):
        if not (model := self._v1_model_or_error(req, base.NOT_FOUND)):
            return
        prompt = base._words(req.get("prompt"))
        usage_wanted = bool((req.get("stream_options") or {}).get("include_usage"))

        def chunk(text, reason, usage=None):
            obj = {"id": head_id, "object": "text_completion", "created": created,
                   "choices": [{"text": text, "index": 0, "finish_reason": reason}],
                   "model": model, "system_fingerprint": "fp_ollama"}
            if usage_wanted:  # Ollama puts a zeroed usage in every chunk then
                obj["usage"] = usage or _usage(0, 0)
            return obj

        head_id, created = f"cmpl-{random.randrange(999)}", int(time.time())
        if not req.get("stream"):
            text = "".join(token for _, token in self._generate(False, req))
            return self._v1_json({"id": head_id, "object": "text_completion",
                                  "created": created, "model": model,
                                  "system_fingerprint": "fp_ollama",
                                  "choices": [{"text": text, "index": 0,
                                               "finish_reason": self._reason}],
                                  "usage": _usage(prompt, len(text.split()))})
        n = 0
        for n, token in self._generate(True, req, count_from=1):  # noqa: B007 (n: the count)
            self._data(chunk(token, None))
        self._data(chunk("", self._reason))
        if usage_wanted:
            final = chunk("", self._reason, _usage(prompt, n))
            self._data({**final, "choices": []})
        self._event(b"data: [DONE]\n\n")
        self._end_stream()

    def _v1_embed(self, req):
        raw = req.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not inputs or not all(isinstance(x, str) for x in inputs):
            return self._v1_error(400, "invalid input")
        if not (model := self._v1_model_or_error(req, base.NOT_PULLED)):
            return
        self._begin(False)
        count = base._words(*inputs)
        self._v1_json({"object": "list", "data": [
            {"object": "embedding", "embedding": base._vector(model, text), "index": i}
            for i, text in enumerate(inputs)], "model": model,
            "usage": {"prompt_tokens": count, "total_tokens": count}})

    def _v1_models(self):
        self._v1_json({"object": "list", "data": [self._model_object(m)
                                                   for m in self.fake.models]})

    def _v1_model(self, name):
        if not self.fake._has(name):
            return self._v1_error(404, f"model '{name}' not found")
        self._v1_json(self._model_object(name))

    def _model_object(self, name):
        parts = name.split("/")
        owner = parts[-2] if len(parts) > 1 else "library"
        return {"id": name, "object": "model", "created": 1735689600, "owned_by": owner}

    def _v1_responses(self, req):
        if not (model := self._v1_model_or_error(req, base.NOT_PULLED)):
            return
        given = req.get("input")
        texts = [given] if isinstance(given, str) else [
            item.get("content") for item in given or [] if isinstance(item, dict)]
        prompt = base._words(*texts)
        response_id, item_id = f"resp_{random.randrange(999999)}", f"msg_{random.randrange(999999)}"
        asked = req.get("reasoning") if isinstance(req.get("reasoning"), dict) else {}
        # Echoed when the request set either (responses.go); the stream writes both keys.
        reasoning = {"effort": asked.get("effort"), "summary": asked.get("summary")} \
            if asked.get("effort") or asked.get("summary") else None

        def response(status, output, usage=None):
            return {"id": response_id, "object": "response", "created_at": int(time.time()),
                    "completed_at": int(time.time()) if status == "completed" else None,
                    "status": status, "incomplete_details": None, "model": model,
                    "previous_response_id": None, "instructions": req.get("instructions"),
                    "output": output, "error": None, "tools": req.get("tools") or [],
                    "tool_choice": "auto",
                    "truncation": "disabled", "parallel_tool_calls": True,
                    "text": {"format": {"type": "text"}}, "top_p": 1.0,
                    "presence_penalty": 0, "frequency_penalty": 0, "top_logprobs": 0,
                    "temperature": 1.0, "reasoning": reasoning, "usage": usage,
                    "max_output_tokens": req.get("max_output_tokens"), "max_tool_calls": None,
                    "store": False, "background": bool(req.get("background")),
                    "service_tier": "default", "metadata": {}, "safety_identifier": None,
                    "prompt_cache_key": None}

        def message(text, status):
            return {"id": item_id, "type": "message", "status": status, "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": [],
                                 "logprobs": []}]}

        def usage(n):
            return {"input_tokens": prompt, "output_tokens": n, "total_tokens": prompt + n,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens_details": {"reasoning_tokens": 0}}

        if not req.get("stream"):
            text = "".join(token for _, token in self._generate(False, req))
            return self._v1_json(response("completed", [message(text, "completed")],
                                          usage(len(text.split()))))
        sequence = iter(range(10**6))

        def event(kind, **data):  # Go maps (map[string]any): marshalled with sorted keys
            self._event(b"event: %s\ndata: %s\n\n" % (kind.encode(), base._dumps(
                {"type": kind, "sequence_number": next(sequence), **data}, sort_keys=True)))

        event("response.created", response=response("in_progress", []))
        event("response.in_progress", response=response("in_progress", []))
        text, n = "", 0
        for n, token in self._generate(True, req, count_from=1):  # noqa: B007 (n: the count)
            if not text:
                event("response.output_item.added", output_index=0,
                      item={**message("", "in_progress"), "content": []})
                event("response.content_part.added", item_id=item_id, output_index=0,
                      content_index=0, part={"type": "output_text", "text": "",
                                             "annotations": [], "logprobs": []})
            text += token
            event("response.output_text.delta", item_id=item_id, output_index=0,
                  content_index=0, delta=token, logprobs=[])
        event("response.output_text.done", item_id=item_id, output_index=0, content_index=0,
              text=text, logprobs=[])
        event("response.content_part.done", item_id=item_id, output_index=0, content_index=0,
              part=message(text, "completed")["content"][0])
        event("response.output_item.done", output_index=0, item=message(text, "completed"))
        event("response.completed", response=response("completed", [message(text, "completed")],
                                                       usage(n)))
        self._end_stream()


class MediaRoutes:
    """Mixed into the fake's request handler: images (Ollama 0.14.3 to 0.32.5: JSON in, the
    picture as base64 out; edits take a base64 `image`) and transcriptions (0.20.0 on: a
    multipart form in, `{"text"}` or plain text out). Neither answer carries usage."""

    def _v1_image(self, req):
        if not req.get("prompt"):
            return self._v1_error(400, "prompt is required")
        if not req.get("model"):
            return self._v1_error(400, "model is required")
        if self.path.startswith("/v1/images/edits") and not req.get("image"):
            return self._v1_error(400, "image is required")
        if not (self._v1_model_or_error(req, base.NOT_FOUND)):
            return
        list(self._generate(False, req))  # the fake's delays and crashes apply
        self._v1_json({"created": int(time.time()), "data": [{"b64_json": PICTURE}]})

    def _v1_transcribe(self, body):
        """Go's ParseMultipartForm, then FormValue("model") (the form's first, else the
        query's) and FormFile("file"); the fake's tokens are the transcript's words."""
        form = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + self.headers.get("Content-Type", "").encode() + b"\r\n\r\n"
            + body)
        if not form.is_multipart():
            return self._v1_error(400, "failed to parse multipart form: request Content-Type "
                                       "isn't multipart/form-data")
        values, files = {}, {}
        for part in form.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if part.get_filename():
                files.setdefault(name, part.get_payload(decode=True))
            else:
                values.setdefault(name, part.get_payload(decode=True).decode())
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        model = values.get("model") or (query.get("model") or [""])[0]
        if not model:
            return self._v1_error(400, "model is required")
        if "file" not in files:
            return self._v1_error(400, "file is required: http: no such file")
        if not files["file"]:
            return self._v1_error(400, "audio file is empty")
        if not self._v1_model_or_error({"model": model}, base.NOT_FOUND):
            return
        text = "".join(token for _, token in self._generate(False, {}))
        if values.get("response_format") == "text":
            return self._send(200, text.encode(), "text/plain")
        self._v1_json({"text": text})


def _anthropic_texts(value):
    """The texts of a `system` or a message's `content`: a string or a list of blocks."""
    if isinstance(value, str):
        return [value]
    return [b.get("text") for b in value or [] if isinstance(b, dict)]


# Ollama's anthropic.NewError: the error type by status, anything else an api_error.
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                   403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
                   503: "overloaded_error", 529: "overloaded_error"}
THINKING_TOKENS = 3  # a thinking answer starts with this many thinking tokens (of its count)


def anthropic_error(status, message):
    return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"),
                                       "message": message},
            "request_id": f"req_{random.randrange(16**24):024x}"}


def _thinks(req):
    """Whether Ollama runs the model with `think` on (anthropic.FromMessagesRequest)."""
    thinking = req.get("thinking") if isinstance(req.get("thinking"), dict) else {}
    if thinking.get("type") in ("enabled", "disabled"):
        return thinking["type"] == "enabled"
    return bool((req.get("output_config") or {}).get("effort"))


class AnthropicRoutes:
    """Mixed into the fake's request handler: POST /v1/messages.

    As Ollama's middleware/anthropic.go: its own checks answer as gin's
    AbortWithStatusJSON (no newline, a charset); an error from the chat handler
    behind it (an unknown model) is rewritten by json.Encoder (a newline, no charset).
    A stream opens with message_start (input_tokens: an estimate, here deliberately
    ESTIMATE_OFF_BY too many; output_tokens 0), then a thinking block when thinking is
    on, a text block, a tool_use block when the fake's `tool_call` is set and the request
    has tools, and ends with message_delta (the real counts) and message_stop. Ollama
    defines but never sends `ping`: the fake sends one after message_start only when its
    `anthropic_ping` knob is on.
    """

    def _anthropic_abort(self, status, message):
        self._send(status, base._dumps(anthropic_error(status, message)), base.JSON)

    def _v1_messages(self, req):
        if not isinstance(req.get("model"), str) or not req["model"]:
            return self._anthropic_abort(400, "model is required")
        max_tokens = req.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            return self._anthropic_abort(400, "max_tokens is required and must be positive")
        if not req.get("messages"):
            return self._anthropic_abort(400, "messages is required")
        model = req["model"]
        if not self.fake._has(model):
            return self._v1_json(anthropic_error(404, base.NOT_PULLED.format(
                name=model, q=base._q(model))), 404)
        texts = _anthropic_texts(req.get("system"))
        for message in req.get("messages") or []:
            texts += _anthropic_texts(message.get("content") if isinstance(message, dict)
                                      else None)
        prompt = base._words(*texts)
        head = {"id": f"msg_{random.randrange(16**24):024x}", "type": "message",
                "role": "assistant", "model": model}
        thinks = _thinks(req)
        tool = self.fake.tool_call if req.get("tools") else None

        def usage(output):
            return {"input_tokens": prompt, "output_tokens": output}

        def stop_reason():
            if tool is not None:
                return "tool_use"
            return {"length": "max_tokens", "stop": "end_turn"}[self._reason]

        def blocks(tokens):
            """(kind, text) runs of the answer: thinking first, then text."""
            split = min(THINKING_TOKENS, len(tokens)) if thinks else 0
            runs = [("thinking", tokens[:split]), ("text", tokens[split:])]
            return [(kind, run) for kind, run in runs if run]

        if not req.get("stream"):
            tokens = [token for _, token in self._generate(False, req)]
            content = [{"type": kind, kind: "".join(run)} for kind, run in blocks(tokens)]
            if tool is not None:
                content.append({"type": "tool_use", "id": "call_fake", "name": tool["name"],
                                "input": tool["input"]})
            return self._v1_json({**head, "content": content, "stop_reason": stop_reason(),
                                  "usage": usage(len(tokens))})

        def event(kind, **data):
            self._event(b"event: %s\ndata: %s\n\n" % (kind.encode(), base._dumps(
                {"type": kind, **data})))

        event("message_start", message={**head, "content": [], "usage": {
            "input_tokens": prompt + ESTIMATE_OFF_BY, "output_tokens": 0}})
        if self.fake.anthropic_ping:
            event("ping")
        n, index, open_kind = 0, 0, None
        for n, token in self._generate(True, req, count_from=1):  # noqa: B007 (n: the count)
            kind = "thinking" if thinks and n <= THINKING_TOKENS else "text"
            if kind != open_kind:
                if open_kind is not None:
                    event("content_block_stop", index=index)
                    index += 1
                event("content_block_start", index=index, content_block={"type": kind, kind: ""})
                open_kind = kind
            event("content_block_delta", index=index, delta={"type": f"{kind}_delta",
                                                             kind: token})
        if tool is not None:
            if open_kind is not None:
                event("content_block_stop", index=index)
                index += 1
            event("content_block_start", index=index, content_block={
                "type": "tool_use", "id": "call_fake", "name": tool["name"], "input": {}})
            event("content_block_delta", index=index, delta={
                "type": "input_json_delta", "partial_json": base._dumps(tool["input"]).decode()})
            open_kind = "tool_use"
        if open_kind is not None:
            event("content_block_stop", index=index)
        event("message_delta", delta={"stop_reason": stop_reason()}, usage=usage(n))
        event("message_stop")
        self._end_stream()


ESTIMATE_OFF_BY = 1000  # message_start's input_tokens are Ollama's guess, not its count
