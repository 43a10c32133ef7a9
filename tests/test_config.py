"""Settings: defaults, the TOML file, the environment over the file, and clear errors.

Every call passes `environ` so the real environment cannot leak in; the tests that
rely on no file at all skip if /etc/ollama-gw/config.toml exists on the machine.
"""
from pathlib import Path

import pytest

from app.config import DEFAULT_CONFIG_FILE, ConfigError, load_settings


@pytest.fixture
def toml_file(tmp_path):
    """toml_file(text) -> path of a config file holding `text`."""

    def write(text, name="config.toml"):
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write


@pytest.fixture
def no_system_file():
    if Path(DEFAULT_CONFIG_FILE).exists():
        pytest.skip(f"{DEFAULT_CONFIG_FILE} exists on this machine")


def test_defaults_work_with_no_file_and_no_environment(no_system_file, tmp_path):
    settings = load_settings(environ={"HOME": str(tmp_path)})
    assert settings.upstreams == ("http://127.0.0.1:11434",)
    assert settings.upstream == "http://127.0.0.1:11434"
    assert settings.bind == "127.0.0.1:8080"
    assert settings.database_url == ""
    assert settings.resolved_database_url == (
        f"sqlite:///{tmp_path}/.local/share/ollama-gw/ollama-gw.db")


def test_the_default_database_does_not_depend_on_the_working_directory(
        no_system_file, tmp_path, monkeypatch):
    found = set()
    for where in (tmp_path, tmp_path / "elsewhere"):
        where.mkdir(exist_ok=True)
        monkeypatch.chdir(where)
        found.add(load_settings(environ={"HOME": "/home/alice"}).resolved_database_url)
    assert found == {"sqlite:////home/alice/.local/share/ollama-gw/ollama-gw.db"}


def test_the_default_data_dir_follows_xdg_data_home(no_system_file):
    settings = load_settings(environ={"XDG_DATA_HOME": "/srv/data", "HOME": "/home/alice"})
    assert settings.resolved_database_url == "sqlite:////srv/data/ollama-gw/ollama-gw.db"


@pytest.mark.parametrize("environ, named", [
    ({"OLLAMA_GW_DATA_DIR": "./data"}, "data_dir './data' is relative"),
    ({"DATABASE_URL": "sqlite:///data/gw.db"}, "relative SQLite path"),
])
def test_relative_database_locations_are_refused(environ, named):
    with pytest.raises(ConfigError, match=named):
        load_settings(environ=environ)


def test_sqlite_file_lives_in_the_data_dir(no_system_file, tmp_path):
    settings = load_settings(environ={"OLLAMA_GW_DATA_DIR": str(tmp_path / "var")})
    assert settings.resolved_database_url == f"sqlite:///{tmp_path}/var/ollama-gw.db"


def test_file_values_are_used(toml_file):
    path = toml_file(
        'bind = "0.0.0.0:9000"\n'
        "workers = 4\n"
        'upstreams = ["http://gpu1:11434", "http://gpu2:11434/"]\n'
        'database_url = "postgresql://gw@db/gw"\n'
        "legacy_apikey = false\n"
        'default_rate_limit_user = "7/minute"\n'
        "read_timeout = 30\n"
    )
    settings = load_settings(path=path, environ={})
    assert settings.bind == "0.0.0.0:9000"
    assert settings.workers == 4
    assert settings.upstreams == ("http://gpu1:11434", "http://gpu2:11434")
    assert settings.resolved_database_url == "postgresql://gw@db/gw"
    assert settings.legacy_apikey is False
    assert settings.default_rate_limit_user == "7/minute"
    assert settings.read_timeout == 30.0


@pytest.mark.parametrize("environ, attribute, expected", [
    ({"OLLAMA_GW_WORKERS": "5"}, "workers", 5),
    ({"OLLAMA_URL": "http://envhost:11434"}, "upstreams", ("http://envhost:11434",)),
    ({"DATABASE_URL": "sqlite:////tmp/env.db"}, "database_url", "sqlite:////tmp/env.db"),
    ({"OLLAMA_GW_DATABASE_URL": "sqlite:////tmp/env.db"}, "database_url", "sqlite:////tmp/env.db"),
    ({"OLLAMA_GW_UPSTREAMS": "http://a:1, http://b:2/"}, "upstreams",
     ("http://a:1", "http://b:2")),
    ({"OLLAMA_GW_BIND": "0.0.0.0:80"}, "bind", "0.0.0.0:80"),
    ({"OLLAMA_GW_LEGACY_APIKEY": "no"}, "legacy_apikey", False),
    ({"OLLAMA_GW_LEGACY_APIKEY": "ON"}, "legacy_apikey", True),
    ({"OLLAMA_GW_WORKERS": ""}, "workers", 3),  # empty means unset: the file's value stays
])
def test_environment_wins_over_the_file(toml_file, environ, attribute, expected):
    path = toml_file(
        "workers = 3\n"
        'upstreams = ["http://filehost:11434"]\n'
        'database_url = "sqlite:////tmp/file.db"\n'
        'bind = "127.0.0.1:9999"\n'
        "legacy_apikey = true\n"
    )
    assert getattr(load_settings(path=path, environ=environ), attribute) == expected


def test_config_file_can_be_named_in_the_environment(toml_file):
    path = toml_file("workers = 6\n")
    assert load_settings(environ={"OLLAMA_GW_CONFIG": path}).workers == 6


def test_explicit_path_wins_over_the_environment_file(toml_file):
    named = toml_file("workers = 6\n", name="named.toml")
    explicit = toml_file("workers = 9\n", name="explicit.toml")
    assert load_settings(path=explicit, environ={"OLLAMA_GW_CONFIG": named}).workers == 9


def test_overrides_win_over_everything(toml_file):
    path = toml_file("workers = 3\n")
    settings = load_settings(path=path, environ={"OLLAMA_GW_WORKERS": "5"},
                             overrides={"workers": 8})
    assert settings.workers == 8


@pytest.mark.parametrize("file_text, environ, named", [
    ("", {"OLLAMA_GW_WORKERS": "many"}, "workers"),
    ('workers = "many"\n', {}, "workers"),
    ("workers = 0\n", {}, "workers"),
    ("", {"OLLAMA_GW_LEGACY_APIKEY": "maybe"}, "legacy_apikey"),
    ('legacy_apikey = "maybe"\n', {}, "legacy_apikey"),
    ("wrokers = 2\n", {}, "wrokers"),
    ("workers = \n", {}, "TOML"),
    ("[server\nbind = 1\n", {}, "TOML"),
    ('bind = "127.0.0.1"\n', {}, "bind"),
    ("", {"OLLAMA_GW_BIND": "localhost:http"}, "bind"),
    ("", {"OLLAMA_GW_BIND": "localhost:70000"}, "bind"),
    ("", {"OLLAMA_URL": "ftp://x"}, "upstream"),
    ('upstreams = ["http://ok:1", "gpu2:11434"]\n', {}, "upstream"),
    ("", {"OLLAMA_GW_UPSTREAMS": " , "}, "upstreams"),
    ("", {"DATABASE_URL": "mysql://x"}, "database_url"),
    ('default_rate_limit_user = "lots"\n', {}, "default_rate_limit_user"),
    ("", {"OLLAMA_GW_DEFAULT_RATE_LIMIT_ADMIN": "0/hour"}, "default_rate_limit_admin"),
    ("", {"OLLAMA_GW_READ_TIMEOUT": "-1"}, "read_timeout"),
])
def test_bad_value_is_refused_naming_the_setting(toml_file, file_text, environ, named):
    path = toml_file(file_text)
    with pytest.raises(ConfigError, match=named):
        load_settings(path=path, environ=environ)


def test_bad_value_error_shows_the_value_and_the_environment_variable():
    with pytest.raises(ConfigError) as info:
        load_settings(path=None, environ={"OLLAMA_GW_WORKERS": "many", "OLLAMA_GW_CONFIG": ""})
    assert "'many'" in str(info.value)
    assert "OLLAMA_GW_WORKERS" in str(info.value)


def test_a_bad_value_in_the_file_names_the_file_not_an_environment_variable(toml_file):
    path = toml_file('workers = "many"\nbind = 8080\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path=path, environ={})
    assert f"workers in {path} must be int, got 'many'" in str(info.value)
    assert "OLLAMA_GW_" not in str(info.value)


@pytest.mark.parametrize("text", ["bind = 8080\n", "upstreams = 5\n", "log_level = 1\n"])
def test_a_number_where_text_belongs_is_refused(toml_file, text):
    with pytest.raises(ConfigError, match=text.split()[0]):
        load_settings(path=toml_file(text), environ={})


def test_cors_origins_must_be_origins(toml_file):
    ok = load_settings(path=toml_file('cors_origins = ["https://chat.example.com", '
                                      '"http://localhost:*"]\n'), environ={})
    assert ok.cors_origins == ("https://chat.example.com", "http://localhost:*")
    with pytest.raises(ConfigError, match="cors_origins"):
        load_settings(environ={"OLLAMA_GW_CORS_ORIGINS": "chat.example.com"})


def test_the_example_config_lists_every_setting_at_its_default(tmp_path):
    import tomllib

    from app.config import FIELDS, Settings, example_config

    text = example_config()
    uncommented = "\n".join(line[2:] for line in text.splitlines()
                            if line.startswith("# ") and " = " in line)
    values = tomllib.loads(uncommented)
    assert set(values) == set(FIELDS)
    for name, value in values.items():
        default = getattr(Settings(), name)
        assert (tuple(value) if isinstance(value, list) else value) == default, name


def test_unknown_file_setting_lists_the_known_ones(toml_file):
    with pytest.raises(ConfigError) as info:
        load_settings(path=toml_file("wrokers = 2\n"), environ={})
    assert "workers" in str(info.value).split("known:")[1]


def test_missing_config_file_is_an_error_naming_it(tmp_path):
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="nope.toml"):
        load_settings(path=missing, environ={})


def test_a_fractional_number_for_a_whole_number_setting_is_refused(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("workers = 2.5\n")
    with pytest.raises(ConfigError, match="workers"):
        load_settings(path=str(path), environ={})


def test_upstreams_can_be_named_weighted_and_capped(toml_file):
    from app.config import UpstreamSpec

    path = toml_file('[[upstreams]]\nurl = "http://gpu1:11434/"\nname = "gpu1"\nweight = 2\n'
                     'max_concurrent = 2\n\n[[upstreams]]\nurl = "http://gpu2:11434"\n'
                     '\n[[upstreams]]\nurl = "http://gpu3:11434"\nmax_concurrent = 0\n')
    assert load_settings(path=path, environ={}).upstream_specs == (
        UpstreamSpec("gpu1", "http://gpu1:11434", 2.0, 2),
        UpstreamSpec("gpu2:11434", "http://gpu2:11434", 1.0, 4),  # upstream_max_concurrent
        UpstreamSpec("gpu3:11434", "http://gpu3:11434", 1.0, None))  # 0: no cap
    from_env = load_settings(environ={"OLLAMA_GW_UPSTREAMS": "big=http://a:1, http://b:2"})
    assert [(s.name, s.url) for s in from_env.upstream_specs] == [
        ("big", "http://a:1"), ("b:2", "http://b:2")]


@pytest.mark.parametrize("text, fragment", [
    ('[[upstreams]]\nurl = "http://a:1"\nweight = 0\n', "weight must be a positive number"),
    ('[[upstreams]]\nurl = "http://a:1"\nmax_concurrent = -1\n', "max_concurrent"),
    ('[[upstreams]]\nurl = "http://a:1"\nport = 3\n', "unknown field(s) port"),
    ('[[upstreams]]\nname = "x"\n', "must be a URL or a table with a url"),
    ('upstreams = ["a=http://x:1", "a=http://y:2"]\n', "upstream names must differ"),
])
def test_bad_upstream_tables_are_refused(toml_file, text, fragment):
    with pytest.raises(ConfigError) as caught:
        load_settings(path=toml_file(text), environ={})
    assert fragment in str(caught.value)


@pytest.mark.parametrize("environ, origin", [
    ({"OLLAMA_GW_DEFAULT_RATE_LIMIT_USER": "5/fortnight"},
     "default_rate_limit_user set by OLLAMA_GW_DEFAULT_RATE_LIMIT_USER"),
    ({"OLLAMA_URL": "notaurl"}, "upstreams set by OLLAMA_URL"),
    ({"OLLAMA_BASE_URL": "notaurl"}, "upstreams set by OLLAMA_BASE_URL"),
    ({"OLLAMA_GW_WORKERS": "0"}, "workers set by OLLAMA_GW_WORKERS"),
    ({"DATABASE_URL": "mysql://x"}, "database_url set by DATABASE_URL"),
    ({"OLLAMA_GW_LOG_LEVEL": "loud"}, "log_level set by OLLAMA_GW_LOG_LEVEL"),
    ({"OLLAMA_GW_WEBHOOK_CONCURRENCY": "0"}, "webhook_concurrency set by "
     "OLLAMA_GW_WEBHOOK_CONCURRENCY"),
    ({"OLLAMA_GW_DATA_DIR": "./data"}, "data_dir set by OLLAMA_GW_DATA_DIR"),
    ({"HOME": "relative/home"}, "data_dir is the default"),  # the default data_dir is relative
])
def test_an_environment_or_default_value_refused_names_where_it_came_from(
        no_system_file, environ, origin):
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=environ)
    assert str(caught.value).endswith(f" ({origin})")


@pytest.mark.parametrize("text, origin", [
    ('default_rate_limit_user = "5/fortnight"\n', "default_rate_limit_user"),
    ('upstreams = ["notaurl"]\n', "upstreams"),
    ("read_timeout = -1\n", "read_timeout"),
    ('model_policy = "maybe"\n', "model_policy"),
    ('bind = "127.0.0.1"\n', "bind"),
    ('data_dir = "/srv/gw"\ndatabase_url = "sqlite:///gw.db"\n', "database_url"),
])
def test_a_file_value_refused_names_the_file_and_the_key(toml_file, text, origin):
    path = toml_file(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path=path, environ={})
    assert str(caught.value).endswith(f" ({origin} set in {path})")


@pytest.mark.parametrize("overrides, origin", [
    ({"bind": "nohost"}, "bind"), ({"upstreams": "notaurl"}, "upstreams")])
def test_a_command_line_value_refused_says_so(overrides, origin):
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"OLLAMA_GW_BIND": "127.0.0.1:1"}, overrides=overrides)
    assert str(caught.value).endswith(f" ({origin} set on the command line)")


@pytest.mark.parametrize(("written", "read"), [
    ('"gpu_time"', "gpu_time"), ('"requests"', "requests"), ('"off"', "off"),
    ('"GPU_TIME"', "gpu_time"), ("true", "gpu_time"), ("false", "off")])
def test_queue_fair_takes_its_modes_and_the_booleans_it_once_was(toml_file, written, read):
    path = toml_file(f"queue_fair = {written}\n")
    assert load_settings(path=path, environ={}).queue_fair == read


@pytest.mark.parametrize(("variable", "read"), [
    ("requests", "requests"), ("true", "gpu_time"), ("false", "off"), ("0", "off")])
def test_queue_fair_from_the_environment(no_system_file, variable, read):
    assert load_settings(environ={"OLLAMA_GW_QUEUE_FAIR": variable}).queue_fair == read


@pytest.mark.parametrize("written", ['"fair"', "1.5", '"gpu-time"', '""'])
def test_queue_fair_refuses_anything_else_naming_the_modes(toml_file, written):
    with pytest.raises(ConfigError, match="queue_fair must be one of gpu_time, requests, off"):
        load_settings(path=toml_file(f"queue_fair = {written}\n"), environ={})


def test_queue_fair_defaults_to_gpu_time(no_system_file, tmp_path):
    assert load_settings(environ={"HOME": str(tmp_path)}).queue_fair == "gpu_time"
