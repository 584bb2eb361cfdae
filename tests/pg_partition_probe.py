"""Run by ``tests/test_pg_partition.py`` inside a network namespace of its own (``unshare
-n``), whose loopback it may take down without touching the rest of the machine: a throwaway
PostgreSQL on that loopback, a store on it, then the network silently drops every packet
(``ip link set lo down``: no reset, no error, as a partition) in the middle of the store's
life. Prints one JSON line: how long the write during the partition took to fail, whether
the data from before is intact and whether writes work again once the network is back."""

from __future__ import annotations

import json
import subprocess
import time

import trio

from trainguard.errors import StoreError
from trainguard.store import Connection, Schedule, open_store
from trainguard.testing.postgres import PostgresServer

#: Writes must go through again this soon after the network is back.
BACK_WITHIN_SECONDS = 30.0


def _link(state: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", state], check=True)


def _write(conn: Connection, n: int) -> None:
    Schedule.insert(name=f"p{n}", next_at=float(n)).execute()


def _count(conn: Connection) -> int:
    return int(Schedule.select().count())


async def probe(server: PostgresServer) -> dict[str, object]:
    async with open_store(server.database()) as store:
        await store.write(_write, 0)
        _link("down")
        started = time.monotonic()
        try:
            await store.write(_write, 1)
            failed = False
        except StoreError:
            failed = True
        failed_after = time.monotonic() - started
        _link("up")
        back_after = None
        started = time.monotonic()
        while time.monotonic() - started < BACK_WITHIN_SECONDS:
            try:
                await store.write(_write, 2)
                back_after = time.monotonic() - started
                break
            except StoreError:
                await trio.sleep(0.2)
        count = await store.read(_count)
    return {
        "failed": failed,
        "failed_after": failed_after,
        "back_after": back_after,
        "rows": count,
    }


def main() -> None:
    _link("up")
    server = PostgresServer()
    server.start()
    try:
        print(json.dumps(trio.run(probe, server)), flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
