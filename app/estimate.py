"""How many tokens a request's prompt will be, guessed from its body alone.

The gateway often runs offline and serves many models, so it downloads no tokenizer:
about four characters of text make a token for the models Ollama serves (English prose;
code and other scripts come out somewhat higher). Quotas reserve this much before a
request runs (app/quota.py) and charge it when the answer ends without Ollama's counts;
an endpoint answering "how many tokens would this be" can give the same figure.
"""
import json
import math

CHARS_PER_TOKEN = 4
# An image costs its model a fixed number of tokens, whatever its bytes (e.g. a 336x336
# CLIP tile is 576 embeddings); base64 length says nothing about it.
IMAGE_TOKENS = 576
# Each message adds its role and the template's markers around it.
MESSAGE_TOKENS = 4
# Fields whose text goes to the model as it is: Ollama's (/api) and OpenAI's (/v1).
TEXT_FIELDS = ("prompt", "system", "suffix", "template", "instructions", "input")
STRUCTURED_FIELDS = ("tools", "functions", "format", "response_format", "tool_choice")


def prompt_tokens(payload):
    """The estimated prompt tokens of a request body (a parsed JSON object); 0 for none."""
    if not isinstance(payload, dict):
        return 0
    chars, images, messages = 0, 0, 0
    for field in TEXT_FIELDS:
        c, i, m = _walk(payload.get(field))
        chars, images, messages = chars + c, images + i, messages + m
    listed = payload.get("messages")
    if isinstance(listed, list):
        c, i, _ = _walk(listed)
        chars, images = chars + c, images + i
        messages += len(listed)
    images += _count_images(payload.get("images"))
    for field in STRUCTURED_FIELDS:
        if payload.get(field) not in (None, "", [], {}):
            chars += len(json.dumps(payload[field], ensure_ascii=False, default=str))
    return math.ceil(chars / CHARS_PER_TOKEN) + images * IMAGE_TOKENS + messages * MESSAGE_TOKENS


def _walk(value):
    """(characters of text, images, 0) in a field: a string, a message, a list of parts."""
    if isinstance(value, str):
        return len(value), 0, 0
    chars = images = 0
    if isinstance(value, list):
        for item in value:
            c, i, _ = _walk(item)
            chars, images = chars + c, images + i
    elif isinstance(value, dict):
        kind = value.get("type")
        if kind in ("image_url", "input_image", "image"):
            return 0, 1, 0
        for field in ("content", "text", "thinking", "input_text", "output", "arguments"):
            c, i, _ = _walk(value.get(field))
            chars, images = chars + c, images + i
        images += _count_images(value.get("images"))
        if value.get("tool_calls"):
            chars += len(json.dumps(value["tool_calls"], ensure_ascii=False, default=str))
    return chars, images, 0


def _count_images(value):
    return len(value) if isinstance(value, list) else 0
