"""Files the gateway keeps in data_dir, readable by its own user only whatever the umask.

The SQLite database holds webhook signing secrets and key hashes, a usage spill holds
what keys did. The .deb's service runs with umask 077; a pip or container install
runs with the usual 022, which would make them world-readable.
"""
import os
from pathlib import Path

FILE_MODE, DIR_MODE = 0o600, 0o700


def private_dir(path):
    """Create directory `path` (and its parents) if missing; one made here is 0700."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        os.chmod(path, DIR_MODE)  # the umask may have taken bits from mkdir's mode


def private_opener(path, flags):
    """An `opener` for open(): a file it creates is 0600; an existing one is left as it is."""
    if flags & os.O_CREAT:
        try:
            fd = os.open(path, flags | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            pass
        else:
            os.fchmod(fd, FILE_MODE)  # the umask may have taken bits from os.open's mode
            return fd
    return os.open(path, flags & ~os.O_CREAT)


def create_private(path):
    """Create `path` empty and 0600 unless it exists, so that what writes it later keeps that.

    SQLite gives its -wal and -shm files the database file's mode.
    """
    with open(path, "a", opener=private_opener):
        pass
