"""ollama-api-service's request shape: sampling settings at the top level, moved into `options`.

ollama-api-service took `temperature`, `max_tokens`, … beside `model` and `prompt` on
/api/generate and /api/chat and put them into Ollama's `options`; Ollama itself ignores
such top-level fields, so scripts written for it would silently lose them here. The
gateway moves them, once, in its single body rewrite (app/proxy/gateway.py outgoing_body),
before the key's model policy looks at `options`: a key's --max-predict cap clamps or
refuses a top-level `max_tokens` as it does `options.num_predict`.

Nothing is defaulted (ollama-api-service sent temperature 0.7 when a client named none,
overriding every model's own default), and a value the client also put in `options`
keeps the `options` one. A body without any of these fields costs one set test.
"""
# ollama-api-service's name -> Ollama's option. None of these is a top-level field of
# Ollama's /api/generate or /api/chat, so moving them takes nothing from Ollama.
TOP_LEVEL = {
    "temperature": "temperature",
    "max_tokens": "num_predict",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
    "num_ctx": "num_ctx",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
FIELDS = frozenset(TOP_LEVEL)
# Where they are moved: Ollama's generating endpoints (go-ollama-api's /generate is
# relayed as /api/generate, so it is one of them).
PATHS = frozenset({"/api/generate", "/api/chat"})


def changes(path, body):
    """Top-level fields to set ({"options": …}) and to drop (None) for `body`; {} if none.

    `body` is the request's JsonBody. Ollama decodes `options` in any letter case (the
    last spelling wins), so that is the one extended; in a large body an `options` over
    64 KiB is not decoded, and then nothing is moved rather than options the gateway
    cannot see replaced.
    """
    payload = body.payload
    if payload is None or path not in PATHS or FIELDS.isdisjoint(payload):
        return {}
    spellings = [name for name in body.field_names() if name.lower() == "options"]
    if spellings and spellings[-1] not in payload:
        return {}
    options = payload[spellings[-1]] if spellings else None
    options = dict(options) if isinstance(options, dict) else {}
    out = {}
    for field in [name for name in payload if name in FIELDS]:
        value = payload[field]
        out[field] = None  # moved, or null: it leaves the top level either way
        if value is not None:
            options.setdefault(TOP_LEVEL[field], value)  # an explicit option wins
    out["options"] = options
    return out
