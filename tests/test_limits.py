"""The human forms of limits: `60/minute` rate limits and `30d` durations."""
import pytest

from app.limits import format_rate_limit, parse_duration, parse_rate_limit


@pytest.mark.parametrize("text, expected", [
    ("60/minute", (60, 60)),
    ("1000/hour", (1000, 3600)),
    ("10000/day", (10000, 86400)),
    ("1/second", (1, 1)),
    ("5/10minute", (5, 600)),
    ("100", (100, 3600)),  # ollama-api-service's bare `rate_limit: 100` is per hour
    ("10/min", (10, 60)),
    ("2/h", (2, 3600)),
    ("3/sec", (3, 1)),
    ("7/d", (7, 86400)),
    ("20/minutes", (20, 60)),
    ("60 per minute", (60, 60)),
    (" 60 / Minute ", (60, 60)),
])
def test_rate_limit_is_read_in_every_accepted_spelling(text, expected):
    assert parse_rate_limit(text) == expected


@pytest.mark.parametrize("text", ["none", "unlimited", "off", "NONE"])
def test_rate_limit_none_means_unlimited(text):
    assert parse_rate_limit(text) is None


@pytest.mark.parametrize("text, hint", [
    ("0/minute", "at least 1"),
    ("5/0minute", "at least 1"),
    ("10/fortnight", "60/minute"),
    ("abc", "60/minute"),
    ("-1/minute", "60/minute"),
    ("", "60/minute"),
    ("1.5/minute", "60/minute"),
    ("minute", "60/minute"),
])
def test_bad_rate_limit_is_refused_with_the_accepted_form(text, hint):
    with pytest.raises(ValueError) as info:
        parse_rate_limit(text)
    message = str(info.value)
    assert hint in message
    assert repr(text) in message  # says which value was wrong


def test_rate_limit_error_lists_the_units():
    with pytest.raises(ValueError, match="second, minute, hour, day"):
        parse_rate_limit("10/fortnight")


@pytest.mark.parametrize("text", [
    "60/minute", "1000/hour", "10000/day", "1/second", "5/10minute", "3/2hour", "5/90second",
    "48/2day",
])
def test_canonical_rate_limit_prints_back_as_written(text):
    assert format_rate_limit(*parse_rate_limit(text)) == text


@pytest.mark.parametrize("text, shown", [
    ("10/min", "10/minute"),
    ("2/h", "2/hour"),
    ("100", "100/hour"),
    ("7/120minute", "7/2hour"),
    ("60 per minute", "60/minute"),
])
def test_aliases_print_in_the_canonical_form(text, shown):
    assert format_rate_limit(*parse_rate_limit(text)) == shown
    assert parse_rate_limit(shown) == parse_rate_limit(text)


def test_no_limit_prints_as_unlimited_and_reads_back_as_none():
    assert format_rate_limit(None, 3600) == "unlimited"
    assert parse_rate_limit(format_rate_limit(None, 3600)) is None


@pytest.mark.parametrize("text, seconds", [
    ("30d", 30 * 86400),
    ("12h", 12 * 3600),
    ("90m", 90 * 60),
    ("45s", 45),
    ("2w", 14 * 86400),
    ("7", 7 * 86400),  # a bare number is days
    (" 1D ", 86400),
])
def test_duration_is_read_in_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0d", "0", "abc", "-1d", "1y", "", "1.5d", "d", "30 days"])
def test_bad_duration_is_refused_with_examples(text):
    with pytest.raises(ValueError, match="30d, 12h"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["99999999999/minute", "5/1000day"])
def test_rate_limits_beyond_what_the_database_holds_are_refused(text):
    with pytest.raises(ValueError, match="too"):
        parse_rate_limit(text)


def test_durations_beyond_a_century_are_refused():
    with pytest.raises(ValueError, match="100 years"):
        parse_duration("99999999999d")
