"""`ollama-gw db`: schema migrations."""
import click

from app.store import db as database
from cli.context import echo_json, open_db, prepare_demo_keys, settings


@click.group("db")
def db_group():
    """Create or upgrade the gateway's database schema."""


@db_group.command()
@click.option("--demo-keys", is_flag=True,
              help="Also set up the keys DEMO_ADMIN_KEY and DEMO_USER_KEY name, as a starting "
              "gateway does.")
def upgrade(demo_keys):
    """Apply pending migrations (safe while gateways run)."""
    instance = open_db(migrate=False)
    applied = database.upgrade(instance)
    click.echo("applied: " + ", ".join(applied) if applied else "already up to date")
    if demo_keys:
        prepare_demo_keys(instance, settings())


@db_group.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(as_json):
    """List migrations and whether each is applied."""
    instance = open_db(migrate=False)
    rows = database.migration_status(instance)
    if as_json:
        echo_json([{"name": n, "applied_at": a and a.isoformat()} for n, a in rows])
        return
    for name, applied in rows:
        click.echo(f"{'applied' if applied else 'pending':8} {name}"
                   + (f"  ({applied:%Y-%m-%d %H:%M:%S})" if applied else ""))


@db_group.command()
@click.option("--to", "target", help="Revert every migration back through this one.")
@click.confirmation_option(prompt="Revert migrations? Data in dropped tables is lost.")
def downgrade(target):
    """Revert the newest migration (or back through --to NAME)."""
    instance = open_db(migrate=False)
    try:
        reverted = database.downgrade(instance, target)
    except Exception as exc:  # MigrationError: unknown target, missing file
        raise click.ClickException(str(exc)) from None
    click.echo("reverted: " + ", ".join(reverted) if reverted else "nothing to revert")
