"""redact(): what may never reach a log is masked, and nothing else is."""
import logging

import pytest

from app.redact import RedactingFormatter, redact, redact_exception

KEY = "ogw_9cRSO_FSx1Yk2w3e4r5t6y7u8i9o0pAaSsDdFfGgHhJj"


@pytest.mark.parametrize("text, kept", [
    (f"GET /api/tags?apikey={KEY}&verbose=1 HTTP/1.1", "apikey=[redacted]&verbose=1"),
    (f"GET /api/tags?APIKEY={KEY}", "APIKEY=[redacted]"),
    (f'{{"apikey": "{KEY}", "model": "x"}}', '"apikey": "[redacted]", "model": "x"'),
    (f"Authorization: Bearer {KEY}", "Authorization: Bearer [redacted]"),
    (f"X-API-Key: {KEY}", "X-API-Key: [redacted]"),
    (f"model {KEY!r} not found", "'ogw_9cRSO_FS…'"),
    (f"b'GET /x?apikey={KEY}\\xff HTTP/1.1'", "apikey=[redacted]\\xff"),
])
def test_keys_are_masked_wherever_they_stand(text, kept):
    masked = redact(text)
    assert KEY not in masked and KEY[12:] not in masked
    assert kept in masked


@pytest.mark.parametrize("text", [
    "key ogw_9cRSO_FS revoked",  # a prefix alone is public
    "api_key_cache refreshed",
    "GET /api/tags?verbose=1",
])
def test_text_without_a_key_is_left_alone(text):
    assert redact(text) == text


def test_the_formatter_masks_arguments_and_tracebacks():
    try:
        raise ValueError(f"bad key {KEY}")
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "request %s failed",
                                   (f"/x?apikey={KEY}",), exc_info=True)
        import sys

        record.exc_info = sys.exc_info()
    text = RedactingFormatter().format(record)
    assert "ValueError" in text and KEY not in text


def test_an_exception_is_masked_in_place():
    from gunicorn.http.errors import InvalidRequestLine

    exc = redact_exception(InvalidRequestLine(f"GET /?apikey={KEY} HTTP/1.1"))
    assert KEY not in str(exc) and "apikey=[redacted]" in str(exc)
