"""`ollama-gw shell`: go-ollama-api's interactive console, with its command names.

Its users typed `generatekey`, `listkeys`, `removekey …` into the server's own stdin;
that console spun at 100 % CPU under systemd, where stdin is /dev/null. Here it is a
separate command on the same database, so it works while the gateway runs, and every
command does what the matching `ollama-gw keys|webhooks` command does (app/keys/registry.py,
app/webhooks/outbox.py), audited as `via=shell`. Keys it makes get go-ollama-api's 10
requests a minute. Lines are edited with readline and kept in a history file, with any
gateway key typed into a line masked there.
"""
import cmd
import contextlib
import shlex
import sys

import click
import peewee

from app.keys import registry as keystore
from app.redact import redact
from app.store import audit
from app.store.ids import whole_number
from app.webhooks import outbox as hooks
from cli.context import open_db, settings, table
from cli.context import redact as redact_url
from cli.keys import row_for_people

CONSOLE_RATE_LIMIT = "10/minute"  # what go-ollama-api gave every key
MAX_KEYS_AT_ONCE = 100
COMMANDS = [
    ("generatekey [DESCRIPTION]", "Generate a single API key (10 requests/minute)"),
    ("generatekeys COUNT", "Generate COUNT API keys (1-100)"),
    ("listkeys", "List all API keys (never their secrets)"),
    ("removekey KEY", "Revoke a key: the key itself, its prefix, id or name"),
    ("addwebhook URL", "Add a webhook and show its signing secret once"),
    ("deletewebhook ID", "Delete a webhook"),
    ("listwebhooks", "List all webhooks"),
    ("help", "Show available commands"),
    ("exit", "Exit the console (also quit, Ctrl-D)"),
]


class Console(cmd.Cmd):
    """One command per line; a mistake prints one line and the console goes on."""

    def __init__(self, interactive, stdin=None, stdout=None):
        super().__init__(stdin=stdin, stdout=stdout)
        self.use_rawinput = interactive
        self.prompt = "ollama-gw> " if interactive else ""
        self.failed = False

    # -- what every command shares

    def say(self, text=""):
        click.echo(text, file=self.stdout)

    def onecmd(self, line):
        try:
            return super().onecmd(line)
        except (keystore.KeyOpError, hooks.WebhookOpError, ValueError) as exc:
            self.fail(f"error: {exc}")
        except peewee.PeeweeException as exc:
            self.fail(f"error: the database did not answer ({exc}); try again")
        return False

    def fail(self, text):
        """Say what went wrong; a piped session then exits non-zero, as a script expects."""
        self.failed = True
        self.say(text)

    def emptyline(self):
        return False  # cmd's default repeats the last command: never for generatekey

    def default(self, line):
        word = line.split()[0]
        self.fail(f"unknown command {word!r}: type help for the commands")

    @staticmethod
    def _words(arg, count, usage):
        words = shlex.split(arg)
        if len(words) != count:
            raise ValueError(f"usage: {usage}")
        return words

    # -- keys

    def _generate(self, description=None):
        for attempt in range(5):
            name = description or keystore.next_numbered_name("shell key")
            try:
                row, secret = keystore.create_key(name, "user", CONSOLE_RATE_LIMIT)
                break
            except keystore.KeyNameTaken:
                if description or attempt == 4:
                    raise  # another session took the number meanwhile: retry with the next
        self.say(f"Generated key {row.id} ({row.prefix}) {name!r}, {CONSOLE_RATE_LIMIT}. "
                 "Secret (shown once):")
        self.say(secret)

    def do_generatekey(self, arg):
        self._generate(arg.strip() or None)

    def do_generatekeys(self, arg):
        (count,) = self._words(arg, 1, "generatekeys COUNT")
        count = whole_number(count, maximum=MAX_KEYS_AT_ONCE)
        if not count:
            raise ValueError(f"COUNT must be a number from 1 to {MAX_KEYS_AT_ONCE}")
        for _ in range(count):
            self._generate()

    def do_listkeys(self, arg):
        rows = [keystore.key_summary(row) for row in keystore.list_keys()]
        if not rows:
            self.say("no keys yet: generatekey makes one")
            return
        with contextlib.redirect_stdout(self.stdout):
            table([row_for_people(r) for r in rows],
                  ["id", "prefix", "name", "role", "rate_limit", "status", "last_used_at"])

    def do_removekey(self, arg):
        (ident,) = self._words(arg, 1, "removekey KEY")
        row = keystore.revoke_key(keystore.find_key(ident).id)
        self.say(f"Revoked key {row.id} ({row.prefix}): requests with it fail within a second.")

    # -- webhooks

    def do_addwebhook(self, arg):
        (url,) = self._words(arg, 1, "addwebhook URL")
        row, secret = hooks.add_webhook(url, deny_networks=settings().webhook_deny_networks)
        self.say(f"Added webhook {row.id} -> {row.url} (all events). Signing secret "
                 "(shown once):")
        self.say(secret)

    def do_deletewebhook(self, arg):
        (ident,) = self._words(arg, 1, "deletewebhook ID")
        row = hooks.remove_webhook(ident)
        self.say(f"Deleted webhook {row.id} ({row.url}).")

    def do_listwebhooks(self, arg):
        rows = hooks.list_webhooks()
        if not rows:
            self.say("no webhooks yet: addwebhook URL adds one")
            return
        with contextlib.redirect_stdout(self.stdout):
            table([{"id": r.id, "url": r.url, "events": ",".join(hooks.event_names(r))}
                   for r in rows], ["id", "url", "events"])

    # -- the console itself

    def do_help(self, arg):
        width = max(len(usage) for usage, _ in COMMANDS)
        for usage, text in COMMANDS:
            self.say(f"  {usage.ljust(width)}  {text}")

    def do_exit(self, arg):
        return True

    do_quit = do_exit

    def do_EOF(self, arg):  # noqa: N802 - the name cmd.Cmd calls on end of input
        if self.use_rawinput:
            self.say()
        return True


@contextlib.contextmanager
def _history(path):
    """Line editing and a history file; no failure if readline or the file is missing."""
    try:
        import readline
    except ImportError:
        yield
        return
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.read_history_file(str(path))
    readline.set_history_length(1000)
    try:
        yield
    finally:
        # A key typed into a line (removekey ogw_…) is masked before it reaches the disk.
        for index in range(1, readline.get_current_history_length() + 1):
            line = readline.get_history_item(index)
            if line and redact(line) != line:
                readline.replace_history_item(index - 1, redact(line))
        with contextlib.suppress(OSError):
            readline.write_history_file(str(path))


@click.command()
def shell():
    """Run go-ollama-api's interactive console.

    Its commands: generatekey, listkeys, removekey, addwebhook, …

    Reads commands from a terminal with line editing and history, or one per line from a
    pipe (`echo listkeys | ollama-gw shell`; exits 1 if any command failed). Works while
    the gateway runs.
    """
    conf = settings()
    open_db()
    interactive = sys.stdin.isatty()
    console = Console(interactive)
    if interactive:
        console.intro = (f"ollama-gw console on {redact_url(conf.resolved_database_url)}; "
                         "type help for the commands, exit to leave.")
    history = conf.resolved_data_dir / "shell_history"
    with audit.acting_as(audit.cli_actor("shell")):
        if interactive:
            with _history(history):
                console.cmdloop()
        else:
            console.cmdloop()
            if console.failed:
                raise click.exceptions.Exit(1)  # each error was printed where it happened
