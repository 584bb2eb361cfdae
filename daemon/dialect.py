"""Everything that differs between the SQL databases trainguard runs on, in one place.

A ``Dialect`` opens the peewee database for a ``[database] url`` and answers the few
questions where SQLite and PostgreSQL differ: how a lost transaction shows, whether a row
lock needs ``FOR UPDATE``, how freed space goes back to the file system, how rows are claimed
(``claim``). Every query of the store is otherwise portable (an upsert is ``INSERT ... ON
CONFLICT DO UPDATE`` on both).

Both are tested: the store, reconcile, layer and claim tests run on SQLite and on a
throwaway PostgreSQL server (``trainguard.testing.postgres``); a PostgreSQL server that
restarts is ``tests/test_pg_restart.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import peewee
import structlog

log = structlog.get_logger("trainguard.store")

#: How long a statement waits for another process's write lock before "database is locked".
BUSY_TIMEOUT_MS = 10_000
#: PostgreSQL: how long a (re)connect may take before it fails (libpq waits forever by
#: default); a ``connect_timeout`` in the URL's query wins.
CONNECT_TIMEOUT_SECONDS = 5
#: PostgreSQL: a network that drops packets without a reset (a partition, a host that
#: vanished) must fail a call, not hang it for TCP's ~15 minutes of retransmissions: a
#: statement's unacknowledged data gives up after ``tcp_user_timeout`` (ms), an idle or
#: waiting connection after ``keepalives_idle`` + ``keepalives_count`` x
#: ``keepalives_interval`` seconds. Then the store reconnects (``connection_lost``).
TCP_USER_TIMEOUT_MS = 20_000
#: libpq connection options trainguard sets unless the URL's query names them itself.
LIBPQ_DEFAULTS: dict[str, int] = {
    "connect_timeout": CONNECT_TIMEOUT_SECONDS,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 2,
    "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
}
#: PostgreSQL: the advisory lock key that serializes migrations (any fixed 64-bit number;
#: this one spells "trainGRD" in ASCII).
SCHEMA_LOCK_KEY = 0x747261696E475244


class Dialect:
    """What the store asks of a database backend (see the module doc)."""

    name = ""
    #: Appended to the SELECT that locks a training's row for its one writer.
    lock_suffix = ""
    #: The database's own clock in epoch seconds, as an SQL expression: the one clock that
    #: leases and heartbeats of several hosts are judged by (their own clocks may differ).
    now_sql = ""

    def open(self, url: str) -> peewee.Database:
        raise NotImplementedError

    def claim(
        self, model: type[peewee.Model], candidates: peewee.ModelSelect, values: dict[str, Any]
    ) -> list[tuple[Any, str | None]]:
        """Set ``values`` (the owner and expiry of a claim) on the rows ``candidates`` picks
        (a select of ``model``, ordered and limited) and return them, each with the owner
        whose claim it took over (None: it was free). Inside a write transaction."""
        raise NotImplementedError

    def lock_schema(self, db: peewee.Database) -> bool:
        """Inside the migration's transaction, before it reads the schema version: wait
        until no other process migrates the same database. Whether it had to wait."""
        return False

    def retryable(self, error: BaseException) -> bool:
        """Whether a write failed only because it met another process's transaction (a
        deadlock the server broke by failing it): run alone again, it may well pass."""
        return False

    def transaction_lost(self, connection: Any) -> bool:
        """Whether the transaction of a write batch is gone, so that a COMMIT would store
        nothing (``connection`` is the driver's own connection)."""
        raise NotImplementedError

    def connection_lost(self, connection: Any) -> bool:
        """Whether the driver's open ``connection`` to the database is gone (the server
        restarted, the network cut it): the store then reconnects before its next call. An
        embedded database has no connection to lose."""
        return False

    def prepare(self, db: peewee.Database) -> None:
        """Once after the migrations, on an open connection (no transaction)."""

    def reclaim_space(self, db: peewee.Database, pages: int) -> int:
        """Between batches (no transaction open): give up to ``pages`` freed pages back to
        the file system; returns how many were free before (0 where the server does it)."""
        return 0


class SqliteDialect(Dialect):
    """One file, WAL, ``BEGIN IMMEDIATE`` (the write lock at BEGIN: no upgrade deadlocks)."""

    name = "sqlite"
    now_sql = "((julianday('now') - 2440587.5) * 86400.0)"  # milliseconds; unixepoch() is 3.38+

    def open(self, url: str) -> peewee.Database:
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

    def claim(
        self, model: type[peewee.Model], candidates: peewee.ModelSelect, values: dict[str, Any]
    ) -> list[tuple[Any, str | None]]:
        """The pick, then ``UPDATE ... WHERE id IN (...) RETURNING *``: SQLite's RETURNING
        may not name the picking CTE of an ``UPDATE ... FROM``, so the previous owners are
        read first. Both statements run under the one write lock (``BEGIN IMMEDIATE``), so
        nothing claims in between."""
        previous = dict(candidates.select(model.id, model.claimed_by).tuples())
        if not previous:
            return []
        query = model.update(values).where(model.id.in_(list(previous)))
        rows = query.returning(*model._meta.sorted_fields).objects().execute()
        return [(row, previous[row.id]) for row in rows]

    def transaction_lost(self, connection: Any) -> bool:
        """SQLite rolls a whole transaction back on some errors (SQLITE_FULL): sqlite3 then
        reports no open transaction any more."""
        return not connection.in_transaction

    def prepare(self, db: peewee.Database) -> None:
        """SQLite gives freed pages back to the file system only with auto_vacuum, which a
        new database gets before its first table (see ``open``); an older one needs one
        VACUUM to switch (once; it rewrites the file). Then ``reclaim_space`` gives pages
        back."""
        if db.database == ":memory:":
            return
        if db.execute_sql("PRAGMA auto_vacuum").fetchone()[0] == 2:
            return
        log.warning("switching the SQLite database to incremental auto_vacuum (one VACUUM)")
        db.execute_sql("PRAGMA auto_vacuum = INCREMENTAL")
        try:
            db.execute_sql("VACUUM")
        except peewee.OperationalError as exc:  # a full disk, a lock: run as is, try next start
            log.warning("VACUUM failed; freed space is kept in the file for now", error=str(exc))

    def reclaim_space(self, db: peewee.Database, pages: int) -> int:
        """``executescript`` steps the pragma to its end (one ``execute`` frees one page)."""
        free = int(db.execute_sql("PRAGMA freelist_count").fetchone()[0])
        if free:
            db.connection().executescript(f"PRAGMA incremental_vacuum({int(pages)});")
        return free


class PostgresDialect(Dialect):
    """PostgreSQL through peewee's URL support (psycopg 3)."""

    name = "postgresql"
    lock_suffix = " FOR UPDATE"  # the row stays locked until the batch commits
    # clock_timestamp(), not now(): now() is the start of a transaction that a write batch
    # may have begun a while before this statement.
    now_sql = "CAST(extract(epoch FROM clock_timestamp()) AS double precision)"

    def open(self, url: str) -> peewee.Database:
        from playhouse.db_url import connect

        given = parse_qs(urlsplit(url).query)
        extra = {key: value for key, value in LIBPQ_DEFAULTS.items() if key not in given}
        return connect(url, thread_safe=False, **extra)

    def lock_schema(self, db: peewee.Database) -> bool:
        """A transaction-level advisory lock (released at COMMIT or ROLLBACK): instances
        that start together migrate one after the other, and each later one finds the schema
        already at its version. Without it two concurrent ``CREATE TABLE IF NOT EXISTS``
        collide on PostgreSQL's catalog (a unique violation of ``pg_type``)."""
        if db.execute_sql("SELECT pg_try_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,)).fetchone()[0]:
            return False
        log.info("another instance is migrating the schema; waiting for it")
        db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        return True

    def retryable(self, error: BaseException) -> bool:
        """A deadlock (SQLSTATE 40P01: two batches of different instances locking the same
        trainings in different orders; the server fails one statement after
        ``deadlock_timeout``) or a serialization failure (40001). peewee raises its own
        error while handling psycopg's, which carries the SQLSTATE."""
        seen: BaseException | None = error
        while seen is not None:
            if getattr(seen, "sqlstate", None) in ("40P01", "40001"):
                return True
            seen = seen.__cause__ or seen.__context__
        return False

    def claim(
        self, model: type[peewee.Model], candidates: peewee.ModelSelect, values: dict[str, Any]
    ) -> list[tuple[Any, str | None]]:
        """One statement, as River and Oban claim jobs: ``WITH locked AS MATERIALIZED
        (SELECT id, claimed_by AS was ... LIMIT n FOR UPDATE SKIP LOCKED) UPDATE ... FROM
        locked WHERE id = locked.id RETURNING *, locked.was``. SKIP LOCKED passes over rows
        another instance is claiming right now; the MATERIALIZED fence keeps the planner from
        updating more rows than the LIMIT (Oban's note)."""
        picked = candidates.select(model.id, model.claimed_by.alias("was"))
        locked = picked.for_update(skip_locked=True).cte("locked", materialized=True)
        query = (
            model.update(values)
            .from_(locked)
            .where(model.id == locked.c.id)
            .with_cte(locked)
            .returning(*model._meta.sorted_fields, locked.c.was)
        )
        return [(row, row.was) for row in query.objects().execute()]

    def transaction_lost(self, connection: Any) -> bool:
        """An aborted transaction (psycopg 3: IDLE or INERROR) silently rolls back at COMMIT;
        a lost connection (UNKNOWN: closed or broken) has none left."""
        return connection.info.transaction_status.name in ("IDLE", "INERROR", "UNKNOWN")

    def connection_lost(self, connection: Any) -> bool:
        """psycopg 3 marks a connection ``broken`` once a statement found the server gone
        (``pg_ctl restart -m fast`` terminates every backend) and ``closed`` when closed.
        A connection cut while idle shows only at its next statement, which fails: the call
        that made it fails (its callers retry), the next one reconnects."""
        return bool(connection.closed or connection.broken)


def dialect_for(url: str) -> Dialect:
    """The dialect of a ``[database] url``: ``sqlite:///PATH`` (``sqlite:///:memory:``) or
    ``postgresql://...`` (``postgres://`` too)."""
    if url.startswith("sqlite:///"):
        return SqliteDialect()
    if url.startswith(("postgresql://", "postgres://", "postgresext://", "postgresqlext://")):
        return PostgresDialect()
    raise ValueError(f"unsupported database url {url!r} (sqlite:/// or postgresql://)")
