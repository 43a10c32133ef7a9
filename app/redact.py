"""Keep gateway keys out of every log line and error page, gunicorn's own included.

Legacy clients put the key in the query string (`?apikey=…`), and gunicorn logs and
echoes a request line it cannot parse; a key may also sit in a header or a JSON body
quoted in an error. Everything written to a log goes through `redact()`, at the
formatter, so a message, its arguments and a traceback are all covered.
"""
import logging
import re

MASK = "[redacted]"

# `apikey=…` / `"apikey": "…"` / `X-API-Key: …` / `Bearer …`: the value is the secret.
_NAMED = re.compile(
    r"""(?P<lead>api[-_]?key["']?\s*[=:]\s*["']?|bearer\s+)(?P<value>[^\s"'&;,)}\]\\]+)""",
    re.IGNORECASE,
)
# A gateway key anywhere else (a pasted key in a model name, say): keep its public prefix.
_KEY = re.compile(r"(ogw_[A-Za-z0-9_-]{8})[A-Za-z0-9_-]+")


# Cheap substring tests first: most lines hold none of these, and skip both regexes.
_NAME_HINTS = ("apikey", "api_key", "api-key", "bearer")


def redact(text):
    """`text` with every key, and every value named like one, masked."""
    if not text:
        return text
    lowered = text.lower()
    if any(hint in lowered for hint in _NAME_HINTS):
        text = _NAMED.sub(lambda m: m["lead"] + MASK, text)
    if "ogw_" in text:
        text = _KEY.sub(r"\1…", text)
    return text


class RedactingFormatter(logging.Formatter):
    """Formats as the formatter it wraps, then masks keys in the whole text."""

    def __init__(self, inner=None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record):
        return redact(self.inner.format(record))


def redact_handlers(logger):
    """Make every handler of `logger` redact what it writes (idempotent)."""
    for handler in logger.handlers:
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter))


def configure_logging(level):
    """The gateway's log format on stderr, at `level`, with every key masked."""
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_handlers(logging.getLogger())  # no key in any log line, tracebacks included


def redact_exception(exc):
    """Mask keys in the attributes an exception's message is made from, in place.

    gunicorn builds both its log line and its 400 page from str(exc), and its parse
    errors keep the offending request line or header as attributes.
    """
    for name, value in list(vars(exc).items()):
        if isinstance(value, str):
            setattr(exc, name, redact(value))
        elif isinstance(value, bytes):
            setattr(exc, name, redact(value.decode("latin-1")).encode("latin-1"))
    exc.args = tuple(redact(a) if isinstance(a, str) else a for a in exc.args)
    return exc
