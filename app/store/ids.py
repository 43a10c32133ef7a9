"""Row ids as people and URLs write them: ASCII digits within the database's integer range.

`str.isdigit()` and `int()` accept more than that (`²`, full-width `１`, a hundred
digits): an id from a URL or a command line went to the database as a number it
cannot hold (500, a traceback) or as another row's id. Every route and command that
takes an id reads it here.
"""
from werkzeug.routing import BaseConverter

MAX_ID = 2**63 - 1  # SQLite's INTEGER and PostgreSQL's BIGINT


def whole_number(text, maximum=MAX_ID):
    """`text` as an int if it is ASCII digits from 0 to `maximum`, else None."""
    text = str(text)
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(maximum)):
        return None
    value = int(text)
    return value if value <= maximum else None


def parse_id(text):
    """`text` as a row id, or None if it cannot be one (ids start at 1)."""
    value = whole_number(text)
    return value if value else None


class IdConverter(BaseConverter):
    """`<id:name>` in a route: the id, or 0 (no row's) for digits out of range.

    Other text matches no route (404). Out-of-range digits still match, as 0, so that
    the view answers its own 404: a ValidationError would make werkzeug answer 405
    where another method's rule has the same path.
    """

    regex = "[0-9]+"

    def to_python(self, value):
        return parse_id(value) or 0

    def to_url(self, value):
        return str(int(value))
