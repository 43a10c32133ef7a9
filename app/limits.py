"""Parse and print the human forms of limits: `60/minute`, `200000/day`, `30d`."""
import calendar
import datetime
import re
import time

PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_ALIASES = {
    "s": "second", "sec": "second", "secs": "second", "seconds": "second",
    "m": "minute", "min": "minute", "mins": "minute", "minutes": "minute",
    "h": "hour", "hr": "hour", "hours": "hour",
    "d": "day", "days": "day",
}
UNLIMITED = ("none", "unlimited", "off")
# Bounds that keep every value inside a 32-bit database integer.
MAX_COUNT = 1_000_000_000
MAX_SECONDS = 366 * 86400


def parse_rate_limit(text):
    """Return (count, period_seconds) for `N/unit`, or None for `none`/`unlimited`.

    A bare number means per hour, as in ollama-api-service's `rate_limit: 100`.
    """
    raw = str(text).strip().lower()
    if raw in UNLIMITED:
        return None
    if raw.isdigit():
        raw += "/hour"
    match = re.fullmatch(r"(\d+)\s*(?:/|per)\s*(\d*)\s*([a-z]+)", raw)
    unit = match and _ALIASES.get(match.group(3), match.group(3))
    if not match or unit not in PERIODS:
        raise ValueError(
            f"rate limit {text!r} is not N/unit: use e.g. 60/minute, 1000/hour, "
            "10000/day (units: second, minute, hour, day) or 'none'"
        )
    count = int(match.group(1))
    multiple = int(match.group(2) or 1)
    if count < 1 or multiple < 1:
        raise ValueError(f"rate limit {text!r} must allow at least 1 request per period")
    if count > MAX_COUNT:
        raise ValueError(f"rate limit {text!r} is too large: at most {MAX_COUNT} per period, "
                         "or 'none' for no limit")
    if multiple * PERIODS[unit] > MAX_SECONDS:
        raise ValueError(f"rate limit {text!r} has too long a period: at most a year")
    return count, multiple * PERIODS[unit]


def format_rate_limit(count, period):
    """The inverse of parse_rate_limit: `60/minute`, `5/10minute`, `unlimited`."""
    if not count:
        return "unlimited"
    for unit, seconds in sorted(PERIODS.items(), key=lambda item: -item[1]):
        if period % seconds == 0:
            multiple = period // seconds
            return f"{count}/{unit}" if multiple == 1 else f"{count}/{multiple}{unit}"
    return f"{count}/{period}second"


def parse_duration(text):
    """Seconds in `30d`, `12h`, `90m`, `45s`, `2w` (weeks), or a bare number of days."""
    raw = str(text).strip().lower()
    match = re.fullmatch(r"(\d+)\s*([smhdw]?)", raw)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"duration {text!r} is not like 30d, 12h, 90m, 45s or 2w")
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "": 86400}[match.group(2)]
    seconds = int(match.group(1)) * unit
    if seconds > 100 * 365 * 86400:
        raise ValueError(f"duration {text!r} is more than 100 years; use 'never' instead")
    return seconds


def parse_since(text):
    """The epoch second `text` (a duration like 7d) before now, or None for `all`."""
    if str(text).strip().lower() == "all":
        return None
    return time.time() - parse_duration(text)


QUOTA_PERIODS = ("day", "month")


def parse_token_quota(text):
    """Return (tokens, 'day'|'month') for `N/day` or `N/month`, or None for `none`."""
    raw = str(text).strip().lower().replace(",", "").replace("_", "")
    if raw in UNLIMITED:
        return None
    match = re.fullmatch(r"(\d+)\s*(?:/|per)\s*(day|month)s?", raw)
    if not match:
        raise ValueError(f"token quota {text!r} is not N/day or N/month: use e.g. 200000/day, "
                         "5000000/month or 'none'")
    tokens = int(match.group(1))
    if not 1 <= tokens <= 10**15:
        raise ValueError(f"token quota {text!r} must be between 1 and 10^15 tokens")
    return tokens, match.group(2)


def format_token_quota(tokens, period):
    return f"{tokens}/{period}" if tokens else "none"


GPU_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_gpu_quota(text):
    """Return (seconds, 'day'|'month') for GPU time per period (`90s/day`, `30m/day`,
    `2h/month`; units s, m, h), or None for `none`."""
    raw = str(text).strip().lower().replace(" ", "")
    if raw in UNLIMITED:
        return None
    match = re.fullmatch(r"(\d+)([smh])(?:/|per)(day|month)s?", raw)
    if not match:
        raise ValueError(f"GPU quota {text!r} is not TIME/day or TIME/month: use e.g. "
                         "90s/day, 30m/day, 2h/month (units s, m, h) or 'none'")
    seconds = int(match.group(1)) * GPU_UNITS[match.group(2)]
    limit = 31 * 86400 if match.group(3) == "month" else 86400
    if not 1 <= seconds <= limit:
        raise ValueError(f"GPU quota {text!r} must be at least 1 s and at most the period "
                         f"({limit // 3600}h/{match.group(3)})")
    return seconds, match.group(3)


def format_gpu_quota(seconds, period):
    """The inverse of parse_gpu_quota, in the largest whole unit: `2h/day`, `90s/day`."""
    if not seconds:
        return "none"
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}/{period}"


def quota_period(period, now):
    """(start, end) in epoch seconds of the UTC day or month that contains `now`."""
    moment = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    if period == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + datetime.timedelta(days=1)
    else:
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        days = calendar.monthrange(start.year, start.month)[1]
        end = start + datetime.timedelta(days=days)
    return int(start.timestamp()), int(end.timestamp())
