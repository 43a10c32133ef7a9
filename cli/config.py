"""`ollama-gw config`: the configuration file, as the package ships it."""
import json
import os
import tempfile
import tomllib

import click

from app.config import FIELDS, ConfigError, example_config, load_settings


@click.group("config")
def config_group():
    """Show what a configuration file can hold."""


@config_group.command()
@click.option("--set", "assignments", multiple=True, metavar="NAME=VALUE",
              help="Uncomment NAME with this value (TOML, or else a plain string); repeatable.")
def example(assignments):
    """Print a config file with every setting at its default.

    Each setting is commented out, with its help.
    """
    lines = example_config().splitlines()
    for assignment in assignments:
        name, value = _setting_line(assignment)
        marker = f"# {name} = "
        lines = [f"{name} = {value}" if line.startswith(marker) else line for line in lines]
    text = "\n".join(lines) + "\n"
    _require_valid(text)
    click.echo(text, nl=False)


def _setting_line(assignment):
    """(name, TOML value) from NAME=VALUE; a value that is not TOML becomes a string."""
    name, sep, value = assignment.partition("=")
    name = name.strip()
    if not sep or name not in FIELDS:
        raise click.BadParameter(f"{assignment!r} must be NAME=VALUE with NAME one of "
                                 f"{', '.join(FIELDS)}", param_hint="--set")
    value = value.strip()
    try:
        tomllib.loads(f"x = {value}")
    except tomllib.TOMLDecodeError:
        value = json.dumps(value)  # a JSON string is a valid TOML basic string
    return name, value


def _require_valid(text):
    """Load the text the way the gateway will, so a bad --set fails here, not at start."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
        fh.write(text)
    try:
        load_settings(path=fh.name, environ={})
    except ConfigError as exc:
        raise click.ClickException(str(exc).replace(fh.name, "the example")) from None
    finally:
        os.unlink(fh.name)
