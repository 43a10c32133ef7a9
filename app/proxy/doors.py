"""Which of Ollama's paths a key may reach through the catch-all relays of /api and /v1.

A user key gets the endpoints the gateway knows (and checks: methods, models, roles; the
experimental web routes, which spend the owner's ollama.com plan, are known and governed
by the key's cloud setting: app/proxy/cloud.py).
Everything else is Ollama's business, and some of it is the server owner's: Ollama's
account endpoints act on the ollama.com account the server is signed in with
(`/api/signout` signs it out, `/api/me` tells who it is, the web search endpoints spend
its quota). So account endpoints are for admin keys only, always; a path the gateway
does not know is for admin keys only unless `open_unknown_paths` is on, since what
Ollama adds next may be another door of that kind.
"""
from flask import current_app

from app.errors import Forbidden

# Ollama's account endpoints (server/routes.go), by path or by the prefix of a family.
ACCOUNT_PATHS = frozenset({
    "/api/me", "/api/signin", "/api/signout", "/api/user",
    # Proxied to ollama.com, signed with the server's own account key. Known endpoints in
    # this spelling (the cloud setting decides); any other spelling is an account path.
    "/api/experimental/web_search", "/api/experimental/web_fetch",
})
ACCOUNT_PREFIXES = ("/api/user/", "/api/signin/", "/api/signout/", "/api/me/")
# Endpoints that run a model but whose answers carry no token counts (Ollama reports none
# for images or transcriptions): a key with a token quota may not use them, or its quota
# could be dodged through them.
UNCOUNTED_PATHS = frozenset({"/v1/images/generations", "/v1/images/edits",
                             "/v1/audio/transcriptions"})


def is_account_path(path):
    path = path.lower()  # Ollama's router is case-sensitive today; the check need not rely on it
    return path in ACCOUNT_PATHS or path.startswith(ACCOUNT_PREFIXES)


def check(key, path, known):
    """403 unless `key` may reach `path`; `known` says whether the gateway knows the path."""
    if key.is_admin or known:  # no known endpoint is an account endpoint
        return  # the hot path: no settings read
    if is_account_path(path):
        raise Forbidden(f"{path} is one of Ollama's account endpoints (it acts on the "
                        "ollama.com account the server is signed in with): it needs an admin "
                        f"key; key {key.prefix} has role {key.role}")
    if not current_app.config["SETTINGS"].open_unknown_paths:
        raise Forbidden(f"{path} is not an endpoint the gateway knows, and unknown paths are "
                        "relayed for admin keys only (the setting open_unknown_paths = true "
                        f"relays them for every key); key {key.prefix} has role {key.role}")


def require_counted(key, path):
    """403 for a key with a token quota on an endpoint whose use is not counted in tokens."""
    if key.token_quota and path in UNCOUNTED_PATHS:
        raise Forbidden(f"{path} is not counted in tokens, so key {key.prefix}, which has a "
                        "token quota, may not use it (its quota could be dodged through it); "
                        "use a key without a token quota")
