"""The store: schema and migrations, group commit, isolation of one failing write."""

from __future__ import annotations

from pathlib import Path

import peewee
import pytest
import trio

from daemon import store as store_mod
from daemon.store import Meta, Store, StoreClosed, Training, open_store


def _insert(request_id: str) -> int:
    return Training.create(
        name="n",
        training_type="portrait",
        endpoint="fal-ai/x",
        request_id=request_id,
        submitted_at=1.0,
        updated_at=1.0,
    ).id


async def test_schema_version_recorded_and_data_survives_reopen(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    async with open_store(url) as s:
        await s.write(_insert, "r1")
        version = await s.read(lambda: Meta.get(Meta.key == "schema_version").value)
        assert version == str(store_mod.SCHEMA_VERSION)
        journal = await s.read(lambda: s.db.execute_sql("PRAGMA journal_mode").fetchone()[0])
        assert journal == "wal"
        sync = await s.read(lambda: s.db.execute_sql("PRAGMA synchronous").fetchone()[0])
        assert sync == 2  # FULL
    async with open_store(url) as s:
        view = await s.training("r1")
        assert view is not None and view.name == "n"


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    async with open_store(url) as s:
        await s.write(lambda: Meta.replace(key="schema_version", value="999").execute())
    with pytest.raises(RuntimeError, match="newer than this trainguard"):
        async with open_store(url):
            pass


async def test_group_commit_batches_concurrent_writes(tmp_path: Path) -> None:
    batches: list[int] = []
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    async with open_store(url, on_commit=batches.append) as s:
        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(s.write, _insert, f"r{i}")
        count = await s.read(lambda: Training.select().count())
    assert count == 300
    assert sum(batches) == 300
    assert len(batches) < 300  # many writes shared a commit
    assert max(batches) <= 100


async def test_one_failing_write_spoils_only_itself(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    async with open_store(url) as s:
        await s.write(_insert, "dup")
        results: dict[str, object] = {}

        async def attempt(rid: str) -> None:
            try:
                results[rid] = await s.write(_insert, rid)
            except peewee.IntegrityError as exc:
                results[rid] = exc

        async with trio.open_nursery() as nursery:
            for rid in ("a", "dup", "b"):
                nursery.start_soon(attempt, rid)
        assert isinstance(results["dup"], peewee.IntegrityError)
        assert isinstance(results["a"], int) and isinstance(results["b"], int)
        assert await s.training("a") is not None and await s.training("b") is not None


async def test_write_after_close_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    async with open_store(url) as s:
        kept: Store = s
    with pytest.raises(StoreClosed):
        await kept.write(_insert, "late")


async def test_only_one_open_store_per_process(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path / 'a.sqlite'}"):
        with pytest.raises(RuntimeError, match="another Store is open"):
            async with open_store(f"sqlite:///{tmp_path / 'b.sqlite'}"):
                pass


async def test_forward_migration_from_version_1(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    async with open_store(url) as s:
        await s.write(_insert, "kept")

        def downgrade() -> None:  # make it look like a database of the first release
            s.db.drop_tables([store_mod.Outbox, store_mod.Artifact])
            Meta.replace(key="schema_version", value="1").execute()

        await s.write(downgrade)
    async with open_store(url) as s:
        tables = await s.read(s.db.get_tables)
        version = await s.read(lambda: Meta.get(Meta.key == "schema_version").value)
        assert await s.training("kept") is not None
    assert {"outbox", "artifacts"} <= set(tables)
    assert version == str(store_mod.SCHEMA_VERSION) == "3"


async def test_forward_migration_from_version_2_adds_the_cancel_and_result_error_columns(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    async with open_store(url) as s:
        await s.write(_insert, "kept")

        def downgrade() -> None:  # a trainings table as release 2 created it
            for column in ("cancel_requested_at", "result_errors"):
                s.db.execute_sql(f"ALTER TABLE trainings DROP COLUMN {column}")
            Meta.replace(key="schema_version", value="2").execute()

        await s.write(downgrade)
        columns = await s.read(lambda: {c.name for c in s.db.get_columns("trainings")})
        assert "cancel_requested_at" not in columns
    async with open_store(url) as s:
        columns = await s.read(lambda: {c.name for c in s.db.get_columns("trainings")})
        view = await s.training("kept")
    assert {"cancel_requested_at", "result_errors"} <= columns
    assert view is not None and (view.cancel_requested_at, view.result_errors) == (None, 0)
