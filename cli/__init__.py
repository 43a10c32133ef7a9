"""The `ollama-gw` command: one group, one module per noun."""
import inspect
import os
import re

import click

from cli import audit, config, db, keys, queue, serve, shell, upstreams, usage, webhooks


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ollama-gw", prog_name="ollama-gw",
                      message="%(prog)s %(version)s")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              envvar="OLLAMA_GW_CONFIG",
              help="TOML configuration file [default: /etc/ollama-gw/config.toml if present].")
def cli(config_path):
    """Administer and run ollama-gw, the gateway in front of Ollama."""
    if config_path:
        if not os.path.isfile(config_path):
            raise click.ClickException(f"config file {config_path} does not exist")
        # The environment carries it to gunicorn workers as well.
        os.environ["OLLAMA_GW_CONFIG"] = os.path.abspath(config_path)


cli.add_command(serve.serve)
cli.add_command(serve.check)
cli.add_command(db.db_group)
cli.add_command(keys.keys)
cli.add_command(usage.usage)
cli.add_command(config.config_group)
cli.add_command(webhooks.webhooks)
cli.add_command(upstreams.upstreams)
cli.add_command(queue.queue)
cli.add_command(audit.audit)
cli.add_command(shell.shell)


def _first_sentence(text):
    paragraph = " ".join(inspect.cleandoc(text).split("\n\n")[0].split())
    end = re.search(r"(?<!e\.g)(?<!i\.e)\.(?=\s|$)", paragraph)
    return paragraph[:end.end()] if end else paragraph


def _whole_summaries(group):
    """List each command with its whole first sentence: click cuts a long one mid-sentence
    (`Send gateway events to HTTP receivers, signed the Standard...`); whole, it wraps."""
    for command in group.commands.values():
        if command.short_help is None and command.help:
            command.short_help = _first_sentence(command.help)
        if isinstance(command, click.Group):
            _whole_summaries(command)


_whole_summaries(cli)


def main():
    cli(prog_name="ollama-gw")
