"""Shared fixtures: settings on a temporary database, an open store, a reconciler."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from trainguard import config
from trainguard.reconcile import Reconciler
from trainguard.store import Store, open_store
from trainguard.testing.postgres import INSTALL_HINT, PostgresServer, find_binaries


@pytest.fixture(autouse=True, scope="session")
def plain_log_tracebacks() -> None:
    """structlog's defaults, but with plain tracebacks: its default renders them with rich
    when rich is installed (schemathesis brings it), at ~0.3 s each, which skews timings."""
    processors = structlog.get_config()["processors"]
    structlog.configure(
        processors=[
            *processors[:-1],
            structlog.dev.ConsoleRenderer(
                colors=False, exception_formatter=structlog.dev.plain_traceback
            ),
        ]
    )


def make_settings(
    db: Path | str, overrides: dict[str, Any] | None = None, **env: str
) -> config.Settings:
    """Settings on a temporary database (a SQLite file's path, or a database URL), with
    tables of ``overrides`` merged in."""
    data: dict[str, Any] = {"database": {"url": db if isinstance(db, str) else f"sqlite:///{db}"}}
    for table, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(data.get(table), dict):
            data[table].update(values)
        else:
            data[table] = values
    return config.parse(data, env=env)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that takes it runs twice: on a SQLite file and on a fresh PostgreSQL
    database of the session's throwaway server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'trainguard.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.database()


@pytest.fixture
def settings_factory(database_url: str) -> Callable[..., config.Settings]:
    def factory(overrides: dict[str, Any] | None = None, **env: str) -> config.Settings:
        return make_settings(database_url, overrides, **env)

    return factory


@pytest.fixture
def settings(settings_factory: Callable[..., config.Settings]) -> config.Settings:
    return settings_factory()


@pytest.fixture
async def store(settings: config.Settings) -> AsyncIterator[Store]:
    async with open_store(settings.database["url"]) as s:
        yield s


@pytest.fixture
def reconciler(store: Store, settings: config.Settings) -> Reconciler:
    return Reconciler(store, settings)


# -- a simulator and a daemon in the test's nursery ----------------------------------------
FAST_LAYERS: dict[str, dict[str, Any]] = {
    "poller": {
        "first_check_after_seconds": 0.3,
        "interval_seconds": 0.3,
        "max_backoff_seconds": 1.0,
    },
    "delayed": {"after_seconds": 1.0, "verify_after_seconds": 0.3},
    "completeness": {"interval_seconds": 0.5},
    "emergency": {"deadline_seconds": 30.0},
}


def daemon_settings(
    db_path: Path,
    sim: Any,
    *,
    layers: dict[str, dict[str, Any]] | None = None,
    only: tuple[str, ...] | None = None,
    extra: dict[str, Any] | None = None,
    url: str | None = None,
) -> config.Settings:
    """Settings for an in-process daemon against ``sim``: fast timings, free loopback ports.

    ``only`` turns every other built-in layer off; ``layers`` overrides layer options; the
    database is the SQLite file ``db_path`` unless ``url`` names another (``database_url``).
    """
    from trainguard.testing.demo import free_port

    port = free_port()
    tables: dict[str, dict[str, Any]] = {name: dict(values) for name, values in FAST_LAYERS.items()}
    for name, values in (layers or {}).items():
        tables.setdefault(name, {}).update(values)
    if only is not None:
        for name in (*config.BUILTIN_LAYERS, "artifacts"):
            tables.setdefault(name, {})["enabled"] = name in only
    data: dict[str, Any] = {
        "database": {"url": url or f"sqlite:///{db_path}"},
        "fal": {
            "queue_url": sim.base_url,
            "backup_queue_url": "",  # tests talk only to loopback
            "jwks_url": sim.jwks_url,
            "max_requests_per_second": 500.0,
            "timeout_seconds": 2.0,
        },
        "webhook": {
            "listen": f"127.0.0.1:{port}",
            "public_url": f"http://127.0.0.1:{port}/fal/webhook",
        },
        "metrics": {"listen": "127.0.0.1:0"},
        "artifacts": {"dir": str(db_path.parent / "artifacts")},  # never ./var/artifacts
        "layers": tables,
    }
    for table, values in (extra or {}).items():
        data.setdefault(table, {}).update(values)
    return config.parse(data, env={"FAL_KEY": "test-key-0123456789"})


@pytest.fixture
async def sim(nursery: Any) -> Any:
    """A FAL simulator on loopback: 0.2 s in queue, 0.5 s running, no faults."""
    from trainguard.testing.simulator import SimConfig, Simulator

    simulator = Simulator(
        SimConfig(queue_seconds=0.2, run_seconds=0.5, seed=1, webhook_retry_delays=(0.2, 0.5))
    )
    await nursery.start(simulator.serve)
    return simulator


def throwaway_postgres() -> Iterator[PostgresServer]:
    """A started throwaway PostgreSQL server (testing/postgres.py) for a fixture to yield,
    removed afterwards. Skipped with the reason only where its binaries are absent; in CI
    (``CI`` set) that is an error."""
    if find_binaries() is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests: {INSTALL_HINT}")
        pytest.skip(INSTALL_HINT)
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the session."""
    yield from throwaway_postgres()
