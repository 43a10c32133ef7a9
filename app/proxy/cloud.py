"""Ollama's cloud: which requests run on ollama.com, and which keys may send them.

Ollama runs cloud models and web searches on ollama.com, signed with the account the
server owner signed in with: every one spends the owner's plan. So they are a key's
permission (`--cloud allow|deny`, or the setting cloud_default for a key left at
`default`: admin keys yes, user keys no), and their usage is recorded apart.

A request is a cloud request when
- a model it names is a cloud model: its tag is `cloud` or ends in `-cloud`
  (`gpt-oss:120b-cloud`, `qwen3:cloud`; Ollama's internal/modelref rule, so `cloudy:latest`
  and `my-cloud-model` are local), or an upstream's /api/tags lists it with a
  `remote_host` (a model made from a cloud one under another name; the list is cached per
  upstream, app/upstreams/pool.py);
- it is one of the experimental web routes (/api/experimental/web_search, web_fetch);
- its body offers Ollama's built-in web search tool (/v1/messages: a tool whose `type`
  starts with `web_search`, e.g. web_search_20250305; /v1/responses: `web_search`,
  `web_search_preview`), which Ollama runs on ollama.com whatever the model.
"""
from flask import current_app

from app.errors import Forbidden
from app.keys.registry import normalize_model
from app.proxy.jsonbody import fold

WEB_PATHS = frozenset({"/api/experimental/web_search", "/api/experimental/web_fetch"})
# Endpoints whose bodies Ollama reads a built-in web search tool from.
TOOL_PATHS = frozenset({"/v1/messages", "/v1/responses"})


def is_cloud_name(model):
    """Whether `model` names a cloud model by its tag, as Ollama parses it."""
    name = (model or "").strip()
    colon = name.rfind(":")
    if colon < 0:
        return False
    tag = name[colon + 1:].strip()
    return tag.lower() == "cloud" or ("/" not in tag and tag.lower().endswith("-cloud"))


def is_web_path(path):
    return path.lower() in WEB_PATHS


def plain(model):
    """A model's name as the upstreams list it: lower case, with `:latest` if it has no tag,
    and without the default registry, namespace or a digest, which name the same model to
    Ollama (`registry.ollama.ai/library/team-coder:latest@sha256:…` is `team-coder:latest`)."""
    name = (model or "").split("@", 1)[0].strip().lower()
    for prefix in ("registry.ollama.ai/", "library/"):
        name = name.removeprefix(prefix)
    return normalize_model(name).lower()


def _remote(models):
    """The upstreams' models listed with a remote_host (read at most once per refresh)."""
    if not models:
        return frozenset()
    return current_app.extensions["upstreams"].remote_models()


def cloud_models(models):
    """The ones of `models` that run on ollama.com."""
    remote = None
    found = []
    for model in models:
        if is_cloud_name(model):
            found.append(model)
            continue
        if remote is None:
            remote = _remote(models)
        if plain(model) in remote:
            found.append(model)
    return found


def web_search_tools(body):
    """The `type`s of the built-in web search tools in a JsonBody's `tools`, in any case."""
    found = []
    for tools in body.values("tools"):
        for tool in tools if isinstance(tools, list) else ():
            if not isinstance(tool, dict):
                continue
            for field, value in tool.items():
                if (fold(field) == "type" and isinstance(value, str)
                        and value.lower().startswith("web_search")):
                    found.append(value)
    return found


def may_use(key):
    return key.may_use_cloud(current_app.config["SETTINGS"].cloud_default)


def _why_not(key):
    own = key.cloud or "default"
    if own == "default":
        return (f"key {key.prefix} (role {key.role}) has cloud setting default, which "
                f"cloud_default = {current_app.config['SETTINGS'].cloud_default!r} makes deny; "
                f"an admin can allow it with `ollama-gw keys update {key.prefix} --cloud allow`")
    return (f"key {key.prefix} has cloud setting deny; an admin can change it with "
            f"`ollama-gw keys update {key.prefix} --cloud allow`")


# What check() found: the request runs wholly on ollama.com (a cloud model, a web
# route), or a local model runs it and Ollama searches the web on ollama.com for it.
ON_OLLAMA_COM, SEARCHES = "on ollama.com", "searches on ollama.com"


def check(key, path, body=None, models=()):
    """ON_OLLAMA_COM or SEARCHES if the request uses ollama.com and `key` may send it; 403
    saying why if it may not; None for a local request. `body`: its JsonBody, if any.

    Both are cloud requests (they spend the owner's plan); only ON_OLLAMA_COM uses no
    local GPU (app/accounting/gpu.py)."""
    what, kind = None, ON_OLLAMA_COM
    if is_web_path(path):
        what = f"{path} runs a web search or fetch on ollama.com"
    elif (names := cloud_models(models)):
        what = f"model {names[0]!r} is a cloud model: it runs on ollama.com"
    elif body is not None and path in TOOL_PATHS and (tools := web_search_tools(body)):
        what, kind = (f"the request offers the built-in web search tool ({tools[0]!r}), which "
                      "Ollama runs on ollama.com"), SEARCHES
    if what is None:
        return None
    if not may_use(key):
        raise Forbidden(f"{what}, signed with the server owner's account and spending its "
                        f"plan, and this key may not use the cloud: {_why_not(key)}")
    return kind


def mark(pending, kind):
    """Note on a request's usage record what check() found (None: nothing ran there)."""
    if pending is not None:
        pending.cloud = kind is not None
        pending.cloud_model = kind == ON_OLLAMA_COM


def narrows_lists(key):
    """Whether model lists shown to `key` leave anything out (its allow-list, the cloud)."""
    return bool(key.models) or not may_use(key)


def shown(key):
    """`shown(name, entry) -> bool`: whether a model list shows `key` this model: one its
    allow-list admits, and no cloud model (by its tag, or a remote_host in its entry or an
    upstream's list) unless it may use them. A key is not shown what it may not use."""
    if may_use(key):
        return lambda name, entry=None: key.allows_model(name)
    remote = current_app.extensions["upstreams"].remote_models()

    def keep(name, entry=None):
        if isinstance(entry, dict) and entry.get("remote_host"):
            return False
        return (key.allows_model(name) and not is_cloud_name(name)
                and plain(name) not in remote)

    return keep
