"""Every key the suite creates, and every log it produces: at the end, no log may hold a key.

Keys made in this process are caught where they are made (app.keys.registry.new_secret);
keys made by a gateway's CLI in a subprocess are taken from its output. Logs are the
files of every gateway the suite started, plus every record logged in this process,
formatted as the gateway formats them (through its redacting formatter).
"""
import logging

SECRETS = set()
LOG_FILES = []


def remember_secrets(secrets):
    SECRETS.update(secrets)


def remember_log(path):
    LOG_FILES.append(path)


class Recorder(logging.Handler):
    """Keeps every formatted log line of this process."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted logs nothing either
            pass


def leaks(recorded_lines):
    """[(where, key prefix)] for every created key found in a log."""
    found = []
    sources = [("in-process log", "\n".join(recorded_lines))]
    for path in LOG_FILES:
        try:
            with open(path, errors="replace") as fh:
                sources.append((str(path), fh.read()))
        except FileNotFoundError:
            continue
    for where, text in sources:
        found += [(where, secret[:12]) for secret in SECRETS if secret in text]
    return found
