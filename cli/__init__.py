"""The `ollama-gw` command: one group, one module per noun."""
import os

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


def main():
    cli(prog_name="ollama-gw")
