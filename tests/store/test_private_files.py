"""What the gateway writes to data_dir is its user's alone, with the umask of a pip install."""
import contextlib
import os
import stat

import pytest

from app.accounting.usage import Record, spill
from app.config import Settings
from app.store import db as database
from app.ui.session import cookie_secret


@pytest.fixture
def umask_022():
    """The umask of a shell, a container or pip: files 0644 unless the gateway says otherwise."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_sqlite_database_and_its_wal_and_shm_are_0600_in_a_0700_directory(tmp_path,
                                                                            umask_022):
    data = tmp_path / "data" / "ollama-gw"
    path = data / "ollama-gw.db"
    instance = database.open_database(f"sqlite:///{path}")
    try:
        database.upgrade(instance)  # writes: the -wal and -shm files exist now
        files = sorted(p.name for p in data.iterdir())
        assert files == ["ollama-gw.db", "ollama-gw.db-shm", "ollama-gw.db-wal",
                         "ollama-gw.db.migrate-lock"]
        assert {name: oct(mode(data / name)) for name in files} == dict.fromkeys(files, "0o600")
        assert oct(mode(data)) == "0o700"
    finally:
        instance.close_all()


def test_an_existing_database_file_keeps_its_mode(tmp_path, umask_022):
    path = tmp_path / "shared.db"
    path.touch(mode=0o640)
    instance = database.open_database(f"sqlite:///{path}")
    with contextlib.closing(instance.connection()):
        pass
    instance.close_all()
    assert oct(mode(path)) == "0o640"


def test_usage_spills_and_the_cookie_secret_are_0600(tmp_path, umask_022):
    data = tmp_path / "data"
    spilled = spill([Record(at=0.0, endpoint="/api/generate", status=200, latency_ms=1)], data)
    assert oct(mode(spilled)) == "0o600"
    assert oct(mode(data)) == "0o700"
    cookie_secret(Settings(data_dir=str(tmp_path / "ui")))
    assert oct(mode(tmp_path / "ui" / "ui-secret")) == "0o600"
    assert oct(mode(tmp_path / "ui")) == "0o700"
