"""Fixtures: a fake Ollama, a fresh database per test (SQLite and PostgreSQL), the app.

Every test that touches the database runs twice, once per backend. PostgreSQL is the
real server on 127.0.0.1 (`OLLAMA_GW_TEST_POSTGRES_URL` to point elsewhere); without
one the PostgreSQL half is skipped locally and fails under CI (CI=true).
"""
import dataclasses
import logging
import os

import peewee
import pytest
from click.testing import CliRunner

from app import create_app
from app.accounting.request_record import ACCESS_LOG
from app.accounting.usage import UsageWriter
from app.config import Settings
from app.keys import registry as keystore
from app.store import db as database
from tests import leak_check
from tests.fake_ollama import FakeOllama

# One database per test process (each pytest-xdist worker is one), so that concurrent
# runs on one server do not collide. A database given by name gets the worker's name
# appended under xdist, for the same reason.
POSTGRES_URL = os.environ.get(
    "OLLAMA_GW_TEST_POSTGRES_URL",
    f"postgresql://postgres@127.0.0.1:5432/ollama_gw_test_{os.getpid()}",
)
if "OLLAMA_GW_TEST_POSTGRES_URL" in os.environ and os.environ.get("PYTEST_XDIST_WORKER"):
    POSTGRES_URL += "_" + os.environ["PYTEST_XDIST_WORKER"]


@pytest.fixture(scope="session", autouse=True)
def log_recorder():
    """Record every key the suite creates and every line it logs; at the end, check no log has one.

    The check runs as this fixture is torn down, after every test of this process (of each
    pytest-xdist worker) and its gateways: a leak is an error at the last test's teardown.
    See tests/leak_check.py.
    """
    make_secret = keystore.new_secret

    def recorded_secret():
        secret = make_secret()
        leak_check.remember_secrets([secret])
        return secret

    keystore.new_secret = recorded_secret
    recorder = leak_check.Recorder()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # what the gateway logs by default (log_level = info)
    root.addHandler(recorder)
    try:
        yield recorder
        found = leak_check.leaks(recorder.lines)
        assert not found, f"keys this test session created are in logs it wrote: {found}"
    finally:
        root.removeHandler(recorder)
        root.setLevel(level)
        keystore.new_secret = make_secret


SLOW_PREPARATION = {"test_packaging.py", "test_container.py"}


def pytest_collection_modifyitems(items):
    """Packaging and container tests run late.

    The packaging tests' .deb builds and Debian root file system are made in the
    background while the rest of the suite runs (tests/packaging_tools.py).
    """
    late = [item for item in items if item.path.name in SLOW_PREPARATION]
    items[:] = [item for item in items if item not in late] + late


@pytest.fixture(scope="session", autouse=True)
def prepare_packaging(request, tmp_path_factory):
    """Start building what the packaging and container tests need, if they will run.

    Under pytest-xdist one worker builds and the others wait for its results; the
    builder waits for its builds before it ends.
    """
    from tests import packaging_tools as tools

    selected = {item.path.name for item in request.session.items}
    if os.geteuid() != 0 or not selected & SLOW_PREPARATION:
        yield
        return
    if tools.have(tools.BUILD_TOOLS):
        tools.start_current_deb(tmp_path_factory)
        if "test_packaging.py" in selected:
            tools.start_later_deb(tmp_path_factory)
    if "test_container.py" in selected and tools.have(tools.CONTAINER_TOOLS):
        tools.start_debian_rootfs(tmp_path_factory)
    yield
    tools.finish_builds()


def _postgres_admin(url, statement):
    name = url.rsplit("/", 1)[1]
    admin = peewee.PostgresqlDatabase("postgres", **_pg_params(url))
    with admin.connection_context():
        exists = admin.execute_sql("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if statement == "create" and not exists.fetchone():
            admin.execute_sql(f'CREATE DATABASE "{name}"')
        elif statement == "drop" and exists.fetchone():
            admin.execute_sql(f'DROP DATABASE "{name}" WITH (FORCE)')


def _pg_params(url):
    from playhouse.db_url import parse

    params = parse(url)
    params.pop("database")
    return params


@pytest.fixture(scope="session")
def postgres_url():
    try:
        _postgres_admin(POSTGRES_URL, "create")
    except peewee.OperationalError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    yield POSTGRES_URL
    if "OLLAMA_GW_TEST_POSTGRES_URL" not in os.environ:
        _postgres_admin(POSTGRES_URL, "drop")


@pytest.fixture
def own_postgres(postgres_url, request):
    """A PostgreSQL database for this test alone (others may be using the session's)."""
    url = f"{postgres_url}_{abs(hash(request.node.nodeid)) % 10**8}"
    _postgres_admin(url, "drop")
    _postgres_admin(url, "create")
    yield url
    _postgres_admin(url, "drop")


def reset_postgres(url):
    instance = database.open_database(url)
    with instance.connection_context():
        instance.execute_sql("DROP SCHEMA public CASCADE")
        instance.execute_sql("CREATE SCHEMA public")
    instance.close_all()


def empty_database(request, directory):
    """The URL of an empty database of the kind `request.param` names (SQLite: in `directory`).

    For fixtures parametrized over ["sqlite", "postgresql"], whatever their scope.
    """
    if request.param == "sqlite":
        return f"sqlite:///{directory}/gateway.db"
    url = request.getfixturevalue("postgres_url")
    reset_postgres(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """An empty database of each kind, as a URL."""
    return empty_database(request, tmp_path)


@pytest.fixture(name="database", scope="module", params=["sqlite", "postgresql"])
def gateway_database(request, tmp_path_factory):
    """An empty database of each kind, as a URL, for a module's gunicorn-run gateways."""
    return empty_database(request, tmp_path_factory.mktemp("gw"))


@pytest.fixture(scope="session")
def fake_ollama():
    with FakeOllama() as fake:
        yield fake


@pytest.fixture
def fake(fake_ollama):
    """The shared fake Ollama, with its knobs and records reset for this test."""
    fake_ollama.reset()
    yield fake_ollama
    fake_ollama.reset()


@pytest.fixture
def settings(database_url, fake, tmp_path):
    """Settings for the app in this process, behind Flask's test client.

    No upstream cap: a fair-queue slot is freed when the WSGI server closes the answer,
    which gunicorn always does and Flask's test client only for answers a test reads to
    the end (schemathesis reads none). tests/test_fair_queue*.py test the queue, and every
    gunicorn-run test runs with it on.
    """
    return Settings(data_dir=str(tmp_path), database_url=database_url, upstreams=(fake.url,),
                    read_timeout=10.0, connect_timeout=2.0, upstream_max_concurrent=0)


@pytest.fixture
def migrated(settings):
    """The test database with the schema applied, bound to the models."""
    instance = database.open_database(settings.resolved_database_url)
    database.db.initialize(instance)
    database.upgrade(instance)
    yield instance
    for writer in list(UsageWriter.running):  # no app's writer outlives its database
        writer.stop()
    instance.close_all()


@pytest.fixture
def app(settings, migrated):
    app = create_app(settings)
    app.config["TESTING"] = True
    yield app
    let_go_of_leases(app)


def let_go_of_leases(app):
    """What a test left held (a reservation whose request never finished, behind Flask's
    test client) is no longer renewed: the limiter's keeper stops at its next turn
    instead of renewing it in a database the test has dropped."""
    limiter = app.extensions["limiter"]
    with limiter._lock:
        limiter._held.clear()
        limiter._reservations.clear()
        limiter._unreleased.clear()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def make_client(settings, migrated):
    """make_client(**setting_overrides) -> a test client of a gateway built with those settings."""

    made = []

    def make(**overrides):
        app = create_app(dataclasses.replace(settings, **overrides))
        app.config["TESTING"] = True
        made.append(app)
        return app.test_client()

    yield make
    for app in made:
        let_go_of_leases(app)


@pytest.fixture
def make_key(migrated):
    """make_key(**options) -> (secret, row): a key created the way the CLI creates one."""

    def make(name=None, **options):
        name = name or keystore.next_numbered_name("test")  # names are unique among live keys
        options.setdefault("rate_limit", "1000/minute")
        row, secret = keystore.create_key(name, **options)
        return secret, row

    return make


@pytest.fixture
def runner(settings, monkeypatch):
    """Runs `ollama-gw` commands in-process against the test database."""
    from cli import cli

    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("OLLAMA_URL", settings.upstream)
    monkeypatch.delenv("OLLAMA_GW_CONFIG", raising=False)

    class Runner(CliRunner):
        def __call__(self, *args, input=None):
            # Access-log lines of the test's requests go out now: written by the usage
            # writer's next turn, they would land in the command's captured output
            # (CliRunner swaps sys.stderr) and break a test that reads its JSON.
            ACCESS_LOG.flush()
            return self.invoke(cli, list(args), input=input, catch_exceptions=False)

    return Runner()


def auth_header(secret):
    return {"Authorization": f"Bearer {secret}"}
