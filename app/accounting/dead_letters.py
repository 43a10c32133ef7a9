"""Usage records no database will take: kept in a file for a person, counted and logged once.

The usage writer moves a record here only when it failed its batch, failed alone and
failed again with its text made safe (app/accounting/usage.py), and load_spills() a spilled line
it cannot read. Either way the writer goes on with the rest instead of retrying one
record forever. The file, data_dir/usage-dead-letters.jsonl, is only for the gateway's
user (0600): a record names its key (prefix and name, never the secret), and a webhook
that wants prompts puts the prompt in it. Each line is one JSON object, ASCII only:
`reason`, the `time` it was moved, and the `record`'s fields or the unreadable `line`.
"""
import dataclasses
import json
import logging
import os
import time

from app import metrics
from app.store.private_files import private_dir, private_opener

log = logging.getLogger(__name__)

FILE_NAME = "usage-dead-letters.jsonl"


class DeadLetters:
    """The dead-letter file of one data_dir (None: nowhere to keep them, only counted)."""

    def __init__(self, directory=None):
        self.path = directory / FILE_NAME if directory is not None else None

    def add_record(self, record, reason):
        """Keep a usage record the database refused even made safe."""
        self._add(lambda: {"record": dataclasses.asdict(record)}, reason,
                  f"a usage record (key {record.key_prefix or '-'}, {record.endpoint}) "
                  "that the database refused even made safe")

    def add_line(self, line, reason):
        """Keep a spilled line that is not a usage record (bytes, as read)."""
        self._add(lambda: {"line": line.decode("utf-8", "replace").rstrip("\r\n")}, reason,
                  "a spilled usage line that could not be read")

    def _add(self, entry, reason, what):
        """Never raises: the writer goes on whatever happens here."""
        metrics.USAGE_DEAD_LETTERS.inc()
        reason = reason[:500].encode("ascii", "backslashreplace").decode()  # a log line too
        where = "dropped: no data_dir to keep it in"
        if self.path is not None:
            try:
                self._append({"reason": reason, "time": time.time(), **entry()})
                where = f"moved to {self.path}"
            except Exception as exc:  # a full disk, a record json cannot write: say so
                where = f"lost: {self.path} could not be written ({type(exc).__name__}: {exc})"
        log.error("%s (%s): %s", what, reason, where)

    def _append(self, entry):
        # ensure_ascii: an unpaired surrogate is written as its \ud800 escape, never as
        # bytes no decoder takes. One write per line, O_APPEND: workers share the file.
        line = (json.dumps(entry, default=str) + "\n").encode("ascii")
        private_dir(self.path.parent)
        fd = private_opener(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while line:
                line = line[os.write(fd, line):]
        finally:
            os.close(fd)
