"""A multipart/form-data body's `model` fields, found without keeping its files.

Transcriptions (and OpenAI's image edits) send their model as a form field beside an
audio or image file. The gateway reads the body within max_body_bytes like any other,
walks its parts with werkzeug's incremental parser (a file's bytes pass by, never
copied), keeps the value of every part called `model` and relays the body unchanged.

Ollama parses the same bytes with Go's mime/multipart, and the two parsers must not
disagree on which part is the model. So every part called `model` counts, a file too
(Go takes a part with an empty filename for a field), and a part whose name could be
read two ways is refused: more than one Content-Disposition, a parameter given twice
(Go then ignores the part, werkzeug takes the last), or RFC 2231 `name*=` spellings.
"""
import re

from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from app.cooperative import pause
from app.errors import BadRequest

STEP = 64 * 1024  # bytes handed to the parser at a time
VALUE_LIMIT = 4096  # a `model` part longer than this is no model name
_PARAMETER = re.compile(r";\s*([^\s=;]+)\s*=")


def field_values(raw, content_type, name="model"):
    """Every value of the parts called `name`, in order; 400 for a malformed form."""
    _, options = parse_options_header(content_type)
    boundary = options.get("boundary")
    if not boundary:
        raise BadRequest("multipart/form-data body without a boundary in its Content-Type")
    decoder = MultipartDecoder(boundary.encode("latin-1", "replace"))
    values, current, ended = [], None, False
    view = memoryview(raw)
    try:
        for at in [*range(0, len(view), STEP), None]:  # None: the end of the body
            decoder.receive_data(None if at is None else bytes(view[at:at + STEP]))
            while not isinstance(event := decoder.next_event(), NeedData):
                if isinstance(event, (Field, File)):
                    _unambiguous(event.headers)
                    current = bytearray() if event.name == name else None
                    if current is not None:
                        values.append(current)
                elif isinstance(event, Data) and current is not None:
                    current += event.data
                    if len(current) > VALUE_LIMIT:
                        raise BadRequest(f"the form field {name!r} is longer than "
                                         f"{VALUE_LIMIT} bytes: not a model name")
                elif isinstance(event, Epilogue):
                    ended = True
                    break
            if ended:
                break
            pause()
    except ValueError as exc:  # werkzeug's word for a form it cannot parse
        raise BadRequest(f"multipart/form-data body is malformed: {exc}") from None
    if not ended:
        raise BadRequest("multipart/form-data body ends before its closing boundary")
    try:
        return [bytes(value).decode() for value in values]
    except UnicodeDecodeError:
        raise BadRequest(f"the form field {name!r} is not UTF-8") from None


def _unambiguous(headers):
    dispositions = headers.getlist("Content-Disposition")
    if len(dispositions) != 1:
        raise BadRequest("a form part has more than one Content-Disposition header")
    names = [n.lower() for n in _PARAMETER.findall(dispositions[0])]
    if len(names) != len(set(names)) or any(n.endswith("*") or "*" in n for n in names):
        raise BadRequest("a form part's Content-Disposition names a parameter twice or in "
                         f"RFC 2231 form ({dispositions[0][:200]!r}): send plain name=\"…\"")
