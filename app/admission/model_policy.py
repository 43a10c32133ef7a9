"""What a key may ask of a shared GPU: how much context, how long an answer, keep_alive.

A key can cap `num_ctx` (context tokens, which cost GPU memory) and the answer's length
(`num_predict` on /api, `max_tokens` and kin on /v1), and may be denied `keep_alive`
(which holds a model in memory after the request). `model_policy` decides what happens
to a request over a cap: refused with 403 saying why, or clamped to the cap. An answer
with no length set, or an unlimited one (-1, -2), is clamped in both modes: otherwise a
cap could be sidestepped by asking for nothing.

Anthropic's Messages API (/v1/messages) is always clamped, whatever the mode: its
`max_tokens` is required, and clients send one far above any cap on every request
(Claude Code: 32000), so refusing would shut them out. Its thinking budget is kept
within the cap too.
"""
from app.errors import Forbidden

GENERATING = {"/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions",
              "/v1/responses", "/v1/messages"}
# Where each API takes the answer's length: native options, or a top-level field on /v1.
LENGTH_FIELDS = {"/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
                 "/v1/completions": ("max_tokens",), "/v1/responses": ("max_output_tokens",),
                 "/v1/messages": ("max_tokens",)}
# Where a client's answer length is always clamped, never refused (see the docstring).
ALWAYS_CLAMPED = {"/v1/messages"}


def applies(key):
    """Whether `key` has a policy at all (most keys do not: nothing to look at)."""
    return bool(key.max_ctx or key.max_predict or not key.allow_keep_alive)


def changes(key, path, payload, mode):
    """Top-level fields to set for `key`'s policy, None for one to drop; 403 in refuse mode."""
    if payload is None or not applies(key):
        return {}
    out = {}
    options = payload.get("options")
    options = dict(options) if isinstance(options, dict) else {}
    touched = False
    if key.max_ctx and path.startswith("/api/"):
        asked = options.get("num_ctx")
        if isinstance(asked, int) and asked > key.max_ctx:
            _over(mode, key, f"a context of {asked} tokens (num_ctx)",
                  f"at most {key.max_ctx}")
            options["num_ctx"], touched = key.max_ctx, True
    if key.max_predict and path in GENERATING:
        if path.startswith("/api/"):
            asked = options.get("num_predict")
            if _too_long(asked, key.max_predict, mode, key, "num_predict"):
                options["num_predict"], touched = key.max_predict, True
        else:
            length_mode = "clamp" if path in ALWAYS_CLAMPED else mode
            fields = LENGTH_FIELDS[path]
            present = [f for f in fields if f in payload] or [fields[0]]
            for field in present:
                if _too_long(payload.get(field), key.max_predict, length_mode, key, field):
                    out[field] = key.max_predict
            thinking = payload.get("thinking")
            if path in ALWAYS_CLAMPED and isinstance(thinking, dict):
                budget = thinking.get("budget_tokens")
                if isinstance(budget, int) and budget > key.max_predict:
                    out["thinking"] = {**thinking, "budget_tokens": key.max_predict}
    if not key.allow_keep_alive and "keep_alive" in payload:
        if mode == "refuse":
            raise Forbidden(f"key {key.prefix} may not set keep_alive (how long a model stays "
                            "loaded); leave it out and the server's default applies")
        out["keep_alive"] = None  # dropped: the server's default applies
    if touched:
        out["options"] = options
    return out


def _too_long(asked, cap, mode, key, field):
    """Whether the answer's length must be set to `cap` (raises 403 in refuse mode)."""
    if isinstance(asked, int) and 0 < asked <= cap:
        return False
    if isinstance(asked, int) and asked > cap:
        _over(mode, key, f"an answer of {asked} tokens ({field})", f"at most {cap}")
    return True  # absent, or unlimited (-1, -2): set to the cap


def _over(mode, key, asked, allowed):
    if mode == "refuse":
        raise Forbidden(f"key {key.prefix} may not ask for {asked}: it allows {allowed}; "
                        "ask for less")
