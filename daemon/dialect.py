"""Everything that differs between the SQL databases trainguard runs on, in one place.

A ``Dialect`` opens the peewee database for a ``[database] url`` and answers the few
questions where SQLite and PostgreSQL differ: how a lost transaction shows, whether a row
lock needs ``FOR UPDATE``, how freed space goes back to the file system. Every query of the
store is otherwise portable (an upsert is ``INSERT ... ON CONFLICT DO UPDATE`` on both).

SQLite is what trainguard is tested on. The PostgreSQL side is written to be plausible and
is NOT tested yet (issue 11, several instances on PostgreSQL, builds on this seam).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peewee
import structlog

log = structlog.get_logger("trainguard.store")

#: How long a statement waits for another process's write lock before "database is locked".
BUSY_TIMEOUT_MS = 10_000


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

    def transaction_lost(self, connection: Any) -> bool:
        """Whether the transaction of a write batch is gone, so that a COMMIT would store
        nothing (``connection`` is the driver's own connection)."""
        raise NotImplementedError

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
    """PostgreSQL through peewee's URL support (psycopg). Untested (issue 11)."""

    name = "postgresql"
    lock_suffix = " FOR UPDATE"  # the row stays locked until the batch commits
    # clock_timestamp(), not now(): now() is the start of a transaction that a write batch
    # may have begun a while before this statement.
    now_sql = "CAST(extract(epoch FROM clock_timestamp()) AS double precision)"

    def open(self, url: str) -> peewee.Database:
        from playhouse.db_url import connect

        return connect(url, thread_safe=False)

    def transaction_lost(self, connection: Any) -> bool:
        """An aborted transaction (psycopg 3: IDLE or INERROR) silently rolls back at COMMIT."""
        return connection.info.transaction_status.name in ("IDLE", "INERROR")


def dialect_for(url: str) -> Dialect:
    """The dialect of a ``[database] url``: ``sqlite:///PATH`` (``sqlite:///:memory:``) or
    ``postgresql://...`` (``postgres://`` too)."""
    if url.startswith("sqlite:///"):
        return SqliteDialect()
    if url.startswith(("postgresql://", "postgres://", "postgresext://", "postgresqlext://")):
        return PostgresDialect()
    raise ValueError(f"unsupported database url {url!r} (sqlite:/// or postgresql://)")
