"""Durable inserts per second through the store, against raw sqlite3 on the same disk.

Prints one line per case and the ratios; writes the figures as JSON when given --out.
Every case commits with synchronous=FULL in WAL mode (a commit is on disk when it returns):

* raw sqlite3, one commit per row (the fsync-bound floor of a naive path);
* Store.write from one caller at a time (one commit per write: no batching possible);
* Store.write from many concurrent callers (group commit: one commit per batch);
* the webhook path: Reconciler.record_receipt from many concurrent callers (1 KiB bodies).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from trainguard import config
from trainguard.reconcile import Reconciler
from trainguard.store import Training, open_store


def raw_sqlite(path: Path, n: int) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=wal")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, request_id TEXT UNIQUE, body BLOB)")
    start = time.perf_counter()
    for i in range(n):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t (request_id, body) VALUES (?, ?)", (f"r{i}", b"x" * 1024))
        db.execute("COMMIT")
    elapsed = time.perf_counter() - start
    db.close()
    return n / elapsed


def _insert(conn: Any, request_id: str) -> None:
    Training.create(
        name="bench",
        training_type="portrait",
        endpoint="fal-ai/flux-lora-portrait-trainer",
        request_id=request_id,
        submitted_at=0.0,
        updated_at=0.0,
    )


async def store_sequential(url: str, n: int) -> float:
    async with open_store(url) as store:
        start = trio.current_time()
        for i in range(n):
            await store.write(_insert, f"s{i}")
        return n / (trio.current_time() - start)


async def store_concurrent(url: str, n: int, callers: int) -> tuple[float, float]:
    batches: list[int] = []
    async with open_store(url, on_commit=batches.append) as store:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for c in range(callers):
                nursery.start_soon(_caller, store, c, n // callers)
        elapsed = trio.current_time() - start
    return (n // callers * callers) / elapsed, sum(batches) / len(batches)


async def _caller(store: Any, c: int, count: int) -> None:
    for i in range(count):
        await store.write(_insert, f"c{c}-{i}")


async def receipts_concurrent(url: str, n: int, callers: int) -> float:
    settings = config.parse({"database": {"url": url}}, env={})
    body = json.dumps({"request_id": "r", "status": "OK", "payload": {"x": "y" * 1000}}).encode()
    async with open_store(url) as store:
        reconciler = Reconciler(store, settings)

        async def caller(c: int) -> None:
            for i in range(n // callers):
                await reconciler.record_receipt(
                    body=body,
                    headers={"x-fal-webhook-signature": f"{c}-{i}"},
                    verification="verified",
                    request_id=f"r{c}-{i}",
                    dedupe_key=f"{c}-{i}",
                )

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for c in range(callers):
                nursery.start_soon(caller, c)
        return (n // callers * callers) / (trio.current_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--callers", type=int, default=200)
    parser.add_argument("--out", help="write the figures as JSON to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        figures = {
            "raw_sqlite3_commit_per_row": raw_sqlite(d / "raw.db", args.rows),
            "store_write_sequential": trio.run(
                store_sequential, f"sqlite:///{d / 'seq.db'}", args.rows
            ),
        }
        rate, mean_batch = trio.run(
            store_concurrent, f"sqlite:///{d / 'con.db'}", args.rows * 3, args.callers
        )
        figures["store_write_group_commit"] = rate
        figures["group_commit_mean_batch"] = mean_batch
        figures["webhook_receipts_group_commit"] = trio.run(
            receipts_concurrent, f"sqlite:///{d / 'rec.db'}", args.rows * 3, args.callers
        )
    base = figures["raw_sqlite3_commit_per_row"]
    for name, value in figures.items():
        ratio = (
            "" if name.endswith("batch") else f"  ({value / base:.2f}x raw sqlite3 commit-per-row)"
        )
        unit = "rows/commit" if name.endswith("batch") else "durable inserts/s"
        print(f"{name:<32} {value:>10.1f} {unit}{ratio}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
