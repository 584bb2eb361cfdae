"""Peewee models, database opening, migrations and the one-writer access path.

All SQLite specifics live here (pragmas, `BEGIN IMMEDIATE`); the rest of the daemon sees a
`Store` with two doors:

* ``await store.write(fn, *args)``: ``fn`` runs on the database thread inside a savepoint of
  a group-commit batch. A writer task collects up to ``batch_max`` pending writes and commits
  them in ONE transaction (synchronous=FULL), then answers each caller; a caller that is
  answered knows its data is on disk. One failing ``fn`` rolls back only its own savepoint.
* ``await store.read(fn, *args)``: ``fn`` runs on the database thread between batches.

Both go through one ``trio.CapacityLimiter(1)`` over one shared connection, so transactions
never interleave and never span two thread hand-offs (a measured pitfall: an ``atomic()`` left
open on a worker thread is silently joined by a later unrelated call).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import peewee
import playhouse.migrate
import structlog
import trio

from trainguard.errors import StoreClosed, TransactionRolledBack

T = TypeVar("T")

log = structlog.get_logger("trainguard.store")

SCHEMA_VERSION = 4
UNFINISHED = ("SUBMITTED", "IN_QUEUE", "IN_PROGRESS")
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")
STATUSES = UNFINISHED + TERMINAL

database = peewee.DatabaseProxy()

#: How long a statement waits for another process's write lock before "database is locked".
BUSY_TIMEOUT_MS = 10_000
#: A commit running longer than this means the writer is stuck (a lock held elsewhere).
STALL_SECONDS = 1.0


def _transaction_lost(connection: Any) -> bool:
    """Whether the transaction of a batch is gone: rolled back by SQLite (sqlite3 reports no
    open transaction any more) or aborted in PostgreSQL (psycopg 3: IDLE or INERROR), where a
    COMMIT would silently roll back."""
    open_now = getattr(connection, "in_transaction", None)  # sqlite3.Connection
    if isinstance(open_now, bool):
        return not open_now
    info = getattr(connection, "info", None)  # psycopg.Connection
    status = getattr(getattr(info, "transaction_status", None), "name", None)
    return status in ("IDLE", "INERROR")


class BaseModel(peewee.Model):
    class Meta:
        database = database


class Meta(BaseModel):
    """Key/value facts about the database itself (the schema version)."""

    key = peewee.CharField(primary_key=True)
    value = peewee.TextField()

    class Meta:
        table_name = "meta"


class Training(BaseModel):
    """One row per FAL request: the one true state of a training."""

    name = peewee.CharField()
    training_type = peewee.CharField()
    endpoint = peewee.CharField()
    request_id = peewee.CharField(unique=True)
    status_url = peewee.TextField(null=True)
    response_url = peewee.TextField(null=True)
    cancel_url = peewee.TextField(null=True)
    input_json = peewee.TextField(null=True)
    status = peewee.CharField(default="SUBMITTED", index=True)
    progress = peewee.IntegerField(default=0)
    trigger_phrase = peewee.TextField(null=True)
    lora_url = peewee.TextField(null=True)
    config_url = peewee.TextField(null=True)
    finetune_id = peewee.TextField(null=True)
    result_json = peewee.TextField(null=True)
    result_layer = peewee.CharField(null=True)
    is_fallback = peewee.BooleanField(default=False)
    fallback_layer = peewee.CharField(null=True)
    fallback_reason = peewee.TextField(null=True)
    fallback_kind = peewee.CharField(null=True)
    failure_detail = peewee.TextField(null=True)
    submitted_at = peewee.FloatField()
    started_at = peewee.FloatField(null=True)
    fal_completed_at = peewee.FloatField(null=True)
    completed_at = peewee.FloatField(null=True)
    last_checked_at = peewee.FloatField(null=True)
    next_check_at = peewee.FloatField(null=True, index=True)
    delayed_check_at = peewee.FloatField(null=True, index=True)
    deadline_at = peewee.FloatField(null=True, index=True)
    attempts = peewee.IntegerField(default=0)
    last_error = peewee.TextField(null=True)
    lora_checked_at = peewee.FloatField(null=True)
    lora_available = peewee.BooleanField(null=True)
    updated_at = peewee.FloatField()
    cancel_requested_at = peewee.FloatField(null=True)
    result_errors = peewee.IntegerField(default=0)  # untyped 5xx on the result after COMPLETED

    class Meta:
        table_name = "trainings"
        only_save_dirty = True  # an UPDATE of the changed columns, not all 35


class WebhookReceipt(BaseModel):
    """A webhook as it arrived: raw bytes first, meaning later (by reconcile)."""

    request_id = peewee.CharField(null=True, index=True)
    dedupe_key = peewee.CharField(null=True, unique=True)
    body = peewee.BlobField()  # a refused request: only its first REFUSED_BODY_KEPT bytes
    headers_json = peewee.TextField()
    verification = peewee.CharField()  # verified | unverified | skipped | rejected
    reject_reason = peewee.TextField(null=True)
    received_at = peewee.FloatField()
    processed_at = peewee.FloatField(null=True, index=True)
    outcome = peewee.CharField(null=True, index=True)
    body_size = peewee.IntegerField(null=True)  # the whole body's length (schema 4 on)
    body_sha256 = peewee.CharField(null=True)  # the whole body's digest (schema 4 on)

    class Meta:
        table_name = "webhook_receipts"
        # The prunes and the bounds walk it (schema 4): count and bytes by verification.
        indexes = ((("verification", "body_size"), False),)


class Event(BaseModel):
    """Every transition, fallback, upgrade and error of a training (the history)."""

    training = peewee.ForeignKeyField(Training, null=True, backref="events", on_delete="CASCADE")
    request_id = peewee.CharField(index=True)
    at = peewee.FloatField()
    layer = peewee.CharField()
    kind = peewee.CharField()
    from_status = peewee.CharField(null=True)
    to_status = peewee.CharField(null=True)
    detail = peewee.TextField(null=True)

    class Meta:
        table_name = "events"


class Schedule(BaseModel):
    """When a periodic layer runs next: a time in the database, never an in-memory sleep."""

    name = peewee.CharField(primary_key=True)
    next_at = peewee.FloatField()

    class Meta:
        table_name = "schedules"


class Outbox(BaseModel):
    """Events for a consumer (the bot's delivery), written in the transition's transaction."""

    consumer = peewee.CharField(index=True)
    message_id = peewee.CharField(unique=True)  # stable across retries (webhook-id)
    request_id = peewee.CharField(index=True)
    event = peewee.CharField()
    payload_json = peewee.TextField()
    created_at = peewee.FloatField()
    next_attempt_at = peewee.FloatField(index=True)
    attempts = peewee.IntegerField(default=0)
    delivered_at = peewee.FloatField(null=True, index=True)
    abandoned_at = peewee.FloatField(null=True)
    last_error = peewee.TextField(null=True)

    class Meta:
        table_name = "outbox"


class Artifact(BaseModel):
    """A file of a real result kept on our own disk (FAL deletes its media after ~a week)."""

    request_id = peewee.CharField(index=True)
    kind = peewee.CharField()  # "lora" | "config"
    url = peewee.TextField()
    path = peewee.TextField(null=True)
    expected_size = peewee.IntegerField(null=True)
    size = peewee.IntegerField(null=True)
    sha256 = peewee.CharField(null=True)
    stored_at = peewee.FloatField(null=True)
    attempts = peewee.IntegerField(default=0)
    next_attempt_at = peewee.FloatField(index=True)
    last_error = peewee.TextField(null=True)

    class Meta:
        table_name = "artifacts"
        indexes = ((("request_id", "kind"), True),)


def _migrate_1(db: peewee.Database) -> None:
    db.create_tables([Training, WebhookReceipt, Event, Schedule])


def _migrate_2(db: peewee.Database) -> None:
    db.create_tables([Outbox, Artifact])


def _migrate_3(db: peewee.Database) -> None:
    """``cancel_requested_at`` and ``result_errors`` on trainings (a database created at
    version 0 already has them: ``_migrate_1`` creates the table from the current model)."""
    existing = {column.name for column in db.get_columns("trainings")}
    migrator = playhouse.migrate.SchemaMigrator.from_database(db)
    playhouse.migrate.migrate(
        *(
            migrator.add_column("trainings", name, getattr(Training, name))
            for name in ("cancel_requested_at", "result_errors")
            if name not in existing
        )
    )


def _migrate_4(db: peewee.Database) -> None:
    """Bounded receipts (issue 9): the size and digest of a body whose prefix alone is kept,
    and indexes for the prunes and bounds (by ``verification`` and size, by ``outcome``)."""
    migrator = playhouse.migrate.SchemaMigrator.from_database(db)
    columns = {c.name for c in db.get_columns("webhook_receipts")}
    steps = [
        migrator.add_column("webhook_receipts", name, field)
        for name, field in (
            ("body_size", WebhookReceipt.body_size),
            ("body_sha256", WebhookReceipt.body_sha256),
        )
        if name not in columns
    ]
    playhouse.migrate.migrate(*steps)
    # Refused requests kept before: only their first 4096 bytes, as from now on (the space is
    # given back by the VACUUM that switches on incremental auto_vacuum, see _open).
    db.execute_sql(
        "UPDATE webhook_receipts SET body_size = length(body), body = substr(body, 1, 4096)"
        " WHERE verification = 'rejected' AND body_size IS NULL"
    )
    indexed = {tuple(i.columns) for i in db.get_indexes("webhook_receipts")}
    for wanted in (("verification", "body_size"), ("outcome",)):
        if wanted not in indexed:
            playhouse.migrate.migrate(migrator.add_index("webhook_receipts", wanted, False))


#: Forward migrations, applied in order at open; never edit a released one, append.
MIGRATIONS: tuple[tuple[int, Callable[[peewee.Database], None]], ...] = (
    (1, _migrate_1),
    (2, _migrate_2),
    (3, _migrate_3),
    (4, _migrate_4),
)


@dataclass(frozen=True)
class TrainingView:
    """An immutable snapshot of a training, safe to hand to layers, hooks and plugins."""

    id: int
    name: str
    training_type: str
    endpoint: str
    request_id: str
    status_url: str | None
    response_url: str | None
    cancel_url: str | None
    input_json: str | None
    status: str
    progress: int
    trigger_phrase: str | None
    lora_url: str | None
    config_url: str | None
    finetune_id: str | None
    result_json: str | None
    result_layer: str | None
    is_fallback: bool
    fallback_layer: str | None
    fallback_reason: str | None
    fallback_kind: str | None
    failure_detail: str | None
    submitted_at: float
    started_at: float | None
    fal_completed_at: float | None
    completed_at: float | None
    last_checked_at: float | None
    next_check_at: float | None
    delayed_check_at: float | None
    deadline_at: float | None
    attempts: int
    last_error: str | None
    lora_checked_at: float | None
    lora_available: bool | None
    updated_at: float
    cancel_requested_at: float | None
    result_errors: int

    @classmethod
    def of(cls, row: Training) -> TrainingView:
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @property
    def result(self) -> dict[str, Any] | None:
        return json.loads(self.result_json) if self.result_json else None


@dataclass
class _Write:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    done: trio.Event
    ok: bool = False
    value: Any = None


def open_database(url: str) -> peewee.Database:
    """A peewee database for a URL: ``sqlite:///PATH`` (``sqlite:///:memory:``) or PostgreSQL."""
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")  # "var/x.db" is relative, "/srv/x.db" absolute
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return peewee.SqliteDatabase(
            path,
            thread_safe=False,  # one connection, shared by the database thread slot
            check_same_thread=False,
            lock_type="IMMEDIATE",  # take the write lock at BEGIN: no upgrade deadlocks
            pragmas={
                "auto_vacuum": 2,  # INCREMENTAL; takes effect only before the first table
                "journal_mode": "wal",
                "synchronous": 2,  # FULL: a commit that answers a webhook is on disk
                "busy_timeout": BUSY_TIMEOUT_MS,
                "foreign_keys": 1,
            },
        )
    from playhouse.db_url import connect

    return connect(url, thread_safe=False)


def _incremental_vacuum_on(db: peewee.Database) -> None:
    """SQLite gives freed pages back to the file system only with auto_vacuum, which a new
    database gets before its first table (see ``open_database``); an older one needs one
    VACUUM to switch (once; it rewrites the file). Then ``Store.reclaim_space`` gives pages back."""
    if not isinstance(db, peewee.SqliteDatabase) or db.database == ":memory:":
        return
    if db.execute_sql("PRAGMA auto_vacuum").fetchone()[0] == 2:
        return
    log.warning("switching the SQLite database to incremental auto_vacuum (one VACUUM)")
    db.execute_sql("PRAGMA auto_vacuum = INCREMENTAL")
    try:
        db.execute_sql("VACUUM")
    except peewee.OperationalError as exc:  # a full disk, a lock: run as is, try next start
        log.warning("VACUUM failed; freed space is kept in the file for now", error=str(exc))


def _reclaim_space(db: peewee.Database, pages: int) -> int:
    """Between batches (no transaction open): give up to ``pages`` free pages of a SQLite file
    back to the file system. ``executescript`` steps the pragma to its end (one ``execute``
    frees a single page)."""
    if not isinstance(db, peewee.SqliteDatabase):
        return 0
    free = int(db.execute_sql("PRAGMA freelist_count").fetchone()[0])
    if free:
        db.connection().executescript(f"PRAGMA incremental_vacuum({int(pages)});")
    return free


def migrate(db: peewee.Database) -> int:
    """Bring the schema up to ``SCHEMA_VERSION``; returns the version found before."""
    with db.atomic():
        db.create_tables([Meta])
        row = Meta.get_or_none(Meta.key == "schema_version")
        before = int(row.value) if row else 0
        if before > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {before} is newer than this trainguard ({SCHEMA_VERSION})"
            )
        for version, step in MIGRATIONS:
            if version > before:
                step(db)
        Meta.replace(key="schema_version", value=str(SCHEMA_VERSION)).execute()
    return before


class Store:
    """The database behind one limiter, with a group-commit writer (see module doc)."""

    def __init__(
        self,
        url: str,
        *,
        batch_max: int = 100,
        on_commit: Callable[[int], None] | None = None,
        inline: bool = False,
    ) -> None:
        self.url = url
        self.batch_max = batch_max
        self._on_commit = on_commit
        #: Run database calls on trio's own thread instead of a worker thread. Only for tests
        #: on trio's MockClock: a thread hand-off looks like idleness and lets an autojumping
        #: clock leap ahead. It blocks the event loop during each call.
        self.inline = inline
        self._limiter = trio.CapacityLimiter(1)
        self._send, self._receive = trio.open_memory_channel[_Write](math.inf)
        self._writer_running = False
        self._committing_since: float | None = None
        self._last_batch_failed = False
        self.db = open_database(url)

    # -- lifecycle -------------------------------------------------------------------------
    def _open(self) -> None:
        if database.obj is not None and not database.obj.is_closed():
            raise RuntimeError("another Store is open in this process; close it first")
        database.initialize(self.db)
        self.db.connect(reuse_if_open=True)
        migrate(self.db)
        _incremental_vacuum_on(self.db)

    def _close(self) -> None:
        if not self.db.is_closed():
            self.db.close()
        if database.obj is self.db:
            database.initialize(None)

    @property
    def supports_for_update(self) -> bool:
        return bool(self.db.for_update)

    async def _writer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._writer_running = True
        task_status.started()
        try:
            while True:
                batch = [await self._receive.receive()]
                while len(batch) < self.batch_max:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                # Not cancellable once handed over: a batch is committed whole or not at all.
                results = await self._call(self._commit, batch)
                for item, (ok, value) in zip(batch, results, strict=True):
                    item.ok, item.value = ok, value
                    item.done.set()
                if self._on_commit is not None:
                    self._on_commit(len(batch))
        finally:
            self._writer_running = False
            while True:
                try:
                    item = self._receive.receive_nowait()
                except (trio.WouldBlock, trio.ClosedResourceError):
                    break
                item.value = StoreClosed("the store was closed before this write was committed")
                item.done.set()

    def _commit(self, batch: list[_Write]) -> list[tuple[bool, Any]]:
        """Run a batch in one transaction; each writer's (ok, value or error).

        ``ok`` is True only if the COMMIT happened with that write in it. A database may roll
        the WHOLE transaction back on an error (SQLite on a full disk, SQLITE_FULL): then no
        savepoint of it is left, a later write would run outside any transaction and commit
        alone, and the final COMMIT silently does nothing. So after every write the
        transaction is checked, and once it is lost the whole batch is answered as failed.
        """
        self._committing_since = time.monotonic()
        try:
            return self._commit_batch(batch)
        finally:
            self._committing_since = None

    def _commit_batch(self, batch: list[_Write]) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        lost: TransactionRolledBack | None = None
        try:
            with self.db.atomic():  # its ROLLBACK fails when there is nothing left to roll back
                for item in batch:
                    error: Exception | None = None
                    try:
                        with self.db.atomic():  # a savepoint: one failure spoils only itself
                            try:
                                value = item.fn(*item.args)
                            # boundary: a write function's error goes to its writer
                            except Exception as exc:
                                error = exc
                                raise
                        results.append((True, value))
                    except Exception as exc:  # boundary: one write's failure spoils only itself
                        results.append((False, error or exc))
                    if _transaction_lost(self.db.connection()):
                        lost = TransactionRolledBack(
                            "the database rolled the write batch back: nothing of it is stored"
                            + (f" ({error!r})" if error else "")
                        )
                        raise lost
        except Exception as exc:  # the commit itself failed: nothing of the batch is stored
            self._last_batch_failed = True
            failure = lost or exc
            own = [value if not ok else failure for ok, value in results]
            return [(False, own[i] if i < len(own) else failure) for i in range(len(batch))]
        self._last_batch_failed = False
        return results

    def stalled(self) -> bool:
        """Whether durable writes are not going through right now: the last batch failed
        whole (a locked or full database) or a commit has run longer than ``STALL_SECONDS``.
        Cheap and immediate, for ``/readyz``."""
        since = self._committing_since
        return self._last_batch_failed or (
            since is not None and time.monotonic() - since > STALL_SECONDS
        )

    # -- the two doors ---------------------------------------------------------------------
    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a durable transaction; return its value once committed."""
        if not self._writer_running:
            await trio.lowlevel.checkpoint()  # during shutdown, let cancellation win
            raise StoreClosed("the store is not open for writing")
        item = _Write(fn, args, trio.Event())
        self._send.send_nowait(item)
        await item.done.wait()
        if not item.ok:
            raise item.value
        return item.value

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the database thread between write batches."""
        return await self._call(fn, *args)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the database thread slot (or inline, see ``inline``)."""
        if self.inline:
            async with self._limiter:
                return fn(*args)
        return await trio.to_thread.run_sync(lambda: fn(*args), limiter=self._limiter)

    # -- queries the layers share ----------------------------------------------------------
    async def training(self, request_id: str) -> TrainingView | None:
        def get() -> TrainingView | None:
            row = Training.get_or_none(Training.request_id == request_id)
            return TrainingView.of(row) if row else None

        return await self.read(get)

    async def trainings(
        self,
        *where: peewee.Expression,
        order: Iterable[peewee.Node] = (),
        limit: int | None = None,
        offset: int = 0,
    ) -> list[TrainingView]:
        """Trainings matching every expression, as snapshots."""

        def get() -> list[TrainingView]:
            query = Training.select()
            if where:
                query = query.where(*where)
            query = query.order_by(*order, Training.id)
            if limit is not None:
                query = query.limit(limit).offset(offset)
            return [TrainingView.of(row) for row in query]

        return await self.read(get)

    async def earliest(self, column: peewee.Field, *where: peewee.Expression) -> float | None:
        """The smallest value of a time column among matching trainings (the next thing due)."""

        def get() -> float | None:
            query = Training.select(peewee.fn.MIN(column)).where(column.is_null(False), *where)
            return query.scalar()

        return await self.read(get)

    async def status_counts(self) -> dict[str, int]:
        def get() -> dict[str, int]:
            query = Training.select(Training.status, peewee.fn.COUNT(Training.id)).group_by(
                Training.status
            )
            return {status: count for status, count in query.tuples()}

        return await self.read(get)

    async def events(self, request_id: str) -> list[dict[str, Any]]:
        def get() -> list[dict[str, Any]]:
            query = Event.select().where(Event.request_id == request_id).order_by(Event.id)
            return [
                {
                    "at": e.at,
                    "layer": e.layer,
                    "kind": e.kind,
                    "from_status": e.from_status,
                    "to_status": e.to_status,
                    "detail": json.loads(e.detail) if e.detail else None,
                }
                for e in query
            ]

        return await self.read(get)

    async def schedule(self, name: str) -> float | None:
        def get() -> float | None:
            row = Schedule.get_or_none(Schedule.name == name)
            return row.next_at if row else None

        return await self.read(get)

    async def set_schedule(self, name: str, next_at: float) -> None:
        await self.write(lambda: Schedule.replace(name=name, next_at=next_at).execute())

    async def reclaim_space(self, pages: int = 2000) -> int:
        """Give free pages back to the file system (SQLite incremental vacuum, up to
        ``pages`` of them); returns how many pages were free before."""
        return await self.read(_reclaim_space, self.db, pages)

    async def writable(self) -> bool:
        """Whether a durable write goes through right now (for /readyz)."""
        try:
            await self.write(lambda: Meta.select().count())
        except Exception:  # boundary: /readyz answers whatever the database does
            return False
        return True


def fal_user_ids(request_id: str | None = None) -> dict[str, str]:
    """Per request id (all, or only ``request_id``), the ``X-Fal-Webhook-User-Id`` (the fal
    account) of its latest verified webhook receipt. Run it on the database thread."""
    latest = WebhookReceipt.select(peewee.fn.MAX(WebhookReceipt.id)).where(
        WebhookReceipt.verification == "verified", WebhookReceipt.request_id.is_null(False)
    )
    if request_id is not None:
        latest = latest.where(WebhookReceipt.request_id == request_id)
    rows = WebhookReceipt.select(WebhookReceipt.request_id, WebhookReceipt.headers_json).where(
        WebhookReceipt.id.in_(latest.group_by(WebhookReceipt.request_id))
    )
    found: dict[str, str] = {}
    for row in rows:
        user = json.loads(row.headers_json).get("x-fal-webhook-user-id")
        if isinstance(user, str):
            found[row.request_id] = user
    return found


@asynccontextmanager
async def open_store(url: str, **kwargs: Any) -> AsyncIterator[Store]:
    """Open, migrate and run a Store's writer for the duration of the block."""
    store = Store(url, **kwargs)
    try:
        await store._call(store._open)
        async with trio.open_nursery() as nursery:
            await nursery.start(store._writer)
            yield store
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await store._call(store._close)
