"""A JSON request body as the gateway needs it: its top-level fields, without stalling a worker.

The gateway decides on a few small top-level fields (`model`, `apikey`, …) and relays
the raw bytes. Parsing a 60 MiB body with `json.loads` holds a gevent worker, and every
stream on it, for a fifth of a second, so a body over `INLINE_LIMIT` is scanned field by
field instead: large values (base64 images, long prompts) are skipped with `bytes.find`,
not decoded, and the scan yields to other greenlets as it goes. Ollama still validates
what it receives. Changes (a stripped `apikey`) are spliced into the raw bytes, so a
large body is never re-encoded either.
"""
import json
import re

from app.cooperative import pause

MODEL_FIELDS = ("model", "name")  # compared case-insensitively, as Go's encoding/json does


def fold(name):
    """A field name as Go's encoding/json compares them: case folded, so `MODEL`, `Model`
    and `tooſ` (U+017F, a long s) match `model` and `toos` as Ollama decodes them."""
    return name.casefold()
INLINE_LIMIT = 1024 * 1024  # bodies up to this are parsed whole: ~3 ms at most
VALUE_LIMIT = 64 * 1024  # in a larger body, values up to this are decoded
MAX_DEPTH = 1000
# What no model name holds and a database cannot store (PostgreSQL: NUL; both: an
# unpaired surrogate, which a JSON "\ud800" decodes to): refused, not recorded.
_NOT_IN_A_NAME = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")

_SPACE = re.compile(rb"[ \t\n\r]*")
_STRUCTURE = re.compile(rb'["\[\]{}]')
_SCALAR_END = re.compile(rb"[ \t\n\r,}\]]|$")


class JsonBody:
    """A request body read once: raw bytes for Ollama, top-level fields for the gateway.

    A malformed body is not refused here but by validated(), after authentication, so
    that a caller without a valid key learns only that (401), never more.
    `payload` holds every top-level field of a small body, and the fields of up to
    VALUE_LIMIT bytes of a large one.
    """

    def __init__(self, raw):
        self.raw = raw
        self.payload = None
        self.problem = None
        self._spans = None  # [(name, start, end)] of each field, for a scanned body
        if not raw.strip():
            return
        try:
            if len(raw) <= INLINE_LIMIT:
                parsed = json.loads(raw)
                if not isinstance(parsed, dict):
                    self.problem = "request body must be a JSON object"
                    return
                self.payload = parsed
            else:
                self.payload, self._spans = _scan_object(raw)
        except NotAnObject:
            self.problem = "request body must be a JSON object"
            return
        except (ValueError, UnicodeDecodeError, RecursionError, IndexError) as exc:
            # ValueError covers JSONDecodeError and a number past Python's digit limit.
            self.problem = f"request body is not valid JSON: {str(exc)[:200]}"
            return
        for field in self.field_names():
            if fold(field) in MODEL_FIELDS:
                self.problem = model_problem(field, self.payload.get(field))
                if self.problem:
                    if field not in self.payload:  # a value too large to decode
                        self.problem += f" of at most {VALUE_LIMIT} bytes"
                    return

    def field_names(self):
        """Every top-level field name, duplicates included, in order."""
        if self._spans is not None:
            return [name for name, _, _ in self._spans]
        return list(self.payload or ())

    @property
    def models(self):
        """Every model the body names: `model` or the older `name`, in any letter case."""
        if self.payload is None:
            return []
        return [self.payload[f] for f in self.field_names() if fold(f) in MODEL_FIELDS
                and isinstance(self.payload.get(f), str)]

    def values(self, name):
        """Every value of the top-level field `name` in any letter case (Go's decoder matches
        fields so), large ones decoded now: a check must see what Ollama will."""
        if self.payload is None:
            return []
        if self._spans is None:
            return [v for k, v in self.payload.items() if fold(k) == name]
        return [json.loads(b"{" + self.raw[start:end] + b"}")[field]
                for field, start, end in self._spans if fold(field) == name]

    def validated(self):
        """The top-level fields (or None for an empty body); 400 if the body is malformed."""
        from app.errors import BadRequest

        if self.problem:
            raise BadRequest(self.problem)
        return self.payload

    def without(self, *names):
        """The raw body without the top-level fields called `names` (in any letter case)."""
        return self.rewritten(drop=names)

    def rewritten(self, changes=None, drop=()):
        """The raw body with top-level fields set to `changes` and `drop`ped, in any case.

        A field that is set replaces every spelling of it (Go's decoder would take the
        last). A large body is spliced, never re-encoded; untouched, it is returned as is.
        """
        changes = changes or {}
        drop = {fold(name) for name in (*drop, *changes)}
        if self.payload is None:
            return json.dumps(changes).encode() if changes else self.raw
        if not changes and not any(fold(f) in drop for f in self.field_names()):
            return self.raw
        if self._spans is None:
            kept = {k: v for k, v in self.payload.items() if fold(k) not in drop}
            return json.dumps({**kept, **changes}).encode()
        kept = [self.raw[start:end] for name, start, end in self._spans
                if fold(name) not in drop]
        added = [json.dumps(name).encode() + b":" + json.dumps(value).encode()
                 for name, value in changes.items()]
        return b"{" + b",".join(kept + added) + b"}"


def model_problem(field, name):
    """Why `name` cannot be a model's name (None if it can): every model a request names,
    and the one its usage record keeps, passes through here."""
    if not isinstance(name, str):
        return f"'{field}' must be a string"
    if _NOT_IN_A_NAME.search(name):
        return (f"'{field}' is not a model name: it holds a control character or an "
                "unpaired surrogate")
    return None


class NotAnObject(ValueError):
    """Valid or not, the body is not a JSON object."""


def _scan_object(raw):
    """({name: value} for values up to VALUE_LIMIT bytes, [(name, start, end)] per field)."""
    payload, spans = {}, []
    i = _space(raw, 0)
    if raw[i:i + 1] != b"{":
        raise NotAnObject()
    i = _space(raw, i + 1)
    if raw[i:i + 1] == b"}":
        return payload, _end(raw, i + 1, spans)
    while True:
        if raw[i:i + 1] != b'"':
            raise ValueError(f"expected a field name at byte {i}")
        start, name_end = i, _skip_string(raw, i)
        name = json.loads(raw[i:name_end])
        i = _space(raw, name_end)
        if raw[i:i + 1] != b":":
            raise ValueError(f"expected ':' at byte {i}")
        value_start = _space(raw, i + 1)
        value_end = _skip_value(raw, value_start)
        if value_end - value_start <= VALUE_LIMIT:
            payload[name] = json.loads(raw[value_start:value_end])
        else:
            payload.pop(name, None)  # a later duplicate wins, as in Go and Python
        spans.append((name, start, value_end))
        pause()
        i = _space(raw, value_end)
        if raw[i:i + 1] == b",":
            i = _space(raw, i + 1)
        elif raw[i:i + 1] == b"}":
            return payload, _end(raw, i + 1, spans)
        else:
            raise ValueError(f"expected ',' or '}}' at byte {i}")


def _end(raw, i, spans):
    if _space(raw, i) != len(raw):
        raise ValueError(f"extra data after the object at byte {i}")
    return spans


def _space(raw, i):
    return _SPACE.match(raw, i).end()


def _skip_string(raw, i):
    """The index after the string that starts at raw[i] == '"' (found with memchr, not decoded)."""
    j = i + 1
    while True:
        j = raw.find(b'"', j)
        if j < 0:
            raise ValueError(f"unterminated string from byte {i}")
        backslashes = j - 1
        while raw[backslashes] == 0x5C:  # an odd run of backslashes escapes the quote
            backslashes -= 1
        if (j - 1 - backslashes) % 2 == 0:
            return j + 1
        j += 1


def _skip_value(raw, i):
    """The index after the JSON value at raw[i]; nested values are only checked for balance."""
    first = raw[i:i + 1]
    if first == b'"':
        return _skip_string(raw, i)
    if first not in (b"{", b"["):
        end = _SCALAR_END.search(raw, i).start()
        if end == i:
            raise ValueError(f"expected a value at byte {i}")
        return end
    closing = {ord("{"): ord("}"), ord("["): ord("]")}
    stack, j, steps = [], i, 0
    while True:
        match = _STRUCTURE.search(raw, j)
        if match is None:
            raise ValueError(f"unterminated {first.decode()} from byte {i}")
        j = match.start()
        c = raw[j]
        if c == 0x22:
            j = _skip_string(raw, j)
        elif c in closing:
            stack.append(closing[c])
            if len(stack) > MAX_DEPTH:
                raise ValueError(f"nested more than {MAX_DEPTH} deep")
            j += 1
        else:
            if not stack or stack.pop() != c:
                raise ValueError(f"unbalanced {chr(c)!r} at byte {j}")
            j += 1
            if not stack:
                return j
        steps += 1
        if steps % 4096 == 0:
            pause()
