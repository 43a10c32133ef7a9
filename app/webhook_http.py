"""One webhook attempt over HTTP: signed the Standard Webhooks way at the moment it is sent.

Nothing of a client's request travels with it: the session is the dispatcher's own, takes
no proxy from the environment, keeps no cookies, adds no headers, follows no redirect.
"""
import datetime
import http.cookiejar
import time

import requests
from requests.adapters import HTTPAdapter

# Characters of a failing receiver's answer kept in the attempt's error.
ERROR_BODY_CHARS = 200


def new_session(concurrency):
    session = requests.Session()
    session.trust_env = False  # an HTTP_PROXY meant for something else must not see events
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    session.headers.clear()
    adapter = HTTPAdapter(pool_connections=8, pool_maxsize=concurrency, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def signed_headers(message_id, secret, body, signed_at=None):
    """Content-Type and the three Standard Webhooks headers for `body`, signed at `signed_at`."""
    from standardwebhooks import Webhook as Signer

    signed_at = int(time.time() if signed_at is None else signed_at)
    when = datetime.datetime.fromtimestamp(signed_at, datetime.timezone.utc)
    return {
        "Content-Type": "application/json",
        "User-Agent": "ollama-gw-webhooks",
        "webhook-id": message_id,
        "webhook-timestamp": str(signed_at),
        "webhook-signature": Signer(secret).sign(message_id, when, body),
    }


def post(session, url, message_id, secret, body, timeout):
    """Send one attempt; return (HTTP status or None, what went wrong or None)."""
    headers = signed_headers(message_id, secret, body)
    try:
        answer = session.post(url, data=body.encode("utf-8"), headers=headers,
                              timeout=(timeout, timeout), allow_redirects=False, stream=True)
    except requests.Timeout:
        return None, f"no answer within {timeout:g} s (webhook_timeout)"
    except requests.RequestException as exc:
        return None, f"cannot reach the receiver: {reason(exc)}"
    try:
        if 200 <= answer.status_code < 300:
            return answer.status_code, None
        text = answer.raw.read(ERROR_BODY_CHARS, decode_content=False) or b""
        snippet = text.decode("utf-8", "replace").strip()
        error = f"HTTP {answer.status_code}" + (f": {snippet}" if snippet else "")
        if 300 <= answer.status_code < 400:
            error += " (redirects are not followed: give the final URL)"
        return answer.status_code, error
    except requests.RequestException as exc:
        return answer.status_code, f"HTTP {answer.status_code}: {reason(exc)}"
    finally:
        answer.close()


def reason(exc):
    """What went wrong in a few words: the OS's reason (`Connection refused`) if there is one.

    requests wraps it in urllib3's retry and pool errors, whose text repeats the URL.
    """
    seen, todo = set(), [exc]
    while todo:
        cause = todo.pop(0)
        if cause is None or id(cause) in seen:
            continue
        seen.add(id(cause))
        if type(cause).__module__ == "builtins" and isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        if type(cause).__module__ == "socket" and cause.args:  # gaierror: an unknown host
            return f"{cause.args[-1]}"
        todo += [*(a for a in cause.args if isinstance(a, BaseException)),
                 getattr(cause, "reason", None), cause.__cause__, cause.__context__]
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "…"
