"""Peewee models, migrations, the one-writer access path and the named operations.

Layers, plugins and tools never build queries: they call named operations of a ``Store``
(``due``, ``pending_receipts``, ``finished_incomplete``, ``store.outbox.due_heads``, ...).
What differs between SQL databases is in ``trainguard.dialect``. A ``Store`` has two doors,
both handing ``fn`` this store's ``Connection`` first (like datasette's
``execute_write_fn``):

* ``await store.write(fn, *args)``: ``fn(conn, *args)`` runs on the database thread inside a
  savepoint of a group-commit batch. A writer task collects up to ``batch_max`` pending
  writes and commits them in ONE transaction (synchronous=FULL), then answers each caller; a
  caller that is answered knows its data is on disk. One failing ``fn`` rolls back only its
  own savepoint.
* ``await store.read(fn, *args)``: ``fn(conn, *args)`` runs on the database thread between
  batches.

Both go through one ``trio.CapacityLimiter(1)`` over one shared connection, so transactions
never interleave and never span two thread hand-offs (a measured pitfall: an ``atomic()`` left
open on a worker thread is silently joined by a later unrelated call). The models are plain
module-level classes; during a store's call they are bound to that store's database (a
context variable), so several stores can be open in one process.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import Any, Generic, Literal, TypeVar

import peewee
import playhouse.migrate
import trio

from trainguard.dialect import Dialect, dialect_for
from trainguard.errors import StoreClosed, StoreError, TransactionRolledBack

T = TypeVar("T")
C = TypeVar("C")

SCHEMA_VERSION = 6
UNFINISHED = ("SUBMITTED", "IN_QUEUE", "IN_PROGRESS")
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")
STATUSES = UNFINISHED + TERMINAL

#: A commit running longer than this means the writer is stuck (a lock held elsewhere).
STALL_SECONDS = 1.0
#: After a lost connection (a PostgreSQL restart), reconnects are tried at most this often
#: at first, the wait doubling per failed attempt up to ``RECONNECT_CAP_SECONDS`` (with
#: jitter, so that several instances do not knock at once); calls in between fail at once.
RECONNECT_FIRST_SECONDS = 0.1
RECONNECT_CAP_SECONDS = 2.0

#: The database of the Store whose call runs in this context (see ``bound``).
_current: ContextVar[peewee.Database | None] = ContextVar("trainguard_store", default=None)


class _BoundDatabase(peewee.DatabaseProxy):
    """The models' database: whichever Store's call is running on this thread (context).

    ``Store`` sets it around every function it runs on its database thread, so the models
    stay plain module-level classes (``Training.select()``) while several stores, each with
    its own database, live in one process. Outside a store's call it is unbound.
    """

    __slots__ = ()

    def __init__(self) -> None:
        object.__setattr__(self, "_callbacks", [])

    @property
    def obj(self) -> peewee.Database | None:
        return _current.get()

    def initialize(self, obj: Any) -> None:
        raise TypeError("a Store binds its database to each call; use store.bound(db)")


database = _BoundDatabase()


@contextmanager
def bound(db: peewee.Database) -> Iterator[None]:
    """Run the block with the models bound to ``db`` (a Store does this for each call)."""
    token = _current.set(db)
    try:
        yield
    finally:
        _current.reset(token)


class BytesField(peewee.BlobField):
    """A BLOB stored from ``bytes`` on every backend (peewee's BlobField picks its adapter
    from the one database a proxy was initialized with; a store's models have several)."""

    def _db_hook(self, database: peewee.Database | None) -> None:
        self._constructor = bytes


class BaseModel(peewee.Model):
    """Column types hold on both backends: ``TextField``, never ``CharField`` (PostgreSQL's
    ``VARCHAR(255)`` refuses what SQLite keeps: a 256-character id, a long outcome or name);
    ``DoubleField``, never ``FloatField`` (peewee's FLOAT is PostgreSQL's 4-byte ``REAL``,
    which rounds an epoch time to 128 s). On SQLite both declare the same affinity, so an
    existing file needs no migration."""

    class Meta:
        database = database


class Meta(BaseModel):
    """Key/value facts about the database itself (the schema version)."""

    key = peewee.TextField(primary_key=True)
    value = peewee.TextField()

    class Meta:
        table_name = "meta"


class Training(BaseModel):
    """One row per FAL request: the one true state of a training."""

    name = peewee.TextField()
    training_type = peewee.TextField()
    endpoint = peewee.TextField()
    request_id = peewee.TextField(unique=True)
    status_url = peewee.TextField(null=True)
    response_url = peewee.TextField(null=True)
    cancel_url = peewee.TextField(null=True)
    input_json = peewee.TextField(null=True)
    status = peewee.TextField(default="SUBMITTED", index=True)
    progress = peewee.IntegerField(default=0)
    trigger_phrase = peewee.TextField(null=True)
    lora_url = peewee.TextField(null=True)
    config_url = peewee.TextField(null=True)
    finetune_id = peewee.TextField(null=True)
    result_json = peewee.TextField(null=True)
    result_layer = peewee.TextField(null=True)
    is_fallback = peewee.BooleanField(default=False)
    fallback_layer = peewee.TextField(null=True)
    fallback_reason = peewee.TextField(null=True)
    fallback_kind = peewee.TextField(null=True)
    failure_detail = peewee.TextField(null=True)
    submitted_at = peewee.DoubleField()
    started_at = peewee.DoubleField(null=True)
    fal_completed_at = peewee.DoubleField(null=True)
    completed_at = peewee.DoubleField(null=True)
    last_checked_at = peewee.DoubleField(null=True)
    next_check_at = peewee.DoubleField(null=True, index=True)
    delayed_check_at = peewee.DoubleField(null=True, index=True)
    deadline_at = peewee.DoubleField(null=True, index=True)
    attempts = peewee.IntegerField(default=0)
    last_error = peewee.TextField(null=True)
    lora_checked_at = peewee.DoubleField(null=True)
    lora_available = peewee.BooleanField(null=True)
    updated_at = peewee.DoubleField()
    cancel_requested_at = peewee.DoubleField(null=True)
    result_errors = peewee.IntegerField(default=0)  # untyped 5xx on the result after COMPLETED
    # Its claim (schema 6, issue 11): the instance handling it now, and until when.
    claimed_by = peewee.TextField(null=True, index=True)
    claim_expires_at = peewee.DoubleField(null=True)

    class Meta:
        table_name = "trainings"
        only_save_dirty = True  # an UPDATE of the changed columns, not all 35


class WebhookReceipt(BaseModel):
    """A webhook as it arrived: raw bytes first, meaning later (by reconcile)."""

    request_id = peewee.TextField(null=True, index=True)
    dedupe_key = peewee.TextField(null=True, unique=True)
    body = BytesField()  # a refused request: only its first REFUSED_BODY_KEPT bytes
    headers_json = peewee.TextField()
    verification = peewee.TextField()  # verified | unverified | skipped | rejected
    reject_reason = peewee.TextField(null=True)
    received_at = peewee.DoubleField()
    processed_at = peewee.DoubleField(null=True, index=True)
    outcome = peewee.TextField(null=True, index=True)
    body_size = peewee.IntegerField(null=True)  # the whole body's length (schema 4 on)
    body_sha256 = peewee.TextField(null=True)  # the whole body's digest (schema 4 on)

    class Meta:
        table_name = "webhook_receipts"
        # The prunes and the bounds walk it (schema 4): count and bytes by verification.
        indexes = ((("verification", "body_size"), False),)


class Event(BaseModel):
    """Every transition, fallback, upgrade and error of a training (the history)."""

    training = peewee.ForeignKeyField(Training, null=True, backref="events", on_delete="CASCADE")
    request_id = peewee.TextField(index=True)
    at = peewee.DoubleField()
    layer = peewee.TextField()
    kind = peewee.TextField()
    from_status = peewee.TextField(null=True)
    to_status = peewee.TextField(null=True)
    detail = peewee.TextField(null=True)

    class Meta:
        table_name = "events"


class Schedule(BaseModel):
    """When a periodic layer runs next: a time in the database, never an in-memory sleep."""

    name = peewee.TextField(primary_key=True)
    next_at = peewee.DoubleField()

    class Meta:
        table_name = "schedules"


class Outbox(BaseModel):
    """Events for a consumer (the bot's delivery), written in the transition's transaction."""

    consumer = peewee.TextField(index=True)
    message_id = peewee.TextField(unique=True)  # stable across retries (webhook-id)
    request_id = peewee.TextField(index=True)
    event = peewee.TextField()
    payload_json = peewee.TextField()
    created_at = peewee.DoubleField()
    next_attempt_at = peewee.DoubleField(index=True)
    attempts = peewee.IntegerField(default=0)
    delivered_at = peewee.DoubleField(null=True, index=True)
    abandoned_at = peewee.DoubleField(null=True)
    last_error = peewee.TextField(null=True)
    # Its claim (schema 6, issue 11): the instance handling it now, and until when.
    claimed_by = peewee.TextField(null=True, index=True)
    claim_expires_at = peewee.DoubleField(null=True)

    class Meta:
        table_name = "outbox"


class Artifact(BaseModel):
    """A file of a real result kept on our own disk (FAL deletes its media after ~a week)."""

    request_id = peewee.TextField(index=True)
    kind = peewee.TextField()  # "lora" | "config"
    url = peewee.TextField()
    path = peewee.TextField(null=True)
    expected_size = peewee.IntegerField(null=True)
    size = peewee.IntegerField(null=True)
    sha256 = peewee.TextField(null=True)
    stored_at = peewee.DoubleField(null=True)
    attempts = peewee.IntegerField(default=0)
    next_attempt_at = peewee.DoubleField(index=True)
    last_error = peewee.TextField(null=True)
    # Its claim (schema 6, issue 11): the instance handling it now, and until when.
    claimed_by = peewee.TextField(null=True, index=True)
    claim_expires_at = peewee.DoubleField(null=True)

    class Meta:
        table_name = "artifacts"
        indexes = ((("request_id", "kind"), True),)


class Instance(BaseModel):
    """One running trainguard process on this database (schema 5): registered at start,
    its ``heartbeat_at`` moved every ``[cluster] heartbeat_seconds``, deleted on a clean stop.
    Times are the database's own clock (``Dialect.now_sql``), so hosts' clocks never differ."""

    id = peewee.TextField(primary_key=True)
    host = peewee.TextField()
    pid = peewee.IntegerField()
    version = peewee.TextField()
    started_at = peewee.DoubleField()
    heartbeat_at = peewee.DoubleField(index=True)
    webhook_listen = peewee.TextField(null=True)
    metrics_listen = peewee.TextField(null=True)

    class Meta:
        table_name = "instances"


class Lease(BaseModel):
    """A leader role (schema 5; River's ``river_leader``): held by ``holder`` (an instance
    id) until ``expires_at`` (the database's clock), renewed by it, free once expired."""

    name = peewee.TextField(primary_key=True)
    holder = peewee.TextField()
    expires_at = peewee.DoubleField()

    class Meta:
        table_name = "leases"


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


def _migrate_5(db: peewee.Database) -> None:
    """Several instances on one database (issue 11): their rows and the leader leases."""
    db.create_tables([Instance, Lease])


def _migrate_6(db: peewee.Database) -> None:
    """Claims (issue 11): ``claimed_by`` (indexed) and ``claim_expires_at`` on trainings,
    outbox and artifacts (a table created from the current model already has them)."""
    migrator = playhouse.migrate.SchemaMigrator.from_database(db)
    for model in (Training, Outbox, Artifact):
        table = model._meta.table_name
        existing = {column.name for column in db.get_columns(table)}
        playhouse.migrate.migrate(
            *(
                migrator.add_column(table, name, getattr(model, name))  # with its index
                for name in ("claimed_by", "claim_expires_at")
                if name not in existing
            )
        )


#: Forward migrations, applied in order at open; never edit a released one, append.
MIGRATIONS: tuple[tuple[int, Callable[[peewee.Database], None]], ...] = (
    (1, _migrate_1),
    (2, _migrate_2),
    (3, _migrate_3),
    (4, _migrate_4),
    (5, _migrate_5),
    (6, _migrate_6),
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
    return dialect_for(url).open(url)


def _upsert(model: type[BaseModel], values: dict[str, Any]) -> None:
    """Insert a row or update the one with the same primary key (portable: ON CONFLICT)."""
    key = model._meta.primary_key
    update = {model._meta.fields[k]: v for k, v in values.items() if k != key.name}
    model.insert(values).on_conflict(conflict_target=[key], update=update).execute()


def migrate(db: peewee.Database, dialect: Dialect) -> int:
    """Bring the schema up to ``SCHEMA_VERSION`` in one transaction, one process at a time
    (``Dialect.lock_schema``); returns the version found before."""
    with db.atomic():
        dialect.lock_schema(db)
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
        _upsert(Meta, {"key": "schema_version", "value": str(SCHEMA_VERSION)})
    return before


class Connection:
    """What a function run by ``store.read`` / ``store.write`` gets as its first argument:
    this store's database (the models are bound to it for the call)."""

    __slots__ = ("db", "dialect")

    def __init__(self, db: peewee.Database, dialect: Dialect) -> None:
        self.db = db
        self.dialect = dialect

    def atomic(self) -> Any:
        """A transaction, or a savepoint inside one, of this store's database."""
        return self.db.atomic()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run plain SQL (in this dialect's parameter style); the driver's cursor."""
        return self.db.execute_sql(sql, params)


#: The due times a layer sweeps (``Store.due``): each names a column of trainings and which
#: trainings it counts for.
DueKind = Literal["next_check", "delayed_check", "deadline"]

#: Fallbacks FAL has said its last word on: never asked again.
FINAL_FALLBACKS = ("fal_failure", "expired")


def _due_where(kind: DueKind) -> tuple[peewee.Field, peewee.Expression]:
    """The column of a due kind and which trainings it counts for: the poller's status
    checks and the emergency deadline for unfinished ones, the delayed check for every
    training but a cancelled one (it also verifies a finished result)."""
    if kind == "next_check":
        return Training.next_check_at, Training.status.in_(UNFINISHED)
    if kind == "deadline":
        return Training.deadline_at, Training.status.in_(UNFINISHED)
    if kind == "delayed_check":
        return Training.delayed_check_at, Training.status != "CANCELLED"
    raise ValueError(f"unknown due kind {kind!r}")


def _views(rows: Iterable[Training]) -> list[TrainingView]:
    return [TrainingView.of(row) for row in rows]


#: The tables whose rows are claimed (``Store.release``, ``trainguard_rescued_total{kind}``).
ClaimKind = Literal["trainings", "outbox", "artifacts"]
_CLAIMED: dict[ClaimKind, type[BaseModel]] = {
    "trainings": Training,
    "outbox": Outbox,
    "artifacts": Artifact,
}


@dataclass(frozen=True)
class Claimed(Generic[C]):
    """What one claim took: the rows, now this owner's until their claim expires, and the
    ids of those taken over from another owner (whose claim had expired, or who is gone),
    with that owner."""

    items: list[C]
    rescued: dict[int, str]


def _claimable(model: type[BaseModel], now: float, gone: Sequence[str]) -> peewee.Expression:
    """A row nobody holds: never claimed or released, its claim expired, or held by an
    owner known to be ``gone`` (``trainguard.identity.gone``)."""
    free = model.claimed_by.is_null() | (model.claim_expires_at < now)
    return free | model.claimed_by.in_(list(gone)) if gone else free


def _free_at(model: type[BaseModel], column: peewee.Field) -> peewee.Node:
    """When a row is due for anyone: ``column``, or its claim's expiry when that is later."""
    later = model.claim_expires_at > column
    return peewee.Case(None, [(later, model.claim_expires_at)], column)


def _claim(
    conn: Connection,
    model: type[BaseModel],
    candidates: peewee.ModelSelect,
    owner: str,
    until: float,
) -> tuple[list[Any], dict[int, str]]:
    """Claim what ``candidates`` picks for ``owner`` until ``until`` (``Dialect.claim``);
    the rows and those taken over from another owner."""
    values = {model.claimed_by: owner, model.claim_expires_at: until}
    taken = conn.dialect.claim(model, candidates, values)
    rescued = {row.id: was for row, was in taken if was is not None and was != owner}
    return [row for row, _ in taken], rescued


def _released(model: type[BaseModel], owner: str) -> dict[Any, Any]:
    """Update values that give up ``owner``'s claim of a row and keep anyone else's."""
    mine = model.claimed_by == owner
    return {
        model.claimed_by: peewee.Case(None, [(mine, None)], model.claimed_by),
        model.claim_expires_at: peewee.Case(None, [(mine, None)], model.claim_expires_at),
    }


@dataclass(frozen=True)
class OutboxMessage:
    """One outbox entry as a consumer sends it."""

    id: int
    message_id: str
    request_id: str
    event: str
    body: str
    attempts: int
    last_error: str | None

    @classmethod
    def of(cls, row: Outbox) -> OutboxMessage:
        return cls(
            row.id,
            row.message_id,
            row.request_id,
            row.event,
            row.payload_json,
            row.attempts,
            row.last_error,
        )


def _outbox_pending(consumer: str) -> peewee.Expression:
    return (
        (Outbox.consumer == consumer)
        & Outbox.delivered_at.is_null()
        & Outbox.abandoned_at.is_null()
    )


def _outbox_heads(consumer: str) -> peewee.ModelSelect:
    """The oldest pending entry of each training: the only one that may be sent."""
    return (
        Outbox.select(peewee.fn.MIN(Outbox.id))
        .where(_outbox_pending(consumer))
        .group_by(Outbox.request_id)
    )


def _outbox_held(consumer: str, now: float, gone: Sequence[str]) -> peewee.ModelSelect:
    """The trainings with an entry someone holds at ``now`` (not ``gone``)."""
    held = Outbox.claimed_by.is_null(False) & ~_claimable(Outbox, now, gone)
    return Outbox.select(Outbox.request_id).where(Outbox.consumer == consumer, held)


class OutboxTable:
    """Named operations on the outbox: per consumer, events written in the transitions'
    transactions, sent in order per training (the oldest pending entry, the head, first)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def stopped_since_delivered(self, consumer: str, reason: str) -> bool:
        """Whether entries were abandoned with ``reason`` and nothing was delivered since."""

        def get(conn: Connection) -> bool:
            gone_at = (
                Outbox.select(peewee.fn.MAX(Outbox.abandoned_at))
                .where(Outbox.consumer == consumer, Outbox.last_error == reason)
                .scalar()
            )
            if gone_at is None:
                return False
            delivered_since = Outbox.select().where(
                Outbox.consumer == consumer, Outbox.delivered_at >= gone_at
            )
            return not delivered_since.exists()

        return await self._store.read(get)

    async def claim_heads(
        self,
        consumer: str,
        now: float,
        busy: Sequence[str],
        limit: int,
        owner: str,
        claim_seconds: float,
        gone: Sequence[str] = (),
    ) -> Claimed[OutboxMessage]:
        """Claim the oldest due heads, ``limit`` at most, of trainings not in ``busy`` and
        with no entry anyone holds (one sender per training, so in order across instances),
        for ``owner`` during ``claim_seconds``. ``delivered`` and ``failed`` release them."""

        def claim(conn: Connection) -> Claimed[OutboxMessage]:
            candidates = (
                Outbox.select()
                .where(
                    Outbox.id.in_(_outbox_heads(consumer)),
                    Outbox.next_attempt_at <= now,
                    Outbox.request_id.not_in(list(busy)),
                    Outbox.request_id.not_in(_outbox_held(consumer, now, gone)),
                    # The row's own state again: on PostgreSQL a row another instance
                    # claimed or delivered since this statement's snapshot is re-checked
                    # against these conditions only (the subqueries keep the old snapshot).
                    _outbox_pending(consumer),
                    _claimable(Outbox, now, gone),
                )
                .order_by(Outbox.id)
                .limit(limit)
            )
            rows, rescued = _claim(conn, Outbox, candidates, owner, now + claim_seconds)
            rows.sort(key=lambda row: row.id)
            return Claimed([OutboxMessage.of(row) for row in rows], rescued)

        return await self._store.write(claim)

    async def stats(
        self, consumer: str, busy: Sequence[str], now: float
    ) -> tuple[int, float | None, float | None]:
        """(pending entries, the oldest one's creation time, when the next head of a
        training not in ``busy`` and not held by anyone at ``now`` is due)."""

        def get(conn: Connection) -> tuple[int, float | None, float | None]:
            backlog, oldest = (
                Outbox.select(peewee.fn.COUNT(Outbox.id), peewee.fn.MIN(Outbox.created_at))
                .where(_outbox_pending(consumer))
                .tuples()
                .get()
            )
            next_due = (
                Outbox.select(peewee.fn.MIN(Outbox.next_attempt_at))
                .where(
                    Outbox.id.in_(_outbox_heads(consumer)),
                    Outbox.request_id.not_in(list(busy)),
                    Outbox.request_id.not_in(_outbox_held(consumer, now, ())),
                )
                .scalar()
            )
            return backlog, oldest, next_due

        return await self._store.read(get)

    async def delivered(self, entry_id: int, now: float, owner: str) -> None:
        """The bot acknowledged it; ``owner``'s claim of it is given up in the same update."""

        def set_delivered(conn: Connection) -> None:
            values: dict[Any, Any] = {
                Outbox.delivered_at: now,
                Outbox.attempts: Outbox.attempts + 1,
                Outbox.last_error: None,
                **_released(Outbox, owner),
            }
            Outbox.update(values).where(Outbox.id == entry_id).execute()

        await self._store.write(set_delivered)

    async def failed(
        self, entry_id: int, error: str, next_attempt_at: float | None, owner: str
    ) -> None:
        """One more failed attempt; retried at ``next_attempt_at`` (None: as it was).
        ``owner``'s claim of it is given up in the same update."""

        def set_failed(conn: Connection) -> None:
            values: dict[Any, Any] = {
                Outbox.attempts: Outbox.attempts + 1,
                Outbox.last_error: error,
                **_released(Outbox, owner),
            }
            if next_attempt_at is not None:
                values[Outbox.next_attempt_at] = next_attempt_at
            Outbox.update(values).where(Outbox.id == entry_id).execute()

        await self._store.write(set_failed)

    async def abandon_created_before(
        self, consumer: str, cutoff: float, now: float, reason: Callable[[str | None], str]
    ) -> list[OutboxMessage]:
        """Abandon every pending entry created before ``cutoff``, each with
        ``reason(its last error)``; returns them as they were."""

        def abandon(conn: Connection) -> list[OutboxMessage]:
            query = (
                Outbox.select()
                .where(_outbox_pending(consumer), Outbox.created_at < cutoff)
                .order_by(Outbox.id)
            )
            expired = []
            for row in query:
                Outbox.update(abandoned_at=now, last_error=reason(row.last_error)).where(
                    Outbox.id == row.id
                ).execute()
                expired.append(OutboxMessage.of(row))
            return expired

        return await self._store.write(abandon)

    async def abandon_pending(self, consumer: str, now: float, reason: str) -> int:
        """Abandon every pending entry with ``reason``; returns how many."""

        def abandon(conn: Connection) -> int:
            query = Outbox.update(abandoned_at=now, last_error=reason)
            return int(query.where(_outbox_pending(consumer)).execute())

        return await self._store.write(abandon)


@dataclass(frozen=True)
class ArtifactRow:
    """A file of a result to download (with its training's name, for the logs)."""

    id: int
    request_id: str
    kind: str
    url: str
    path: str | None
    expected_size: int | None
    attempts: int
    training_name: str | None


def _without_artifact(kind: str, column: peewee.Field) -> peewee.Expression:
    """A training whose ``column`` holds a URL with no artifact row of ``kind`` yet."""
    has = Artifact.select(Artifact.request_id).where(Artifact.kind == kind)
    return column.is_null(False) & Training.request_id.not_in(has)


def _create_artifact(conn: Connection, row: dict[str, Any]) -> bool:
    """Insert one planned row; True when the database refused it (then it is stored given
    up, with the reason)."""
    try:
        with conn.atomic():
            Artifact.insert(row).on_conflict_ignore().execute()
    except Exception as exc:  # boundary: one row the database refuses is given up alone
        given_up = {
            "request_id": row["request_id"],
            "kind": row["kind"],
            "url": row["url"],
            "next_attempt_at": math.inf,
            "last_error": f"not queued: {type(exc).__name__}: {exc}"[:2000],
        }
        Artifact.insert(given_up).on_conflict_ignore().execute()
        return True
    return False


class ArtifactsTable:
    """Named operations on the artifact store's rows: one per file of a real result."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def results_without_rows(self, limit: int) -> list[TrainingView]:
        """Real COMPLETED results with a LoRA or config URL that has no artifact row yet."""

        def get(conn: Connection) -> list[TrainingView]:
            query = Training.select().where(
                Training.status == "COMPLETED",
                ~Training.is_fallback,
                _without_artifact("lora", Training.lora_url)
                | _without_artifact("config", Training.config_url),
            )
            return _views(query.order_by(Training.id).limit(limit))

        return await self._store.read(get)

    async def create(self, rows: list[dict[str, Any]], now: float) -> int:
        """Insert the planned rows (due ``now`` unless a row says otherwise); returns how
        many the database refused. One row it refuses spoils only itself: it is stored given
        up with the reason instead, so the batch goes on and the file is visible as failed."""

        def create(conn: Connection) -> int:
            values = [{"next_attempt_at": now, "last_error": None, **row} for row in rows]
            try:
                with conn.atomic():  # a savepoint: the fast path, all rows at once
                    Artifact.insert_many(values).on_conflict_ignore().execute()
            except Exception:  # boundary: a refused batch is retried row by row
                return sum(_create_artifact(conn, row) for row in values)
            return 0

        return await self._store.write(create)

    async def claim_due(
        self,
        now: float,
        limit: int,
        owner: str,
        claim_seconds: float,
        gone: Sequence[str] = (),
    ) -> Claimed[ArtifactRow]:
        """Claim the files not stored yet whose next attempt has come and that nobody holds,
        the longest due first, for ``owner`` during ``claim_seconds`` (one download per
        file across instances; ``Store.release`` gives them up)."""

        def claim(conn: Connection) -> Claimed[ArtifactRow]:
            candidates = (
                Artifact.select()
                .where(
                    Artifact.stored_at.is_null(),
                    Artifact.next_attempt_at <= now,
                    _claimable(Artifact, now, gone),
                )
                .order_by(Artifact.next_attempt_at, Artifact.id)
                .limit(limit)
            )
            rows, rescued = _claim(conn, Artifact, candidates, owner, now + claim_seconds)
            rows.sort(key=lambda a: (a.next_attempt_at, a.id))
            names = dict(
                Training.select(Training.request_id, Training.name)
                .where(Training.request_id.in_([a.request_id for a in rows]))
                .tuples()
            )
            files = [
                ArtifactRow(
                    a.id,
                    a.request_id,
                    a.kind,
                    a.url,
                    a.path,
                    a.expected_size,
                    a.attempts,
                    names.get(a.request_id),
                )
                for a in rows
            ]
            return Claimed(files, rescued)

        return await self._store.write(claim)

    async def next_due(self) -> float | None:
        """When the next file not stored yet is due for anyone (a held one: when its claim
        expires, if that is later; None: none)."""

        def get(conn: Connection) -> float | None:
            query = Artifact.select(peewee.fn.MIN(_free_at(Artifact, Artifact.next_attempt_at)))
            return query.where(Artifact.stored_at.is_null()).scalar()

        return await self._store.read(get)

    async def update(self, artifact_id: int, **values: Any) -> None:
        """Set columns of one row (``size``, ``sha256``, ``stored_at``, ``attempts``,
        ``next_attempt_at``, ``last_error``)."""

        def update(conn: Connection) -> None:
            Artifact.update(**values).where(Artifact.id == artifact_id).execute()

        await self._store.write(update)

    async def by_request(self) -> dict[str, list[dict[str, Any]]]:
        """Every row by request: whether each file is on our disk, with its sha256;
        ``given_up``: the download will not be tried again."""
        return await self._store.read(artifacts_by_request)


def artifacts_by_request(conn: Connection) -> dict[str, list[dict[str, Any]]]:
    """See ``ArtifactsTable.by_request`` (this runs on the database thread)."""
    files: dict[str, list[dict[str, Any]]] = {}
    for a in Artifact.select().order_by(Artifact.request_id, Artifact.kind.desc()):
        files.setdefault(a.request_id, []).append(
            {
                "kind": a.kind,
                "stored": a.stored_at is not None,
                "sha256": a.sha256,
                "size": a.size,
                "path": a.path,
                "last_error": a.last_error,
                "given_up": a.stored_at is None and math.isinf(a.next_attempt_at),
            }
        )
    return files


@dataclass(frozen=True)
class InstanceRow:
    """A live instance as ``store.cluster.live`` finds it, with the leader roles it holds."""

    id: str
    host: str
    pid: int
    version: str
    started_at: float
    heartbeat_at: float
    webhook_listen: str | None
    metrics_listen: str | None
    roles: tuple[str, ...]


class ClusterTable:
    """Named operations on the instances and their leader leases (schema 5). Every time in
    these rows is the database's clock (``Dialect.now_sql``), never a host's."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def beat(self, values: dict[str, Any], *, start: bool) -> None:
        """Upsert this instance's row (``id``, ``host``, ``pid``, ``version``, the listen
        addresses) with its heartbeat at the database's now; ``start``: its start time too
        (a restart under a configured, fixed instance id starts anew)."""

        def beat(conn: Connection) -> None:
            now = peewee.SQL(conn.dialect.now_sql)
            kept = {"id", "host", "pid", "version"} if not start else {"id"}
            update: dict[Any, Any] = {
                Instance._meta.fields[k]: v for k, v in values.items() if k not in kept
            }
            update[Instance.heartbeat_at] = now
            if start:
                update[Instance.started_at] = now
            row = {**values, "started_at": now, "heartbeat_at": now}
            Instance.insert(row).on_conflict(conflict_target=[Instance.id], update=update).execute()

        await self._store.write(beat)

    async def try_lead(self, role: str, holder: str, seconds: float) -> tuple[str, float]:
        """Take or renew the lease of ``role`` for ``holder`` for ``seconds``: in one
        statement, inserted when nobody holds it, else updated only where ``holder`` holds it
        already or its lease has expired. Returns who holds it now (committed) and in how
        many seconds that lease expires. On PostgreSQL the conflicting row is locked and the
        WHERE is judged on its latest committed version, so two racers never both get it."""

        def lead(conn: Connection) -> tuple[str, float]:
            now = peewee.SQL(conn.dialect.now_sql)
            Lease.insert(name=role, holder=holder, expires_at=now + seconds).on_conflict(
                conflict_target=[Lease.name],
                update={Lease.holder: holder, Lease.expires_at: now + seconds},
                where=(Lease.holder == holder) | (Lease.expires_at < now),
            ).execute()
            query = Lease.select(Lease.holder, Lease.expires_at - now).where(Lease.name == role)
            current, left = query.tuples().get()
            return str(current), float(left)

        return await self._store.write(lead)

    async def leave(self, holder: str) -> None:
        """Delete the leases ``holder`` holds (another instance takes over at once) and its
        row, in one transaction. Run between batches, not by the writer: on a clean stop
        the store's writer may already have been cancelled with everything else."""

        def leave(conn: Connection) -> None:
            with conn.atomic():
                Lease.delete().where(Lease.holder == holder).execute()
                Instance.delete().where(Instance.id == holder).execute()

        await self._store.read(leave)

    async def silent(self, within: float) -> list[str]:
        """The instances whose last heartbeat is more than ``within`` seconds old (dead,
        or cut off from the database for that long), until ``prune`` deletes their rows."""

        def get(conn: Connection) -> list[str]:
            old = Instance.heartbeat_at < peewee.SQL(conn.dialect.now_sql) - within
            return sorted(i for (i,) in Instance.select(Instance.id).where(old).tuples())

        return await self._store.read(get)

    async def prune(self, older_than: float) -> int:
        """Delete the rows of instances silent for more than ``older_than`` seconds (gone
        without a clean stop); how many."""

        def prune(conn: Connection) -> int:
            old = Instance.heartbeat_at < peewee.SQL(conn.dialect.now_sql) - older_than
            return int(Instance.delete().where(old).execute())

        return await self._store.write(prune)

    async def live(self, within: float) -> list[InstanceRow]:
        """Instances whose heartbeat is at most ``within`` seconds old, by start time, each
        with the roles whose unexpired lease it holds."""

        def get(conn: Connection) -> list[InstanceRow]:
            now = peewee.SQL(conn.dialect.now_sql)
            roles: dict[str, list[str]] = {}
            for lease in Lease.select().where(Lease.expires_at >= now).order_by(Lease.name):
                roles.setdefault(lease.holder, []).append(lease.name)
            query = Instance.select().where(Instance.heartbeat_at >= now - within)
            return [
                InstanceRow(
                    i.id,
                    i.host,
                    i.pid,
                    i.version,
                    i.started_at,
                    i.heartbeat_at,
                    i.webhook_listen,
                    i.metrics_listen,
                    tuple(roles.get(i.id, ())),
                )
                for i in query.order_by(Instance.started_at, Instance.id)
            ]

        return await self._store.read(get)


class _CutBeforeBegin(Exception):
    """The BEGIN of a write batch found the connection cut: nothing of the batch ran."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class Store:
    """One database behind one limiter, with a group-commit writer (see module doc).
    Several stores may be open in one process, each on its own database."""

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
        #: Since when (monotonic) the connection to the database is lost; None: connected.
        self._lost_since: float | None = None
        self._reconnect_wait = RECONNECT_FIRST_SECONDS
        self._reconnect_at = 0.0
        self.dialect = dialect_for(url)
        self.db = self.dialect.open(url)
        self.conn = Connection(self.db, self.dialect)
        self.outbox = OutboxTable(self)
        self.artifacts = ArtifactsTable(self)
        self.cluster = ClusterTable(self)

    # -- lifecycle -------------------------------------------------------------------------
    def _open(self) -> None:
        self.db.connect(reuse_if_open=True)
        migrate(self.db, self.dialect)
        self.dialect.prepare(self.db)

    def _close(self) -> None:
        if not self.db.is_closed():
            self.db.close()

    async def _writer(
        self,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with scope:
            await self._write_batches(task_status)

    async def _write_batches(self, task_status: trio.TaskStatus[None]) -> None:
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
            try:
                self._connected()
            except StoreError as exc:  # no connection: no write of the batch is run
                self._last_batch_failed = True
                return [(False, exc)] * len(batch)
            try:
                results = self._commit_batch(batch)
            except _CutBeforeBegin as cut:
                # Nothing of the batch ran: run it again, once, on a new connection.
                try:
                    self._lost(cut.error)
                    self._connected()
                except StoreError as exc:
                    self._last_batch_failed = True
                    return [(False, exc)] * len(batch)
                try:
                    results = self._commit_batch(batch)
                except _CutBeforeBegin as again:
                    self._last_batch_failed = True
                    return [(False, self._lost(again.error))] * len(batch)
            return self._retry_deadlocked(batch, results)
        finally:
            self._committing_since = None

    def _retry_deadlocked(
        self, batch: list[_Write], results: list[tuple[bool, Any]]
    ) -> list[tuple[bool, Any]]:
        """Run each write the database failed for meeting another process's transaction
        (``Dialect.retryable``) once more, alone in a transaction of its own, once the rest
        of its batch is committed and its locks are released. Alone, a write locks only its
        own rows, so it cannot meet the same deadlock from within its batch again."""
        for i, (ok, value) in enumerate(results):
            if not ok and isinstance(value, Exception) and self.dialect.retryable(value):
                try:
                    results[i] = self._commit_batch([batch[i]])[0]
                except _CutBeforeBegin as cut:  # the rest is committed: this one alone fails
                    results[i] = (False, self._lost(cut.error))
        return results

    def _commit_batch(self, batch: list[_Write]) -> list[tuple[bool, Any]]:
        """The batch in one transaction. Raises ``_CutBeforeBegin`` when the connection
        was found cut by the BEGIN itself (a server restart cuts idle connections, and that
        shows only at their next statement): nothing of the batch ran, so it may run again."""
        results: list[tuple[bool, Any]] = []
        lost: TransactionRolledBack | None = None
        begun = False
        try:
            with self.db.atomic():  # its ROLLBACK fails when there is nothing left to roll back
                begun = True
                for item in batch:
                    error: Exception | None = None
                    try:
                        with self.db.atomic():  # a savepoint: one failure spoils only itself
                            try:
                                value = item.fn(self.conn, *item.args)
                            # boundary: a write function's error goes to its writer
                            except Exception as exc:
                                error = exc
                                raise
                        results.append((True, value))
                    except Exception as exc:  # boundary: one write's failure spoils only itself
                        results.append((False, error or exc))
                    if self.dialect.transaction_lost(self.db.connection()):
                        lost = TransactionRolledBack(
                            "the database rolled the write batch back: nothing of it is stored"
                            + (f" ({error!r})" if error else "")
                        )
                        raise lost
        except Exception as exc:  # the commit itself failed: nothing of the batch is stored
            if not begun and self._connection_lost():
                raise _CutBeforeBegin(exc) from exc
            self._last_batch_failed = True
            if self._connection_lost():
                # Cut during the batch (a COMMIT cut short may have been stored whole or
                # not at all, never in part): every writer is answered failed, and retries.
                failure: Exception = self._lost(exc)
                return [(False, failure)] * len(batch)
            failure = lost or exc
            own = [value if not ok else failure for ok, value in results]
            return [(False, own[i] if i < len(own) else failure) for i in range(len(batch))]
        self._last_batch_failed = False
        return results

    def stalled(self) -> bool:
        """Whether durable writes are not going through right now: the last batch failed
        whole (a locked or full database, a lost connection), the connection to the
        database is lost, or a commit has run longer than ``STALL_SECONDS``. Cheap and
        immediate, for ``/readyz``."""
        since = self._committing_since
        return (
            self._last_batch_failed
            or self._lost_since is not None
            or (since is not None and time.monotonic() - since > STALL_SECONDS)
        )

    def lost_for(self) -> float:
        """For how many seconds the connection to the database has been lost and not
        regained (0.0 while connected): the supervisor stops feeding the watchdog past a
        bound."""
        since = self._lost_since
        return 0.0 if since is None else time.monotonic() - since

    # -- the connection (runs on the database thread) --------------------------------------
    def _connection_lost(self) -> bool:
        return not self.db.is_closed() and self.dialect.connection_lost(self.db.connection())

    def _lost(self, exc: BaseException) -> StoreError:
        """The connection is gone (found by ``exc``): remember since when, and the error
        every caller of this call gets."""
        if self._lost_since is None:
            self._lost_since = time.monotonic()
        error = StoreError(f"the connection to the database was lost: {exc}")
        error.__cause__ = exc
        return error

    def _connected(self) -> None:
        """Reconnect if the connection was lost, with backoff; StoreError while it cannot."""
        if self._lost_since is None and not self._connection_lost():
            return
        if self._lost_since is None:
            self._lost_since = time.monotonic()
        now = time.monotonic()
        if now < self._reconnect_at:
            raise StoreError(
                f"the database is unreachable; reconnecting in {self._reconnect_at - now:.1f} s"
            )
        self.db.close()  # forget the dead connection (closing it again is harmless)
        try:
            self.db.connect()
        except (peewee.OperationalError, peewee.InterfaceError) as exc:
            self._reconnect_at = now + self._reconnect_wait * random.uniform(0.5, 1.0)
            self._reconnect_wait = min(self._reconnect_wait * 2, RECONNECT_CAP_SECONDS)
            raise StoreError(f"the database is unreachable: {exc}") from exc
        self._lost_since = None
        self._reconnect_wait = RECONNECT_FIRST_SECONDS
        self._reconnect_at = 0.0

    def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """A read on the database thread: reconnected first when the connection was lost.
        A connection found cut by it (idle connections cut by a server restart show it only
        at their next statement) is replaced and the read run once more: what runs here
        changes nothing or is idempotent (``cluster.leave``), so running it again is
        harmless. Cut again, it fails as a StoreError."""
        for attempt in range(2):
            self._connected()
            try:
                return fn(self.conn, *args)
            except (peewee.OperationalError, peewee.InterfaceError) as exc:
                if not self._connection_lost():
                    raise
                error = self._lost(exc)
                if attempt:
                    raise error from exc
        raise AssertionError("unreachable")

    # -- the two doors ---------------------------------------------------------------------
    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in a durable transaction; return its value once committed."""
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
        """Run ``fn(conn, *args)`` on the database thread between write batches."""
        return await self._call(self._read, fn, *args)

    def _bound_call(self, fn: Callable[..., T], *args: Any) -> T:
        with bound(self.db):
            return fn(*args)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the database thread slot (or inline, see ``inline``), with the
        models bound to this store's database."""
        if self.inline:
            async with self._limiter:
                return self._bound_call(fn, *args)
        return await trio.to_thread.run_sync(self._bound_call, fn, *args, limiter=self._limiter)

    # -- named reads of trainings ----------------------------------------------------------
    async def training(self, request_id: str) -> TrainingView | None:
        def get(conn: Connection) -> TrainingView | None:
            row = Training.get_or_none(Training.request_id == request_id)
            return TrainingView.of(row) if row else None

        return await self.read(get)

    async def trainings(
        self,
        *,
        status: str | None = None,
        name: str | None = None,
        submitted_before: float | None = None,
        order: Literal["id", "submitted_at"] = "id",
        limit: int | None = None,
        offset: int = 0,
    ) -> list[TrainingView]:
        """Trainings matching every filter given (``submitted_before``: submitted at or
        before that time), ordered by ``order`` then id, as snapshots."""

        def get(conn: Connection) -> list[TrainingView]:
            query = Training.select()
            if status is not None:
                query = query.where(Training.status == status)
            if name is not None:
                query = query.where(Training.name == name)
            if submitted_before is not None:
                query = query.where(Training.submitted_at <= submitted_before)
            if order == "submitted_at":
                query = query.order_by(Training.submitted_at, Training.id)
            else:
                query = query.order_by(Training.id)
            if limit is not None:
                query = query.limit(limit).offset(offset)
            return _views(query)

        return await self.read(get)

    async def due(self, kind: DueKind, now: float, limit: int) -> list[TrainingView]:
        """Trainings whose ``kind`` time has come (at or before ``now``), the earliest
        first, ``limit`` at most (see ``DueKind``)."""
        column, counts = _due_where(kind)

        def get(conn: Connection) -> list[TrainingView]:
            query = Training.select().where(column <= now, counts)
            return _views(query.order_by(column, Training.id).limit(limit))

        return await self.read(get)

    async def claim_due(
        self,
        kind: DueKind,
        now: float,
        limit: int,
        owner: str,
        claim_seconds: float,
        gone: Sequence[str] = (),
    ) -> Claimed[TrainingView]:
        """Claim the trainings ``due`` would return that nobody holds (free, their claim
        expired, or held by an owner in ``gone``) for ``owner`` during ``claim_seconds``, the
        earliest first, in one statement where the database allows (``Dialect.claim``), so
        two instances never take the same training. ``release`` gives them up."""
        column, counts = _due_where(kind)

        def claim(conn: Connection) -> Claimed[TrainingView]:
            candidates = (
                Training.select()
                .where(column <= now, counts, _claimable(Training, now, gone))
                .order_by(column, Training.id)
                .limit(limit)
            )
            rows, rescued = _claim(conn, Training, candidates, owner, now + claim_seconds)
            rows.sort(key=lambda row: (getattr(row, column.name), row.id))
            return Claimed(_views(rows), rescued)

        return await self.write(claim)

    async def release(self, kind: ClaimKind, ids: Sequence[int], owner: str) -> int:
        """Give up ``owner``'s claims of these rows (one another owner has taken over since
        stays theirs); returns how many were given up."""
        model = _CLAIMED[kind]

        def release(conn: Connection) -> int:
            query = model.update({model.claimed_by: None, model.claim_expires_at: None})
            return int(query.where(model.id.in_(list(ids)), model.claimed_by == owner).execute())

        return await self.write(release) if ids else 0

    async def claim_owners(self, kind: ClaimKind) -> list[str]:
        """Every owner holding (or having held, expired) a claim in the table of ``kind``."""
        model = _CLAIMED[kind]

        def get(conn: Connection) -> list[str]:
            query = model.select(model.claimed_by).where(model.claimed_by.is_null(False))
            return sorted(owner for (owner,) in query.distinct().tuples())

        return await self.read(get)

    async def next_due(self, kind: DueKind) -> float | None:
        """The earliest ``kind`` time among the trainings it counts for (None: none); a
        training someone holds counts from when its claim expires, if that is later."""
        column, counts = _due_where(kind)

        def get(conn: Connection) -> float | None:
            query = Training.select(peewee.fn.MIN(_free_at(Training, column)))
            return query.where(column.is_null(False), counts).scalar()

        return await self.read(get)

    async def claim_unfinished(
        self,
        after: int,
        limit: int,
        owner: str,
        now: float,
        claim_seconds: float,
        gone: Sequence[str] = (),
    ) -> Claimed[TrainingView]:
        """Claim the next unfinished trainings nobody holds with an id above ``after``, by
        id, ``limit`` at most, for ``owner`` during ``claim_seconds`` (a sweep over all of
        them, page by page; one another instance is checking right now is passed over)."""

        def claim(conn: Connection) -> Claimed[TrainingView]:
            candidates = (
                Training.select()
                .where(
                    Training.status.in_(UNFINISHED),
                    Training.id > after,
                    _claimable(Training, now, gone),
                )
                .order_by(Training.id)
                .limit(limit)
            )
            rows, rescued = _claim(conn, Training, candidates, owner, now + claim_seconds)
            rows.sort(key=lambda row: row.id)
            return Claimed(_views(rows), rescued)

        return await self.write(claim)

    async def finished_incomplete(self, limit: int) -> list[TrainingView]:
        """Finished trainings worth asking FAL again, the longest unchecked first: a
        fallback FAL may still replace (not one in ``FINAL_FALLBACKS``), or a COMPLETED one
        without a trigger phrase, without both LoRA URL and finetune id, or (a real result)
        with a LoRA URL but no config URL."""

        def get(conn: Connection) -> list[TrainingView]:
            replaceable = Training.is_fallback & ~Training.fallback_kind.in_(FINAL_FALLBACKS)
            missing = (
                Training.trigger_phrase.is_null()
                | (Training.lora_url.is_null() & Training.finetune_id.is_null())
                | (
                    ~Training.is_fallback
                    & Training.config_url.is_null()
                    & Training.lora_url.is_null(False)
                )
            )
            query = Training.select().where(
                Training.status.in_(("COMPLETED", "FAILED")),
                replaceable | ((Training.status == "COMPLETED") & missing),
            )
            return _views(query.order_by(Training.last_checked_at, Training.id).limit(limit))

        return await self.read(get)

    async def lora_unchecked(self, limit: int) -> list[TrainingView]:
        """Real COMPLETED results whose LoRA URL was never probed or did not answer last
        time, the longest unprobed first."""

        def get(conn: Connection) -> list[TrainingView]:
            query = Training.select().where(
                Training.status == "COMPLETED",
                ~Training.is_fallback,
                Training.lora_url.is_null(False),
                Training.lora_checked_at.is_null() | (Training.lora_available == False),  # noqa: E712
            )
            return _views(query.order_by(Training.lora_checked_at, Training.id).limit(limit))

        return await self.read(get)

    async def pending_receipts(self) -> list[int]:
        """Ids of stored webhooks of KNOWN trainings never applied (verified or needing no
        verification, unprocessed, no outcome), oldest first. One for a training nobody
        registered is not among them: it waits for its registration or its eviction."""

        def get(conn: Connection) -> list[int]:
            query = (
                WebhookReceipt.select(WebhookReceipt.id)
                .where(
                    WebhookReceipt.processed_at.is_null(),
                    WebhookReceipt.outcome.is_null(),
                    WebhookReceipt.verification.in_(("verified", "skipped")),
                    WebhookReceipt.request_id.in_(Training.select(Training.request_id)),
                )
                .order_by(WebhookReceipt.id)
            )
            return [r.id for r in query]

        return await self.read(get)

    async def status_counts(self) -> dict[str, int]:
        def get(conn: Connection) -> dict[str, int]:
            query = Training.select(Training.status, peewee.fn.COUNT(Training.id)).group_by(
                Training.status
            )
            return {status: count for status, count in query.tuples()}

        return await self.read(get)

    async def events(self, request_id: str) -> list[dict[str, Any]]:
        def get(conn: Connection) -> list[dict[str, Any]]:
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
        def get(conn: Connection) -> float | None:
            row = Schedule.get_or_none(Schedule.name == name)
            return row.next_at if row else None

        return await self.read(get)

    async def set_schedule(self, name: str, next_at: float) -> None:
        await self.write(lambda conn: _upsert(Schedule, {"name": name, "next_at": next_at}))

    async def reclaim_space(self, pages: int = 2000) -> int:
        """Give free pages back to the file system (SQLite incremental vacuum, up to
        ``pages`` of them); returns how many pages were free before."""
        return await self.read(lambda conn: self.dialect.reclaim_space(self.db, pages))

    async def writable(self) -> bool:
        """Whether a durable write goes through right now (for /readyz)."""
        try:
            await self.write(lambda conn: Meta.select().count())
        except Exception:  # boundary: /readyz answers whatever the database does
            return False
        return True


def fal_user_ids(conn: Connection, request_id: str | None = None) -> dict[str, str]:
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
    """Open, migrate and run a Store's writer for the duration of the block.

    The writer is shielded until the block ends: a block being cancelled can still make its
    last writes (shielded), such as giving its claims back."""
    store = Store(url, **kwargs)
    try:
        await store._call(store._open)
        async with trio.open_nursery() as nursery:
            writer = trio.CancelScope(shield=True)
            await nursery.start(store._writer, writer)
            try:
                yield store
            finally:
                writer.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await store._call(store._close)
