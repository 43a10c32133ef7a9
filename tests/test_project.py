"""What a newcomer reads before the code: the licence and the package's own description."""
import configparser
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_the_licence_file_is_the_licence_setup_cfg_declares():
    metadata = configparser.ConfigParser()
    metadata.read(REPO / "setup.cfg")
    assert metadata["metadata"]["license"] == "MIT"
    assert metadata["metadata"]["license_files"] == "LICENSE"
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text


def test_the_suite_records_every_key_it_creates_for_its_log_check(make_key):
    from tests import leak_check

    secret, _ = make_key()
    assert secret in leak_check.SECRETS


def test_no_key_the_suite_created_is_in_any_log_it_wrote(log_recorder):
    """Run last (conftest orders it): every gateway log and in-process log line, grepped."""
    from tests import leak_check

    assert leak_check.leaks(log_recorder.lines) == []
