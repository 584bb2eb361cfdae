"""The store: schema and migrations, group commit, isolation of one failing write."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peewee
import pytest
import trio

from trainguard import dialect as dialect_mod
from trainguard import store as store_mod
from trainguard.dialect import PostgresDialect, SqliteDialect
from trainguard.store import Connection, Meta, Store, StoreClosed, Training, open_store

KINDS: tuple[store_mod.DueKind, ...] = ("next_check", "deadline", "delayed_check")


def _insert(conn: Connection, request_id: str) -> int:
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
        version = await s.read(lambda conn: Meta.get(Meta.key == "schema_version").value)
        assert version == str(store_mod.SCHEMA_VERSION)
        journal = await s.read(lambda conn: s.db.execute_sql("PRAGMA journal_mode").fetchone()[0])
        assert journal == "wal"
        sync = await s.read(lambda conn: s.db.execute_sql("PRAGMA synchronous").fetchone()[0])
        assert sync == 2  # FULL
    async with open_store(url) as s:
        view = await s.training("r1")
        assert view is not None and view.name == "n"


async def test_newer_schema_is_refused(database_url: str) -> None:
    url = database_url
    async with open_store(url) as s:
        await s.write(
            lambda conn: Meta.update(value="999").where(Meta.key == "schema_version").execute()
        )
    with pytest.raises(RuntimeError, match="newer than this trainguard"):
        async with open_store(url):
            pass


async def test_group_commit_batches_concurrent_writes(database_url: str) -> None:
    batches: list[int] = []
    url = database_url
    async with open_store(url, on_commit=batches.append) as s:
        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(s.write, _insert, f"r{i}")
        count = await s.read(lambda conn: Training.select().count())
    assert count == 300
    assert sum(batches) == 300
    assert len(batches) < 300  # many writes shared a commit
    assert max(batches) <= 100


async def test_one_failing_write_spoils_only_itself(database_url: str) -> None:
    url = database_url
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


async def test_write_after_close_is_refused(database_url: str) -> None:
    url = database_url
    async with open_store(url) as s:
        kept: Store = s
    with pytest.raises(StoreClosed):
        await kept.write(_insert, "late")


async def test_two_stores_in_one_process_each_see_only_their_own_rows(tmp_path: Path) -> None:
    """Several stores live in one process (one trio run): each writes and reads its own
    database concurrently, on its own thread, and never sees the other's rows."""
    async with (
        open_store(f"sqlite:///{tmp_path / 'a.sqlite'}") as a,
        open_store(f"sqlite:///{tmp_path / 'b.sqlite'}") as b,
    ):
        seen: dict[str, list[set[str]]] = {"a": [], "b": []}

        async def work(name: str, s: Store) -> None:
            for i in range(30):
                await s.write(_insert, f"{name}{i}")
                seen[name].append({v.request_id for v in await s.trainings()})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(work, "a", a)
            nursery.start_soon(work, "b", b)
        assert {v.request_id for v in await a.trainings()} == {f"a{i}" for i in range(30)}
        assert {v.request_id for v in await b.trainings()} == {f"b{i}" for i in range(30)}
        for name, other in (("a", "b"), ("b", "a")):
            assert all(not any(rid.startswith(other) for rid in ids) for ids in seen[name])
            assert [len(ids) for ids in seen[name]] == list(range(1, 31))
    assert store_mod.database.obj is None  # outside a store's call the models are unbound


async def test_two_inline_stores_share_trio_s_thread_without_mixing(tmp_path: Path) -> None:
    async with (
        open_store(f"sqlite:///{tmp_path / 'a.sqlite'}", inline=True) as a,
        open_store(f"sqlite:///{tmp_path / 'b.sqlite'}", inline=True) as b,
    ):
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(a.write, _insert, f"a{i}")
                nursery.start_soon(b.write, _insert, f"b{i}")
        assert await a.read(lambda conn: Training.select().count()) == 20
        assert await b.training("a1") is None and await a.training("b1") is None
        assert (await b.training("b1")) is not None


def test_layers_plugins_and_the_cli_never_build_queries() -> None:
    """Layers, plugins (the example too), the CLI and the admin API call named store
    operations: none of them imports peewee or a model class."""
    import ast

    root = Path(__file__).resolve().parent.parent
    models = {
        name
        for name, value in vars(store_mod).items()
        if isinstance(value, type) and issubclass(value, peewee.Model)
    }
    files = [
        *sorted((root / "layers").rglob("*.py")),
        *sorted((root / "plugins").rglob("*.py")),
        root / "daemon" / "cli.py",
        root / "daemon" / "admin.py",
    ]
    offences = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = {alias.name for alias in node.names}
                offences += [f"{path}: import {n}" for n in names if n.split(".")[0] == "peewee"]
                offences += [f"{path}: import {n}" for n in names if n.startswith("playhouse")]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if module.split(".")[0] in ("peewee", "playhouse"):
                    offences.append(f"{path}: from {module} import ...")
                if module == "trainguard.store":
                    offences += [
                        f"{path}: from trainguard.store import {a.name}"
                        for a in node.names
                        if a.name in models
                    ]
    assert len(files) > 10
    assert "Training" in models and "Outbox" in models
    assert offences == []


async def test_forward_migration_from_version_1(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    async with open_store(url) as s:
        await s.write(_insert, "kept")

        def downgrade(
            conn: Connection,
        ) -> None:  # make it look like a database of the first release
            s.db.drop_tables([store_mod.Outbox, store_mod.Artifact])
            Meta.replace(key="schema_version", value="1").execute()

        await s.write(downgrade)
    async with open_store(url) as s:
        tables = await s.read(lambda conn: s.db.get_tables())
        version = await s.read(lambda conn: Meta.get(Meta.key == "schema_version").value)
        assert await s.training("kept") is not None
    assert {"outbox", "artifacts"} <= set(tables)
    assert version == str(store_mod.SCHEMA_VERSION) == "6"


async def test_forward_migration_from_version_2_adds_the_cancel_and_result_error_columns(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    async with open_store(url) as s:
        await s.write(_insert, "kept")

        def downgrade(conn: Connection) -> None:  # a trainings table as release 2 created it
            for column in ("cancel_requested_at", "result_errors"):
                s.db.execute_sql(f"ALTER TABLE trainings DROP COLUMN {column}")
            Meta.replace(key="schema_version", value="2").execute()

        await s.write(downgrade)
        columns = await s.read(lambda conn: {c.name for c in s.db.get_columns("trainings")})
        assert "cancel_requested_at" not in columns
    async with open_store(url) as s:
        columns = await s.read(lambda conn: {c.name for c in s.db.get_columns("trainings")})
        view = await s.training("kept")
    assert {"cancel_requested_at", "result_errors"} <= columns
    assert view is not None and (view.cancel_requested_at, view.result_errors) == (None, 0)


def _full_disk_rollback(conn: Connection) -> None:
    """What SQLITE_FULL may do mid-transaction: SQLite rolls the WHOLE transaction back
    (savepoints and all), then the statement's error reaches the caller."""
    conn.execute("ROLLBACK")
    raise sqlite3.OperationalError("database or disk is full")


def _insert_then_fail(conn: Connection, request_id: str) -> None:
    _insert(conn, request_id)
    raise sqlite3.OperationalError("database or disk is full")


@pytest.mark.parametrize("third", [_insert, _insert_then_fail])
async def test_a_batch_rolled_back_midway_tells_every_writer_the_truth(
    tmp_path: Path, third: Callable[[str], object]
) -> None:
    """Regression (issue 9, item 2): after SQLite rolled a batch back mid-way, a write before
    the rollback was told "committed" when a later write raised, and a write after it ran
    outside any transaction, committed on its own and was told it failed."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    async with open_store(url) as s:
        batch = [
            store_mod._Write(_insert, ("before",), trio.Event()),
            store_mod._Write(_full_disk_rollback, (), trio.Event()),
            store_mod._Write(third, ("after",), trio.Event()),
        ]
        results = await s._call(s._commit, batch)
        stored = {rid: await s.training(rid) is not None for rid in ("before", "after")}
        for (ok, value), rid in zip((results[0], results[2]), ("before", "after"), strict=True):
            assert ok == stored[rid], f"{rid}: told ok={ok}, stored={stored[rid]} ({value!r})"
        assert results[1][0] is False
        assert not stored["before"]  # the rollback took it
        # The store still works afterwards, in a transaction of its own.
        assert isinstance(await s.write(_insert, "later"), int)
        assert await s.training("later") is not None


async def test_a_rolled_back_batch_fails_its_writers_through_write(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    async with open_store(url) as s:
        outcomes: dict[str, object] = {}

        async def attempt(name: str, fn: Callable[..., object], *args: object) -> None:
            try:
                outcomes[name] = await s.write(fn, *args)
            except Exception as exc:
                outcomes[name] = exc

        async with trio.open_nursery() as nursery:  # queued before the writer wakes: one batch
            nursery.start_soon(attempt, "before", _insert, "before")
            nursery.start_soon(attempt, "full", _full_disk_rollback)
            nursery.start_soon(attempt, "after", _insert, "after")
        for rid in ("before", "after"):
            stored = await s.training(rid) is not None
            assert stored == (not isinstance(outcomes[rid], Exception)), (rid, outcomes[rid])
        assert isinstance(outcomes["full"], sqlite3.OperationalError)


def test_transaction_lost_reads_sqlite_and_psycopg_connections() -> None:
    from types import SimpleNamespace

    conn = sqlite3.connect(":memory:", isolation_level=None)
    assert SqliteDialect().transaction_lost(conn)
    conn.execute("BEGIN")
    assert not SqliteDialect().transaction_lost(conn)
    conn.close()

    def psycopg(status: str) -> object:
        return SimpleNamespace(
            info=SimpleNamespace(transaction_status=SimpleNamespace(name=status))
        )

    assert not PostgresDialect().transaction_lost(psycopg("INTRANS"))
    assert PostgresDialect().transaction_lost(psycopg("INERROR"))
    assert PostgresDialect().transaction_lost(psycopg("IDLE"))


async def test_stalled_shows_a_writer_stuck_on_a_lock_before_the_busy_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``/readyz`` reads ``stalled()``: it must turn at once, not after the busy timeout."""
    monkeypatch.setattr(dialect_mod, "BUSY_TIMEOUT_MS", 3_000)
    monkeypatch.setattr(store_mod, "STALL_SECONDS", 0.2)
    path = tmp_path / "db.sqlite"
    async with open_store(f"sqlite:///{path}") as s:
        assert not s.stalled()
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.write, _insert, "waiting")
            with trio.fail_after(2.5):  # well before the 3 s busy timeout
                while not s.stalled():
                    await trio.sleep(0.05)
            holder.execute("ROLLBACK")
            holder.close()
        assert not s.stalled()
        assert await s.training("waiting") is not None


async def test_migration_3_adds_receipt_digests_indexes_and_incremental_vacuum(
    tmp_path: Path,
) -> None:
    """An existing (schema 2) database: columns and indexes added, rows kept, and switched to
    incremental auto_vacuum (one VACUUM) so that pruned receipts give their space back."""
    path = tmp_path / "db.sqlite"
    async with open_store(f"sqlite:///{path}") as s:
        await s.write(_insert, "kept")
        await s.write(
            lambda conn: store_mod.WebhookReceipt.create(
                body=b"x" * 100_000, headers_json="{}", verification="rejected", received_at=1
            )
        )
    old = sqlite3.connect(path, isolation_level=None)  # make it look like schema 2, no vacuum
    for statement in (
        "DROP INDEX webhookreceipt_verification_body_size",
        "DROP INDEX webhookreceipt_outcome",
        "ALTER TABLE webhook_receipts DROP COLUMN body_size",
        "ALTER TABLE webhook_receipts DROP COLUMN body_sha256",
        "UPDATE meta SET value = '2' WHERE key = 'schema_version'",
        "PRAGMA auto_vacuum = NONE",
        "VACUUM",
    ):
        old.execute(statement)
    assert old.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    old.close()
    async with open_store(f"sqlite:///{path}") as s:
        assert await s.training("kept") is not None
        columns = {c.name for c in await s.read(lambda conn: s.db.get_columns("webhook_receipts"))}
        indexed = {
            tuple(i.columns)
            for i in await s.read(lambda conn: s.db.get_indexes("webhook_receipts"))
        }
        vacuum = await s.read(lambda conn: s.db.execute_sql("PRAGMA auto_vacuum").fetchone()[0])
        refused = await s.read(lambda conn: store_mod.WebhookReceipt.get())
    assert (len(refused.body), refused.body_size) == (4096, 100_000)
    assert {"body_size", "body_sha256"} <= columns
    assert {("verification", "body_size"), ("outcome",)} <= indexed
    assert vacuum == 2  # INCREMENTAL


async def test_reclaim_space_shrinks_the_file_after_a_prune(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with open_store(f"sqlite:///{path}") as s:

        def fill(conn: Connection) -> None:
            for i in range(200):
                store_mod.WebhookReceipt.create(
                    body=b"x" * 50_000, headers_json="{}", verification="rejected", received_at=i
                )

        await s.write(fill)
        await s.read(lambda conn: s.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        full = path.stat().st_size
        await s.write(lambda conn: store_mod.WebhookReceipt.delete().execute())
        freed = await s.reclaim_space(100_000)
        await s.read(lambda conn: s.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        assert freed > 0
        assert path.stat().st_size < full / 4, (full, path.stat().st_size)


async def test_a_failing_vacuum_at_open_never_stops_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one VACUUM that switches an old database to incremental auto_vacuum needs free
    disk space; a full disk must not keep the daemon from starting."""
    path = tmp_path / "db.sqlite"
    async with open_store(f"sqlite:///{path}") as s:
        await s.write(_insert, "kept")
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA auto_vacuum = NONE")
    old.execute("VACUUM")
    old.close()
    real = peewee.SqliteDatabase.execute_sql

    def full_disk(self: peewee.SqliteDatabase, sql: str, *args: object) -> object:
        if sql == "VACUUM":
            raise peewee.OperationalError("database or disk is full")
        return real(self, sql, *args)

    monkeypatch.setattr(peewee.SqliteDatabase, "execute_sql", full_disk)
    async with open_store(f"sqlite:///{path}") as s:
        assert await s.training("kept") is not None
        assert await s.reclaim_space() == 0


def test_the_dialect_is_chosen_from_the_url() -> None:
    assert isinstance(store_mod.Store("sqlite:///:memory:").dialect, SqliteDialect)
    assert SqliteDialect().lock_suffix == ""
    for url in ("postgresql://u@h/db", "postgres://u@h/db"):
        assert isinstance(dialect_mod.dialect_for(url), PostgresDialect)
    assert PostgresDialect().lock_suffix == " FOR UPDATE"
    with pytest.raises(ValueError, match="unsupported database url"):
        dialect_mod.dialect_for("mysql://u@h/db")


async def test_set_schedule_upserts_one_row_per_name(store: Store) -> None:
    await store.set_schedule("completeness", 10.0)
    await store.set_schedule("completeness", 20.0)
    await store.set_schedule("other", 5.0)
    assert await store.schedule("completeness") == 20.0
    assert await store.schedule("other") == 5.0
    assert await store.read(lambda conn: store_mod.Schedule.select().count()) == 2


async def test_due_kinds_own_their_column_and_which_trainings_count(store: Store) -> None:
    def plant(conn: Connection) -> None:
        for rid, status, at in (
            ("late", "IN_PROGRESS", 5.0),
            ("early", "SUBMITTED", 1.0),
            ("done", "COMPLETED", 2.0),
            ("cancelled", "CANCELLED", 3.0),
            ("future", "IN_QUEUE", 50.0),
        ):
            Training.update(
                status=status, next_check_at=at, delayed_check_at=at, deadline_at=at
            ).where(Training.id == _insert(conn, rid)).execute()

    await store.write(plant)
    due = {kind: [v.request_id for v in await store.due(kind, 10.0, 10)] for kind in KINDS}
    assert due == {
        "next_check": ["early", "late"],
        "deadline": ["early", "late"],
        "delayed_check": ["early", "done", "late"],
    }
    assert [v.request_id for v in await store.due("next_check", 10.0, 1)] == ["early"]
    assert await store.next_due("next_check") == 1.0
    assert await store.next_due("delayed_check") == 1.0


async def test_values_keep_their_length_and_precision_on_every_backend(store: Store) -> None:
    """No backend cuts a long text or rounds a time (PostgreSQL's VARCHAR(255) and 4-byte
    REAL would: peewee's CharField and FloatField)."""
    long_id, when = "r" * 1000, 1_795_000_123.456789

    def put(conn: Connection) -> None:
        Training.create(
            name="n" * 5000,
            training_type="portrait",
            endpoint="fal-ai/x",
            request_id=long_id,
            submitted_at=when,
            updated_at=when,
        )

    await store.write(put)
    view = await store.training(long_id)
    assert view is not None and view.name == "n" * 5000 and view.submitted_at == when


@pytest.mark.postgresql
async def test_a_sqlite_and_a_postgresql_store_in_one_process(
    tmp_path: Path, postgres_server: Any
) -> None:
    async with (
        open_store(f"sqlite:///{tmp_path / 'a.sqlite'}") as a,
        open_store(postgres_server.database()) as b,
    ):
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(a.write, _insert, f"a{i}")
                nursery.start_soon(b.write, _insert, f"b{i}")
        assert {v.request_id for v in await a.trainings()} == {f"a{i}" for i in range(20)}
        assert {v.request_id for v in await b.trainings()} == {f"b{i}" for i in range(20)}
        assert (a.dialect.name, b.dialect.name) == ("sqlite", "postgresql")


async def test_instances_starting_together_migrate_one_at_a_time(database_url: str) -> None:
    """Several stores open one fresh database at the same moment (instances started
    together): one creates the schema, the others wait for it and find it done; none
    fails (on PostgreSQL, concurrent CREATE TABLEs without the lock collide)."""
    opened: list[int] = []

    async def open_one() -> None:
        async with open_store(database_url) as s:
            version = await s.read(lambda conn: Meta.get(Meta.key == "schema_version").value)
            opened.append(int(version))

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(open_one)
    assert opened == [store_mod.SCHEMA_VERSION] * 6


class _Deadlocked(Exception):
    """Stands in for PostgreSQL's 40P01 in a test of what the store does with one."""


async def test_a_retried_write_whose_begin_finds_the_connection_cut_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write failed by a deadlock runs again alone after its batch committed; if that
    lone run's BEGIN finds the connection cut, only that write fails: the batch it was in
    is committed and never runs a second time."""
    batches: list[int] = []
    runs: list[str] = []
    async with open_store(f"sqlite:///{tmp_path / 'db.sqlite'}", on_commit=batches.append) as s:
        monkeypatch.setattr(s.dialect, "retryable", lambda exc: isinstance(exc, _Deadlocked))
        commit_batch = s._commit_batch

        def cut_on_retry(batch: list[Any]) -> list[tuple[bool, Any]]:
            if len(batch) == 1 and batch[0].args == ("deadlocked",):
                raise store_mod._CutBeforeBegin(peewee.OperationalError("connection cut"))
            return commit_batch(batch)

        monkeypatch.setattr(s, "_commit_batch", cut_on_retry)

        def write(conn: Connection, name: str) -> None:
            runs.append(name)
            if name == "deadlocked":
                raise _Deadlocked(name)
            _insert(conn, name)

        outcomes: dict[str, BaseException | None] = {}

        async def one(name: str) -> None:
            try:
                await s.write(write, name)
                outcomes[name] = None
            except Exception as exc:
                outcomes[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "deadlocked")
            nursery.start_soon(one, "fine")
        assert batches[0] == 2  # both were in one batch
        assert isinstance(outcomes["deadlocked"], store_mod.StoreError)
        assert outcomes["fine"] is None
        assert sorted(runs) == ["deadlocked", "fine"]  # the committed one never ran again
        assert await s.read(lambda conn: Training.select().count()) == 1
