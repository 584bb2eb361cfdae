"""The throwaway PostgreSQL server the PostgreSQL tests run against (testing/postgres.py)."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

from trainguard.testing.postgres import PostgresServer


def test_databases_are_fresh_and_separate(postgres_server: PostgresServer) -> None:
    first, second = postgres_server.database(), postgres_server.database()
    assert first != second and first.startswith("postgresql://trainguard@127.0.0.1:")
    with psycopg.connect(first, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
    with psycopg.connect(second) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 't'"
        ).fetchone()
    assert tables == (0,)


def test_the_server_runs_unprivileged_and_keeps_data_over_a_fast_restart(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    pid = int((postgres_server.data / "postmaster.pid").read_text().split()[0])
    owner = Path(f"/proc/{pid}").stat().st_uid
    assert owner != 0 and (os.geteuid() != 0 or owner == postgres_server._user.pw_uid)  # type: ignore[union-attr]
    postgres_server.restart()
    new_pid = int((postgres_server.data / "postmaster.pid").read_text().split()[0])
    assert new_pid != pid
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]


@pytest.mark.usefixtures("postgres_server")  # skips (or fails in CI) without the binaries
def test_stop_removes_everything() -> None:
    server = PostgresServer().start()
    root = server.root
    assert (server.data / "PG_VERSION").exists()
    server.stop()
    assert not root.exists()
