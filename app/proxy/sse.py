"""OpenAI-style event streams (/v1): exact usage, while the client gets exactly what it asked.

Ollama reports usage on a /v1 stream only when asked (`stream_options.include_usage`).
The gateway asks for it when the client did not, so every request is accounted, and
then takes back out what only it asked for: the final usage chunk (`"choices":[]`) and,
on /v1/completions, the zeroed usage Ollama then writes into every chunk. Everything
else passes byte for byte.
"""
import json

from app.errors import anthropic_error, is_anthropic
from app.proxy.jsonbody import fold

# What Ollama (Go's encoding/json) writes at the end of each completion chunk then.
ZERO_USAGE = b',"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'


def ask_for_usage(body):
    """The stream_options to send upstream, or None if the client already asked for usage.

    Go's decoder matches field names in any letter case and keeps the last: the client's
    options are read so (`Stream_Options`, `INCLUDE_USAGE` count), and every spelling of
    include_usage is replaced by one that asks for it.
    """
    found = body.values("stream_options")
    options = found[-1] if found and isinstance(found[-1], dict) else {}
    asked = [v for k, v in options.items() if fold(k) == "include_usage"]
    if found and asked == [True]:
        return None
    return {**{k: v for k, v in options.items() if fold(k) != "include_usage"},
            "include_usage": True}


class UsageStripper:
    """Feed it Ollama's bytes; it returns them without the usage the client did not ask for.

    Events end with a blank line; one may arrive split across reads, so an incomplete
    one waits for the rest. Whatever is left at the end is passed on as it is.
    """

    def __init__(self):
        self._pending = b""

    def feed(self, chunk):
        data = self._pending + chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return b""
        complete, self._pending = data[:end + 2], data[end + 2:]
        return b"".join(self._clean(event + b"\n\n")
                        for event in complete[:-2].split(b"\n\n"))

    def finish(self):
        rest, self._pending = self._pending, b""
        return rest

    @staticmethod
    def _clean(event):
        if event.startswith(b"data: {") and b'"choices":[]' in event and b'"usage":{' in event:
            return b""  # the usage chunk only the gateway asked for (its bytes were counted)
        return event.replace(ZERO_USAGE, b"")


def error_event(path, message):
    """The last event of a /v1 stream Ollama broke off: one the openai client raises on."""
    if is_anthropic(path):  # what Anthropic's clients raise an APIStatusError on
        return (b"event: error\ndata: " + json.dumps(anthropic_error(500, message),
                                                     separators=(",", ":")).encode() + b"\n\n")
    error = {"message": message, "type": "api_error", "param": None, "code": None}
    if path == "/v1/responses":
        return (b"event: error\ndata: " + json.dumps(
            {"type": "error", **error}).encode() + b"\n\n")
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
