"""Every setting once, with its default and what it means.

Precedence: environment (``OLLAMA_GW_<NAME>``, plus the familiar ``OLLAMA_URL`` (or
ollama-api-service's ``OLLAMA_BASE_URL``) and ``DATABASE_URL``) over the TOML file over
the defaults below. The file is the one named
by ``--config`` / ``OLLAMA_GW_CONFIG``, else ``/etc/ollama-gw/config.toml`` when it exists.
"""
import dataclasses
import functools
import ipaddress
import os
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_CONFIG_FILE = "/etc/ollama-gw/config.toml"


class ConfigError(Exception):
    """A setting is missing, malformed or contradictory; the message names it.

    `setting`: the one at fault, when one is; load_settings then says where its value came
    from (an environment variable, the file and key, the command line, or the default).
    """

    def __init__(self, message, setting=None):
        super().__init__(message)
        self.setting = setting


def setting(default, help):
    """A Settings field whose help text the docs and the packaged config file are made from."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Settings:
    data_dir: str = setting(
        "", "Directory of the SQLite database when database_url is empty. Must be absolute; "
        "empty means $XDG_DATA_HOME/ollama-gw (~/.local/share/ollama-gw), the same for every "
        "command run by the same user, wherever it runs.")
    database_url: str = setting(
        "", "sqlite:////absolute/path.db or postgresql://user:pass@host:5432/db; empty means "
        "SQLite in data_dir. Use PostgreSQL to run several gateway instances.")
    database_pool_size: int = setting(
        16, "Database connections per worker. A request holds one only while its key is "
        "checked and counted, never while it waits on Ollama.")
    upstreams: tuple = setting(
        ("http://127.0.0.1:11434",), "Ollama servers: URLs, or tables with url and optional "
        "name, weight (share of requests, default 1), max_concurrent (requests it serves at "
        "once; default upstream_max_concurrent), parallel (the slots of an upstream without "
        "a cap, for GPU time; default 1) and gpu_cost (what its GPU second counts for; "
        "default 1.0). The environment takes a comma-separated list of URLs or NAME=URL; "
        "OLLAMA_URL one.")
    upstream_max_concurrent: int = setting(
        4, "Requests each upstream serves at once unless its table says otherwise: match "
        "Ollama's OLLAMA_NUM_PARALLEL (4, or 1 on a small GPU). More wait in the gateway's "
        "fair queue, shared by every worker and instance. 0: no cap, Ollama queues them.")
    queue_per_key: int = setting(
        64, "Requests one key may have waiting for one upstream; more get 429.")
    queue_fair: str = setting(
        "gpu_time", "How waiting requests share an upstream: gpu_time (keys get equal GPU "
        "time, weighted by key priority), requests (equal numbers of requests), off (first "
        "come, first served, as Ollama does). true and false still read as gpu_time and off.")
    queue_max_wait_seconds: float = setting(
        300.0, "Longest a request waits in the queue for a slot before it gets 503.")
    upstream_refresh_seconds: float = setting(
        5.0, "How often each worker re-reads every upstream's models and loaded models; an "
        "upstream that fails is retried after 1 s, then twice as long each time, up to 60 s.")
    bind: str = setting("127.0.0.1:8080", "HOST:PORT to listen on.")
    workers: int = setting(2, "gunicorn gevent worker processes; one per core is right.")
    graceful_timeout: int = setting(
        60, "Seconds in-flight requests, streams included, get to finish on SIGTERM or reload.")
    connect_timeout: float = setting(
        5.0, "Seconds to open a connection to Ollama before answering 504.")
    read_timeout: float = setting(
        600.0, "Seconds of silence from Ollama before answering 504 (model loads take minutes).")
    client_body_timeout: float = setting(
        60.0, "Seconds a client may pause while sending its request body before the gateway "
        "answers 408 and closes the connection.")
    client_send_timeout: float = setting(
        60.0, "Seconds a client may leave the answer unread (its connection open, reading "
        "nothing) before the gateway closes it and stops Ollama's work for it.")
    max_body_bytes: int = setting(
        64 * 1024 * 1024, "Largest request body in bytes, as sent and once decompressed; "
        "larger gets 413. Blob uploads are exempt and streamed.")
    max_unauthenticated_body_bytes: int = setting(
        1024 * 1024, "Most bytes of body read to find a legacy `apikey` field when no key "
        "came in a header; a larger body must carry its key in a header or the query.")
    legacy_apikey: bool = setting(
        True, "Also accept the key as an `apikey` JSON field or query parameter (go-ollama-api).")
    open_unknown_paths: bool = setting(
        False, "Relay /api and /v1 paths the gateway does not know for every key. Off: for "
        "admin keys only, since a new Ollama endpoint may act on the server itself. Ollama's "
        "account endpoints (/api/me, /api/signout, …) are for admin keys either way.")
    cloud_default: str = setting(
        "role", "Whether keys whose cloud setting is `default` may use Ollama's cloud models "
        "(`:cloud`, `-cloud`, remote_host) and web search, which run on ollama.com and spend "
        "the server owner's plan: role (admin keys yes, user keys no), allow or deny. A key's "
        "own --cloud allow|deny wins.")
    model_policy: str = setting(
        "refuse", "What happens to a request over its key's caps (--max-ctx, --max-predict, "
        "--keep-alive deny): refuse (403 saying why) or clamp (sent at the cap).")
    cors_origins: tuple = setting(
        (), "Browser origins allowed to call the gateway (CORS), like OLLAMA_ORIGINS: e.g. "
        "[\"https://chat.example.com\", \"http://localhost:*\"]. Empty: none.")
    auto_migrate: bool = setting(
        True, "Apply pending migrations when `serve` (or any CLI command) starts.")
    default_rate_limit_user: str = setting(
        "100/hour", "Rate limit of new user keys that name none (N/second|minute|hour|day).")
    default_rate_limit_admin: str = setting(
        "1000/hour", "Rate limit of new admin keys that name none.")
    key_cache_seconds: float = setting(
        1.0, "How long a worker trusts its cached view of a key: a revoked key stops working "
        "within this.")
    slot_lease_seconds: int = setting(
        60, "A concurrency slot not renewed for this long (its gateway instance died) is free "
        "again; a crashed worker's are freed as soon as gunicorn replaces it.")
    quota_warning_share: float = setting(
        0.8, "Share of a key's token quota (0 < share <= 1) whose use sends the quota.warning "
        "webhook event, once per key and quota period.")
    gpu_load_charge: str = setting(
        "request", "Who is charged a model load's GPU time (Ollama's load_duration): request "
        "(the request that caused it) or spread (shared evenly by the next "
        "gpu_load_spread_requests requests of that model on that upstream, in each worker).")
    gpu_load_spread_requests: int = setting(
        10, "How many requests share a model load's GPU time when gpu_load_charge is spread.")
    gpu_quota_estimate_seconds: float = setting(
        60.0, "Seconds of an upstream's slot a request to a --gpu-quota key reserves when its "
        "key has no recent request of that model to estimate from (divided by the "
        "upstream's slots and multiplied by its gpu_cost, as GPU time is).")
    webhook_timeout: float = setting(
        10.0, "Seconds one webhook delivery attempt may take, from connecting to the "
        "receiver's answer; a slower attempt counts as failed and is retried.")
    webhook_concurrency: int = setting(
        8, "Webhook deliveries each worker sends at once; others wait their turn. Client "
        "requests never wait on them.")
    webhook_retry_seconds: tuple = setting(
        (5, 300, 1800, 7200, 18000, 36000, 36000), "Seconds before each retry of a failed "
        "webhook delivery (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: eight attempts over "
        "about 27 hours); after the last the delivery is marked failed. [] never retries.")
    # Link-local (every cloud's 169.254.169.254, AWS ECS's 169.254.170.2, IPv6 fe80::), and
    # the metadata services elsewhere: AWS over IPv6, Alibaba, Azure's WireServer, Oracle's
    # older endpoint.
    webhook_deny_networks: tuple = setting(
        ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32",
         "168.63.129.16/32", "192.0.0.192/32"), "Networks (CIDR) webhooks may never be sent "
        "to, checked when a webhook is added and on every address its host resolves to at "
        "each attempt: link-local and the clouds' metadata services by default. Loopback "
        "and private ranges are allowed, for receivers on the LAN; add them to refuse them.")
    log_level: str = setting("info", "debug, info, warning, error or critical.")
    access_log: bool = setting(
        True, "Write one JSON line per relayed request to stderr (key prefix, model, status, "
        "timings, tokens; never a key or prompt text).")
    usage_flush_seconds: float = setting(
        0.25, "How often usage records are written to the database (also whenever 200 are "
        "waiting).")
    usage_buffer_records: int = setting(
        100_000, "Usage records a worker keeps in memory while the database is away; past "
        "this the oldest are dropped and counted (ollama_gw_usage_dropped_records).")
    metrics_public: bool = setting(
        False, "Serve /metrics without a key. Off: Prometheus must send an admin key.")
    ui: bool = setting(
        False, "Serve the web dashboard at /ui/ (sign in with a key). Off: /ui/ answers 404.")
    ui_session_hours: float = setting(
        12.0, "Hours a dashboard sign-in lasts; a revoked or rotated key ends it sooner.")
    trusted_proxies: tuple = setting(
        (), "Addresses or networks (CIDR) of reverse proxies whose X-Forwarded-For header is "
        "believed, e.g. [\"127.0.0.1\", \"10.0.0.0/8\"]. The client's address (sign-in "
        "throttle, access log, audit log) is then the last one in it that is not such a "
        "proxy. Empty: the connection's own address; the header is ignored.")
    ui_secret: str = setting(
        "", "Signs dashboard session cookies. Empty: one is made and kept in data_dir/"
        "ui-secret; give every instance the same one when several serve the dashboard.")

    @property
    def resolved_data_dir(self):
        """The data directory: the setting, or the user's XDG data directory."""
        return Path(self.data_dir or default_data_dir(os.environ)).expanduser()

    @property
    def resolved_database_url(self):
        """The database URL, defaulting to a SQLite file in the data directory."""
        if self.database_url:
            return self.database_url
        return "sqlite:///" + str(self.resolved_data_dir / "ollama-gw.db")

    @property
    def upstream_specs(self):
        """The upstreams as UpstreamSpecs, however they were written."""
        return tuple(parse_upstream(entry, self.upstream_max_concurrent)
                     for entry in self.upstreams)

    @property
    def upstream(self):
        """The first upstream's URL (for the single-upstream case and messages)."""
        return self.upstream_specs[0].url


@dataclasses.dataclass(frozen=True)
class UpstreamSpec:
    """One Ollama server as configured."""

    name: str
    url: str
    weight: float = 1.0
    max_concurrent: int | None = None  # None: no cap, Ollama queues
    parallel: int = 1  # the slots of an upstream without a cap (app/accounting/gpu.py)
    gpu_cost: float = 1.0  # what one of its GPU seconds counts for

    @property
    def slots(self):
        """How many requests share its GPU: a GPU second is this many slot-seconds."""
        return self.max_concurrent or self.parallel


UPSTREAM_FIELDS = ("url", "name", "weight", "max_concurrent", "parallel", "gpu_cost")


def parse_upstream(entry, default_cap=0):
    """An UpstreamSpec from a URL, `name=URL`, or a TOML table; ConfigError if malformed."""
    if isinstance(entry, UpstreamSpec):
        return entry
    if isinstance(entry, str):
        name, sep, url = entry.partition("=")
        entry = {"name": name.strip(), "url": url.strip()} if sep and "://" not in name \
            else {"url": entry.strip()}
    if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
        raise ConfigError(f"upstream {entry!r} must be a URL or a table with a url")
    unknown = set(entry) - set(UPSTREAM_FIELDS)
    if unknown:
        raise ConfigError(f"upstream {entry['url']!r}: unknown field(s) "
                          f"{', '.join(sorted(unknown))}; known: {', '.join(UPSTREAM_FIELDS)}")
    url = entry["url"].rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"upstream {url!r} must be an http:// or https:// URL")
    weight, cap = entry.get("weight", 1.0), entry.get("max_concurrent")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
        raise ConfigError(f"upstream {url!r}: weight must be a positive number")
    if cap is None:
        cap = default_cap
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
        raise ConfigError(f"upstream {url!r}: max_concurrent must be a whole number, 0 (no "
                          "cap) or more")
    parallel, cost = entry.get("parallel", 1), entry.get("gpu_cost", 1.0)
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"upstream {url!r}: parallel must be a whole number, 1 or more")
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not 0 <= cost < 1e6:
        raise ConfigError(f"upstream {url!r}: gpu_cost must be a number, 0 or more")
    name = str(entry.get("name") or parts.netloc)
    return UpstreamSpec(name, url, float(weight), cap or None, parallel, float(cost))


ENV_PREFIX = "OLLAMA_GW_"
FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def default_data_dir(environ):
    """$XDG_DATA_HOME/ollama-gw, else ~/.local/share/ollama-gw: per user, not per directory."""
    xdg = environ.get("XDG_DATA_HOME", "")
    if not os.path.isabs(xdg):  # the XDG spec says to ignore a relative value
        home = environ.get("HOME") or os.path.expanduser("~")
        xdg = os.path.join(home, ".local", "share")
    return os.path.join(xdg, "ollama-gw")


def load_settings(path=None, environ=None, overrides=None):
    """Build Settings from defaults, the TOML file, the environment and explicit overrides."""
    environ = os.environ if environ is None else environ
    values = {}  # name -> (value, where it came from, for error messages)
    path = path or environ.get(ENV_PREFIX + "CONFIG")
    if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        path = DEFAULT_CONFIG_FILE
    if path:
        values.update({name: (value, f"in {path}") for name, value in _read_toml(path).items()})
    values.update(_read_env(environ))
    values.update({name: (value, "on the command line")
                   for name, value in (overrides or {}).items()})
    if not values.get("data_dir", ("",))[0]:
        values["data_dir"] = (default_data_dir(environ), "")
    settings = Settings(**{name: _coerce(name, value, source)
                           for name, (value, source) in values.items()})
    try:
        validate(settings)
    except ConfigError as exc:
        if exc.setting is None:
            raise
        raise ConfigError(f"{exc} ({_origin(exc.setting, values)})", exc.setting) from None
    return settings


def _origin(name, values):
    """Where the value of setting `name` came from, as a message says it."""
    if name == "database_url" and not values.get("database_url", ("",))[0]:
        name = "data_dir"  # the database is the default one in data_dir
    source = values.get(name, (None, ""))[1]
    if not source:
        return f"{name} is the default"
    if source.startswith("("):
        return f"{name} set by {source[1:-1]}"  # the environment variable
    return f"{name} set {source}"  # in the file, or on the command line


def _read_toml(path):
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path} cannot be read by this user") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(FIELDS)}"
        )
    return data


def _read_env(environ):
    values = {}
    # OLLAMA_BASE_URL is ollama-api-service's name; OLLAMA_URL wins when both are set.
    for familiar, name in (("OLLAMA_BASE_URL", "upstreams"), ("OLLAMA_URL", "upstreams"),
                           ("DATABASE_URL", "database_url")):
        if environ.get(familiar):
            values[name] = (environ[familiar], f"({familiar})")
    for name in FIELDS:
        variable = ENV_PREFIX + name.upper()
        raw = environ.get(variable)
        if raw is not None and raw != "":
            values[name] = (raw, f"({variable})")
    return values


def _coerce(name, value, source=""):
    """Turn a TOML or environment value into the type of the setting's default."""
    default = FIELDS[name].default
    label = f"{name} {source}".strip()
    try:
        if name == "queue_fair":
            return _queue_fair(value)
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if name == "upstreams":  # URLs, NAME=URL, or tables: parse_upstream() judges each
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise ValueError(value)
            return tuple(item.strip().rstrip("/") if isinstance(item, str) else item
                         for item in items if not isinstance(item, str) or item.strip())
        if isinstance(default, tuple):
            if not isinstance(value, (str, list, tuple)):
                raise ValueError(value)
            items = value.split(",") if isinstance(value, str) else list(value)
            if default and all(isinstance(item, (int, float)) for item in default):
                return _numbers(items)
            return tuple(str(item).strip().rstrip("/") for item in items if str(item).strip())
        if isinstance(default, (int, float)) and isinstance(value, bool):
            raise ValueError(value)
        if isinstance(default, int) and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)  # int(2.5) would quietly make it 2
        if isinstance(default, str) and not isinstance(value, str):
            raise ValueError(value)  # a TOML number where a string belongs is a mistake
        return type(default)(value)
    except (TypeError, ValueError):
        kind = "a list" if isinstance(default, tuple) else type(default).__name__
        if isinstance(default, tuple) and default and not isinstance(default[0], str):
            kind = "a list of numbers"
        raise ConfigError(f"setting {label} must be {kind}, got {value!r}") from None


QUEUE_FAIR = ("gpu_time", "requests", "off")


def _queue_fair(value):
    """queue_fair: one of QUEUE_FAIR; the booleans of earlier releases as gpu_time and off."""
    lowered = str(value).strip().lower()
    if value is True or lowered in ("1", "true", "yes", "on"):
        return "gpu_time"
    if value is False or lowered in ("0", "false", "no"):
        return "off"
    if lowered in QUEUE_FAIR and not isinstance(value, (int, float)):
        return lowered
    raise ConfigError(f"setting queue_fair must be one of {', '.join(QUEUE_FAIR)} (true and "
                      f"false read as gpu_time and off), got {value!r}", "queue_fair")


def _numbers(items):
    """A list of numbers from TOML or `5,300,1800` in the environment; never bools."""
    if any(isinstance(item, bool) for item in items):
        raise ValueError(items)
    return tuple(float(item) for item in items if str(item).strip())


def validate(settings):
    """Reject settings that would only fail later, naming the setting and the fix."""
    from app.limits import parse_rate_limit  # local: config must not import app at load

    if not settings.upstreams:
        raise ConfigError("upstreams is empty: set OLLAMA_URL or OLLAMA_GW_UPSTREAMS",
                          "upstreams")
    if settings.upstream_max_concurrent < 0:  # before the upstreams it is the default of
        raise ConfigError("upstream_max_concurrent must be 0 (no cap) or more",
                          "upstream_max_concurrent")
    try:
        names = [spec.name for spec in settings.upstream_specs]
    except ConfigError as exc:
        raise ConfigError(str(exc), "upstreams") from None
    if len(set(names)) != len(names):
        raise ConfigError(f"upstream names must differ: {', '.join(names)} (give each a name)",
                          "upstreams")
    if settings.upstream_refresh_seconds <= 0:
        raise ConfigError("upstream_refresh_seconds must be a positive number of seconds",
                          "upstream_refresh_seconds")
    if settings.data_dir and not Path(settings.data_dir).expanduser().is_absolute():
        raise ConfigError(
            f"data_dir {settings.data_dir!r} is relative: give an absolute path, so that "
            "the server and every command find the same database wherever they run",
            "data_dir")
    try:
        _validate_database_url(settings.resolved_database_url)
    except ConfigError as exc:
        raise ConfigError(str(exc), "database_url") from None
    host, _, port = settings.bind.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"bind {settings.bind!r} must be HOST:PORT, e.g. 127.0.0.1:8080",
                          "bind")
    for name in ("workers", "graceful_timeout", "max_body_bytes", "slot_lease_seconds",
                 "database_pool_size", "max_unauthenticated_body_bytes",
                 "usage_buffer_records", "queue_per_key"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(settings, name)}", name)
    for name in ("connect_timeout", "read_timeout", "client_body_timeout",
                 "client_send_timeout", "usage_flush_seconds", "queue_max_wait_seconds"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{name} must be a positive number of seconds", name)
    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"log_level {settings.log_level!r} must be one of debug, info, "
                          "warning, error, critical", "log_level")
    for name in ("default_rate_limit_user", "default_rate_limit_admin"):
        try:
            parse_rate_limit(getattr(settings, name))
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}", name) from None
    if not 0 < settings.quota_warning_share <= 1:
        raise ConfigError(f"quota_warning_share must be a share above 0 and at most 1, "
                          f"not {settings.quota_warning_share}", "quota_warning_share")
    if settings.cloud_default not in ("role", "allow", "deny"):
        raise ConfigError(f"cloud_default must be role, allow or deny, not "
                          f"{settings.cloud_default!r}", "cloud_default")
    if settings.model_policy not in ("refuse", "clamp"):
        raise ConfigError(f"model_policy must be refuse or clamp, not {settings.model_policy!r}",
                          "model_policy")
    for origin in settings.cors_origins:
        if origin != "*" and not urlsplit(origin).scheme:
            raise ConfigError(f"cors_origins entry {origin!r} must be an origin like "
                              "https://chat.example.com, a pattern like http://localhost:*, "
                              "or *", "cors_origins")
    for entry in settings.trusted_proxies:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError(f"trusted_proxies entry {entry!r} must be an address or a "
                              "network, e.g. 127.0.0.1 or 10.0.0.0/8", "trusted_proxies") from None
    if settings.ui_session_hours <= 0:
        raise ConfigError("ui_session_hours must be a positive number of hours",
                          "ui_session_hours")
    if settings.gpu_load_charge not in ("request", "spread"):
        raise ConfigError(f"gpu_load_charge must be request or spread, not "
                          f"{settings.gpu_load_charge!r}", "gpu_load_charge")
    if settings.gpu_load_spread_requests < 1:
        raise ConfigError("gpu_load_spread_requests must be 1 or more",
                          "gpu_load_spread_requests")
    if not 0 < settings.gpu_quota_estimate_seconds < 86400:
        raise ConfigError("gpu_quota_estimate_seconds must be a positive number of seconds "
                          "under a day", "gpu_quota_estimate_seconds")
    if settings.webhook_timeout <= 0:
        raise ConfigError("webhook_timeout must be a positive number of seconds",
                          "webhook_timeout")
    if not 1 <= settings.webhook_concurrency <= 1000:
        raise ConfigError("webhook_concurrency must be 1 to 1000, got "
                          f"{settings.webhook_concurrency}", "webhook_concurrency")
    try:
        parse_networks(settings.webhook_deny_networks)
    except ValueError as exc:
        raise ConfigError(f"webhook_deny_networks: {exc}", "webhook_deny_networks") from None
    if any(not 0 < seconds < 10**7 for seconds in settings.webhook_retry_seconds):
        raise ConfigError("webhook_retry_seconds must be positive numbers of seconds (each "
                          "under 10 million), e.g. [5, 300, 1800]", "webhook_retry_seconds")


@functools.lru_cache(maxsize=8)
def parse_networks(items):
    """`webhook_deny_networks` as ip_networks, or a ValueError naming the bad entry.

    Here, with the setting it reads, so that validating settings needs nothing above
    config; app/webhooks/target.py checks addresses against what it returns.
    """
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not a network: write CIDR, e.g. 169.254.0.0/16 "
                             "or fe80::/10") from None
    return tuple(networks)


def _validate_database_url(url):
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0]
    if scheme not in ("sqlite", "postgres", "postgresql"):
        raise ConfigError(
            f"database_url scheme {scheme!r} is not supported: use sqlite:////ABSOLUTE/PATH "
            "or postgresql://USER@HOST/DB"
        )
    if scheme == "sqlite":
        path = url.split("://", 1)[1][1:] if "://" in url else ""
        if path != ":memory:" and not path.startswith("/"):
            raise ConfigError(
                f"database_url {url!r} names a relative SQLite path, which would depend on "
                "the directory each command runs in: use four slashes and an absolute path, "
                "e.g. sqlite:////var/lib/ollama-gw/ollama-gw.db"
            )


def example_config():
    """A TOML file with every setting commented out at its default, each with its help."""
    import json
    import textwrap

    lines = ["# ollama-gw configuration. Every setting is shown at its default; uncomment",
             "# one to change it. Environment variables OLLAMA_GW_<NAME> override this file.",
             ""]
    for name, field in FIELDS.items():
        lines += textwrap.wrap(field.metadata["help"], 88, initial_indent="# ",
                               subsequent_indent="# ")
        default = list(field.default) if isinstance(field.default, tuple) else field.default
        lines += [f"# {name} = {json.dumps(default)}", ""]
    return "\n".join(lines)
