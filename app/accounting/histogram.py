"""Latency histograms whose percentiles are within 1 % of the exact ones, from 1 ms to 10 min.

Statistics read roll-ups, not per-request rows, so a percentile has to come from bucket
counts. The buckets are log-linear, as in HDR histograms and DDSketch: a bucket's upper
bound is GAMMA (1.02) times its lower one, so the geometric middle of a bucket is within
sqrt(1.02) - 1 < 1 % of any value in it (1.1 % once clamped to whole milliseconds).
Durations are whole milliseconds: below EXACT_BELOW_MS a log bucket would be narrower
than one millisecond, so each millisecond there is a bucket of its own (exact). 0 ms
("< 1 ms") and above MAX_MS ("> 10 min") are one bucket each: the statistics show the
bound, not a made-up value.

A percentile is the nearest rank, as people count it: the ⌈q·n⌉-th smallest request.
Counting through the buckets in order finds the bucket that request is in, exactly; the
value reported is the bucket's middle clamped to the whole milliseconds the bucket holds,
so it is within 1.1 % of that request's (2 % is what docs/http-api.md promises).

The bucket numbers are stored (usage_histogram, app/store/models.py): they are a data format.
Changing GAMMA or EXACT_BELOW_MS would need a new metric and a rebuild, never an edit.
"""
import functools
import math

GAMMA = 1.02
EXACT_BELOW_MS = 50  # 1 ms / 50 ms = 2 %: below this, whole milliseconds are the buckets
MAX_MS = 600_000  # 10 minutes: slower requests are counted, as "> 10 min"
BELOW = 0  # the bucket of 0 ms: "< 1 ms"
_LOG_GAMMA = math.log(GAMMA)


def _lower(index):
    """The smallest value (ms, real) of log bucket `index` (>= EXACT_BELOW_MS)."""
    return EXACT_BELOW_MS * GAMMA ** (index - EXACT_BELOW_MS)


@functools.lru_cache(maxsize=4096)  # the writer asks for the same few hundred values
def bucket(ms):
    """The bucket of a duration in whole milliseconds."""
    if ms < EXACT_BELOW_MS:
        return max(int(ms), BELOW)
    if ms > MAX_MS:
        return ABOVE
    index = EXACT_BELOW_MS + int(math.log(ms / EXACT_BELOW_MS) / _LOG_GAMMA)
    # The logarithm may land a hair off at a boundary: _lower() is the definition.
    while index > EXACT_BELOW_MS and _lower(index) > ms:
        index -= 1
    while _lower(index + 1) <= ms:
        index += 1
    return index


ABOVE = bucket(MAX_MS) + 1  # everything slower than 10 minutes
APPROXIMATE = -1  # not a bucket: how many of the counts were rebuilt from coarse ones


def value(index):
    """What a bucket's requests are reported as: ms, within 1.1 % of each of them."""
    if index < EXACT_BELOW_MS:
        return float(index)
    if index >= ABOVE:
        return float(MAX_MS)
    low = math.ceil(_lower(index))
    high = min(math.ceil(_lower(index + 1)) - 1, MAX_MS)  # the whole ms in the bucket
    return round(min(max(_lower(index) * math.sqrt(GAMMA), low), high), 1)


def percentile(counts, q):
    """(ms, bound) of the nearest-rank q-quantile of {bucket: count}; None when empty.

    bound is None, or "below" (under 1 ms; ms is then 1) or "above" (over 10 minutes;
    ms is then MAX_MS): the value is then that bound, not a measurement.
    """
    buckets = sorted(b for b, c in counts.items() if c and b != APPROXIMATE)
    total = sum(counts[b] for b in buckets)
    if not total:
        return None
    rank = max(1, math.ceil(round(q * total, 9)))  # round: 0.95 * 20 is 19, not 19.000…01
    seen = 0
    for index in buckets:
        seen += counts[index]
        if seen >= rank:
            if index == BELOW:
                return 1.0, "below"
            if index == ABOVE:
                return float(MAX_MS), "above"
            return value(index), None
    raise AssertionError("unreachable: the rank is at most the total")


def shown(row, field, unit=False):
    """A row's percentile as people read it: "252", "< 1 ms", "> 10 min", "≈375", "-".

    unit: "252 ms" (where no column heading says ms).
    """
    ms = row.get(field)
    if ms is None:
        return "-"
    bound = (row.get("out_of_range") or {}).get(field)
    if bound == "below":
        return "< 1 ms"
    if bound == "above":
        return "> 10 min"
    text = f"{ms:.1f}".removesuffix(".0") + (" ms" if unit else "")
    return f"≈{text}" if row.get("approximate") else text
