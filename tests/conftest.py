"""Shared fixtures.

Service fixtures take a URL from the environment first (``GATEWAY_TEST_AMQP_URL``,
``GATEWAY_TEST_POSTGRES_URL``, ``GATEWAY_TEST_MARIADB_URL``), else start a testcontainer when a
Docker engine answers, else skip -- except under ``CI=true``, where a missing service fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from gateway.store import EventStore, make_engine
from gateway.store.migrate import upgrade


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


def _unavailable(what: str, env: str) -> None:
    msg = f"{what} not available: set {env} or run a Docker engine for testcontainers"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg + " (CI=true: integration services are required)")
    pytest.skip(msg)


def _service_url(env: str, what: str, container_factory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    url = os.environ.get(env)
    if url:
        yield url
        return
    if _docker_available():
        container = container_factory()
        with container as c:
            yield c.get_connection_url() if hasattr(c, "get_connection_url") else c.url
        return
    _unavailable(what, env)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """AMQP URL of a real RabbitMQ."""

    def factory():  # type: ignore[no-untyped-def]
        from testcontainers.rabbitmq import RabbitMqContainer

        class _C(RabbitMqContainer):
            @property
            def url(self) -> str:
                return f"amqp://guest:guest@{self.get_container_host_ip()}:{self.get_exposed_port(5672)}/%2F"

        return _C("rabbitmq:3.13-management")

    yield from _service_url("GATEWAY_TEST_AMQP_URL", "RabbitMQ", factory)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of a real PostgreSQL server (an existing database on it)."""

    def factory():  # type: ignore[no-untyped-def]
        from testcontainers.postgres import PostgresContainer

        return PostgresContainer("postgres:16", driver="psycopg")

    yield from _service_url("GATEWAY_TEST_POSTGRES_URL", "PostgreSQL", factory)


@pytest.fixture(scope="session")
def mariadb_url() -> Iterator[str]:
    """SQLAlchemy URL of a real MariaDB server."""

    def factory():  # type: ignore[no-untyped-def]
        from testcontainers.mysql import MySqlContainer

        return MySqlContainer("mariadb:10.11", dialect="pymysql")

    yield from _service_url("GATEWAY_TEST_MARIADB_URL", "MariaDB", factory)


def _fresh_database(server_url: str) -> Iterator[str]:
    """Create a throw-away database on the server behind ``server_url``; drop it afterwards."""
    url = make_url(server_url)
    name = "gw_" + uuid.uuid4().hex[:12]
    backend = url.get_backend_name()
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            if backend == "postgresql":
                conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


@pytest.fixture
def pg_db_url(postgres_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    yield from _fresh_database(postgres_url)


@pytest.fixture
def mariadb_db_url(mariadb_url: str) -> Iterator[str]:
    """A fresh, empty MariaDB database for one test."""
    yield from _fresh_database(mariadb_url)


@pytest.fixture
def sqlite_url(tmp_path) -> str:  # type: ignore[no-untyped-def]
    """A SQLite file URL in the test's temp folder."""
    return f"sqlite:///{tmp_path / 'gateway.db'}"


def _migrated_store(url: str) -> Iterator[EventStore]:
    """A gateway store at ``url``, migrated to head; disposed afterwards."""
    engine = make_engine(url)
    upgrade(engine)
    yield EventStore(engine)
    engine.dispose()


@pytest.fixture
def sqlite_store(sqlite_url: str) -> Iterator[EventStore]:
    """A migrated SQLite gateway store."""
    yield from _migrated_store(sqlite_url)


@pytest.fixture
def pg_store(pg_db_url: str) -> Iterator[EventStore]:
    """A migrated PostgreSQL gateway store in a fresh database."""
    yield from _migrated_store(pg_db_url)


@pytest.fixture
def bus_prefix() -> str:
    """A unique exchange/queue name prefix, so tests never share broker state."""
    return "gwtest-" + uuid.uuid4().hex[:10]


@pytest.fixture(autouse=True)
def _preserve_environ() -> Iterator[None]:
    """Tests may change os.environ; restore it afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.integration),
        pytest.param("mariadb", marks=pytest.mark.integration),
    ]
)
def any_store(request) -> Iterator[EventStore]:  # type: ignore[no-untyped-def]
    """The same store behaviour tests on SQLite, PostgreSQL and MariaDB."""
    if request.param == "sqlite":
        url = request.getfixturevalue("sqlite_url")
    elif request.param == "postgres":
        url = request.getfixturevalue("pg_db_url")
    else:
        url = request.getfixturevalue("mariadb_db_url")
    yield from _migrated_store(url)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.integration),
        pytest.param("mariadb", marks=pytest.mark.integration),
    ]
)
def legacy_url(request, tmp_path) -> str:  # type: ignore[no-untyped-def]
    """A database URL for a legacy source: SQLite file, or a fresh PostgreSQL/MariaDB database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'legacy.db'}"
    return request.getfixturevalue("pg_db_url" if request.param == "postgres" else "mariadb_db_url")


@pytest.fixture
def procs(tmp_path):  # type: ignore[no-untyped-def]
    """Gateway subprocesses of one test (tests/chaos/harness.py); every one still running is killed
    (SIGKILL) afterwards. Used by the chaos suite and the scale-out test."""
    from tests.chaos.harness import Processes

    logs = tmp_path / "logs"
    logs.mkdir()
    registry = Processes(logs)
    try:
        yield registry
    finally:
        registry.kill_all()


@pytest.fixture
def chaos_bus(amqp_url: str, bus_prefix: str) -> Iterator[str]:
    """The bus prefix of one multi-process test; its queues and exchanges are deleted afterwards."""
    from tests.chaos.harness import cleanup_broker

    yield bus_prefix
    cleanup_broker(amqp_url, bus_prefix, extra_queues=("chaos-sink",))
