"""Every setting once, with its default.

Precedence: environment (``OLLAMA_GW_<NAME>``, plus the familiar ``OLLAMA_URL`` and
``DATABASE_URL``) over the TOML file over the defaults below. The file is the one named
by ``--config`` / ``OLLAMA_GW_CONFIG``, else ``/etc/ollama-gw/config.toml`` when it exists.
"""
import dataclasses
import os
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_CONFIG_FILE = "/etc/ollama-gw/config.toml"


class ConfigError(Exception):
    """A setting is missing, malformed or contradictory; the message names it."""


@dataclasses.dataclass(frozen=True)
class Settings:
    # Where the SQLite database lives when DATABASE_URL is not set.
    data_dir: str = "./data"
    # sqlite:///path or postgresql://user@host/db; empty means SQLite in data_dir.
    database_url: str = ""
    # Database connections per worker. A request holds one only while it is checked and
    # counted (about a millisecond), never while it waits on Ollama.
    database_pool_size: int = 16
    # Ollama servers, tried in order; OLLAMA_URL sets a single one.
    upstreams: tuple = ("http://127.0.0.1:11434",)
    # host:port gunicorn listens on.
    bind: str = "127.0.0.1:8080"
    # gunicorn worker processes (gevent: each holds thousands of streams).
    workers: int = 2
    # Seconds in-flight requests get to finish after SIGTERM / reload.
    graceful_timeout: int = 60
    # Seconds to open a TCP connection to Ollama before answering 504.
    connect_timeout: float = 5.0
    # Seconds of upstream silence before 504; generous because model loads take minutes.
    read_timeout: float = 600.0
    # Largest request body accepted (blob uploads to /api/blobs are exempt), in bytes.
    max_body_bytes: int = 64 * 1024 * 1024
    # Accept the key as an `apikey` JSON field or query parameter (the Go seed's way).
    legacy_apikey: bool = True
    # Apply pending migrations when `serve` starts.
    auto_migrate: bool = True
    # Rate limit given to new keys that do not name one (N/second|minute|hour|day).
    default_rate_limit_user: str = "100/hour"
    default_rate_limit_admin: str = "1000/hour"
    # How long a worker trusts its cached view of a key (a revocation takes this long).
    key_cache_seconds: float = 1.0
    # A concurrency slot not renewed for this long is free again (crashed worker).
    slot_lease_seconds: int = 60
    # Python logging level name.
    log_level: str = "info"

    @property
    def resolved_database_url(self):
        """The database URL, defaulting to a SQLite file in the data directory."""
        if self.database_url:
            return self.database_url
        return "sqlite:///" + str(Path(self.data_dir).resolve() / "ollama-gw.db")

    @property
    def upstream(self):
        """The first upstream: the one requests go to until fail-over exists."""
        return self.upstreams[0]


ENV_PREFIX = "OLLAMA_GW_"
FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def load_settings(path=None, environ=None, overrides=None):
    """Build Settings from defaults, the TOML file, the environment and explicit overrides."""
    environ = os.environ if environ is None else environ
    values = {}
    path = path or environ.get(ENV_PREFIX + "CONFIG")
    if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        path = DEFAULT_CONFIG_FILE
    if path:
        values.update(_read_toml(path))
    values.update(_read_env(environ))
    values.update(overrides or {})
    settings = Settings(**{name: _coerce(name, value) for name, value in values.items()})
    validate(settings)
    return settings


def _read_toml(path):
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
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
    if environ.get("OLLAMA_URL"):
        values["upstreams"] = environ["OLLAMA_URL"]
    if environ.get("DATABASE_URL"):
        values["database_url"] = environ["DATABASE_URL"]
    for name in FIELDS:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = raw
    return values


def _coerce(name, value):
    """Turn a TOML or environment value into the type of the setting's default."""
    default = FIELDS[name].default
    label = f"{name} ({ENV_PREFIX}{name.upper()})"
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(item).strip().rstrip("/") for item in items if str(item).strip())
        if isinstance(default, (int, float)) and isinstance(value, bool):
            raise ValueError(value)
        if isinstance(default, int) and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)  # int(2.5) would quietly make it 2
        return type(default)(value)
    except (TypeError, ValueError):
        kind = "a list" if isinstance(default, tuple) else type(default).__name__
        raise ConfigError(f"setting {label} must be {kind}, got {value!r}") from None


def validate(settings):
    """Reject settings that would only fail later, naming the setting and the fix."""
    from app.limits import parse_rate_limit  # local: config must not import app at load

    if not settings.upstreams:
        raise ConfigError("upstreams is empty: set OLLAMA_URL or OLLAMA_GW_UPSTREAMS")
    for url in settings.upstreams:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"upstream {url!r} must be an http:// or https:// URL")
    scheme = urlsplit(settings.resolved_database_url).scheme.split("+")[0]
    if scheme not in ("sqlite", "postgres", "postgresql"):
        raise ConfigError(
            f"database_url scheme {scheme!r} is not supported: use sqlite:///PATH "
            "or postgresql://USER@HOST/DB"
        )
    host, _, port = settings.bind.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"bind {settings.bind!r} must be HOST:PORT, e.g. 127.0.0.1:8080")
    for name in ("workers", "graceful_timeout", "max_body_bytes", "slot_lease_seconds",
                 "database_pool_size"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(settings, name)}")
    for name in ("connect_timeout", "read_timeout"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{name} must be a positive number of seconds")
    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"log_level {settings.log_level!r} must be one of debug, info, "
                          "warning, error, critical")
    for name in ("default_rate_limit_user", "default_rate_limit_admin"):
        try:
            parse_rate_limit(getattr(settings, name))
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
