"""Shared fixtures: settings on a temporary database, an open store, a reconciler."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from daemon import config
from daemon.reconcile import Reconciler
from daemon.store import Store, open_store


def make_settings(
    db_path: Path, overrides: dict[str, Any] | None = None, **env: str
) -> config.Settings:
    """Settings on a temporary SQLite file, with tables of ``overrides`` merged in."""
    data: dict[str, Any] = {"database": {"url": f"sqlite:///{db_path}"}}
    for table, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(data.get(table), dict):
            data[table].update(values)
        else:
            data[table] = values
    return config.parse(data, env=env)


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., config.Settings]:
    def factory(overrides: dict[str, Any] | None = None, **env: str) -> config.Settings:
        return make_settings(tmp_path / "trainguard.db", overrides, **env)

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
