"""`ollama-gw config example`: the file the Debian package ships as /etc/ollama-gw/config.toml."""
import tomllib

import pytest
from click.testing import CliRunner

from app.config import example_config, load_settings
from cli import cli


def run(*args):
    return CliRunner().invoke(cli, ["config", "example", *args], catch_exceptions=False)


def test_example_without_changes_is_the_commented_defaults():
    result = run()
    assert result.exit_code == 0
    assert result.stdout.rstrip("\n") == example_config().rstrip("\n")
    assert tomllib.loads(result.stdout) == {}


def test_set_uncomments_one_setting_with_its_value(tmp_path):
    result = run("--set", "data_dir=/var/lib/ollama-gw", "--set", "workers=4")
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.stdout) == {"data_dir": "/var/lib/ollama-gw", "workers": 4}
    path = tmp_path / "config.toml"
    path.write_text(result.stdout)
    settings = load_settings(path=str(path), environ={})
    assert settings.resolved_database_url == "sqlite:////var/lib/ollama-gw/ollama-gw.db"


@pytest.mark.parametrize("assignment, phrase", [
    ("data_dir=relative/dir", "relative"),
    ("workers=many", "workers"),
    ("wrokers=2", "must be NAME=VALUE"),
    ("workers", "must be NAME=VALUE"),
])
def test_set_refuses_what_the_gateway_would_refuse(assignment, phrase):
    result = run("--set", assignment)
    assert result.exit_code != 0
    assert phrase in result.output
    assert "Traceback" not in result.output
