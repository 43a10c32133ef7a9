"""How many tokens a request's prompt will be, guessed from its body alone.

The gateway often runs offline and serves many models, so it downloads no tokenizer:
about four characters of text make a token for the models Ollama serves (English prose),
but never fewer tokens than words (tokenizers split at spaces: "a a a a" is 4, not 2)
nor than characters outside ASCII (scripts without spaces, emoji: one or more each).
Quotas reserve this much before a request runs (app/admission/quota.py), and a request is
admitted past its key's quota by at most what Ollama counts beyond it; the answer is
charged this when it ends without Ollama's counts. An endpoint answering "how many
tokens would this be" can give the same figure.
"""
import json
import math

CHARS_PER_TOKEN = 4
# An image costs its model a fixed number of tokens, whatever its bytes (e.g. a 336x336
# CLIP tile is 576 embeddings); base64 length says nothing about it.
IMAGE_TOKENS = 576
# Each message adds its role and the template's markers around it.
MESSAGE_TOKENS = 4
# Fields whose text goes to the model as it is: Ollama's (/api), OpenAI's and Anthropic's
# (/v1; Anthropic's `system` may be a list of text blocks).
TEXT_FIELDS = ("prompt", "system", "suffix", "template", "instructions", "input")
STRUCTURED_FIELDS = ("tools", "functions", "format", "response_format", "tool_choice")


def prompt_tokens(payload):
    """The estimated prompt tokens of a request body (a parsed JSON object); 0 for none."""
    if not isinstance(payload, dict):
        return 0
    tokens, images = 0, 0
    for field in TEXT_FIELDS:
        t, i = _walk(payload.get(field))
        tokens, images = tokens + t, images + i
    messages = payload.get("messages")
    if isinstance(messages, list):
        t, i = _walk(messages)
        tokens, images = tokens + t + len(messages) * MESSAGE_TOKENS, images + i
    images += _count_images(payload.get("images"))
    for field in STRUCTURED_FIELDS:
        if payload.get(field) not in (None, "", [], {}):
            tokens += text_tokens(json.dumps(payload[field], ensure_ascii=False, default=str))
    return tokens + images * IMAGE_TOKENS


def text_tokens(text):
    """Tokens of one text: a token a 4 characters, a word, or a character outside ASCII."""
    # Words as the spaces and line breaks between them: counted in C without a list (split()
    # took 20 ms a megabyte on the request's worker); runs of spaces only count high.
    inner = text.strip()
    words = inner.count(" ") + inner.count("\n") + 1 if inner else 0
    guesses = [math.ceil(len(text) / CHARS_PER_TOKEN), words]
    if not text.isascii():
        guesses.append(len(text) - len(text.encode("ascii", "ignore")))
    return max(guesses)


def _walk(value):
    """(tokens of text, images) in a field: a string, a message, a list of parts."""
    if isinstance(value, str):
        return text_tokens(value), 0
    tokens = images = 0
    if isinstance(value, list):
        for item in value:
            t, i = _walk(item)
            tokens, images = tokens + t, images + i
    elif isinstance(value, dict):
        if value.get("type") in ("image_url", "input_image", "image"):
            return 0, 1
        for field in ("content", "text", "thinking", "input_text", "output", "arguments"):
            t, i = _walk(value.get(field))
            tokens, images = tokens + t, images + i
        images += _count_images(value.get("images"))
        # OpenAI's tool calls, and Anthropic's (a `tool_use` content block's `input`).
        for field in ("tool_calls", "input"):
            if isinstance(value.get(field), (list, dict)) and value[field]:
                tokens += text_tokens(json.dumps(value[field], ensure_ascii=False, default=str))
    return tokens, images


def _count_images(value):
    return len(value) if isinstance(value, list) else 0
