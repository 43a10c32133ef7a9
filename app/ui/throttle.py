"""Failed dashboard sign-ins per client address, counted in the database for all workers.

Each worker counting on its own let workers × the limit through, and counting before
the key was checked locked out the right admin along with whoever was guessing from
the same address (behind a proxy: everyone). So only failures count, and a valid key
is checked first and never meets the throttle. A failure is recorded, then the
address's failures in the window are counted with it: of attempts racing on several
workers at most FAILURES_ALLOWED are answered as a wrong key, and a throttled
attempt takes its row back out, so the table holds at most that many per address.
"""
import math
import time

from app.store.models import SigninFailure

FAILURES_ALLOWED = 10  # failed sign-ins an address may make within WINDOW_SECONDS
WINDOW_SECONDS = 60.0
LONGEST_ADDRESS = 64


def failed(address, now=None):
    """Record a failed sign-in from `address`; return seconds to wait if it was one too many.

    0 means the failure was within the allowance (answer it as a wrong key).
    """
    now = time.time() if now is None else now
    address = address[:LONGEST_ADDRESS]
    since = now - WINDOW_SECONDS
    SigninFailure.delete().where(SigninFailure.at <= since).execute()
    row = SigninFailure.create(address=address, at=now)
    recent = (SigninFailure.select(SigninFailure.at)
              .where(SigninFailure.address == address, SigninFailure.at > since)
              .order_by(SigninFailure.at).limit(FAILURES_ALLOWED + 1))
    times = [failure.at for failure in recent]
    if len(times) <= FAILURES_ALLOWED:
        return 0
    SigninFailure.delete_by_id(row.id)
    return max(1, math.ceil(times[0] + WINDOW_SECONDS - now))
