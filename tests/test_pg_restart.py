"""PostgreSQL that restarts (issue 11): the store reconnects with backoff, never half-writes,
and its callers see a StoreError they handle (a webhook gets 503, never 2xx); ``/readyz``
answers 503 while the database is unreachable, and the systemd watchdog is not fed once it
has been lost for longer than two leases.

These tests restart or stop their server, so they run on one of their own (never the
session's shared one), each test on a fresh database of it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import daemon_settings, throwaway_postgres
from tests.test_layer_webhook import Harness, ok_body, wait_for
from tests.test_supervisor import FakeSystemd
from trainguard import supervisor
from trainguard.dialect import PostgresDialect
from trainguard.errors import StoreError
from trainguard.plugins.manager import build_manager
from trainguard.store import Connection, Schedule, Store, open_store
from trainguard.supervisor import Daemon
from trainguard.testing.postgres import PostgresServer
from trainguard.testing.simulator import Simulator

pytestmark = pytest.mark.postgresql

WRITERS = 4
#: Writes must go through again this soon after the server is back.
BACK_WITHIN_SECONDS = 5.0


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """A server of this module's own, restarted and stopped by its tests."""
    yield from throwaway_postgres()


def write_pair(conn: Connection, n: int) -> None:
    """One write of two rows: both are stored or neither."""
    Schedule.insert(name=f"a{n}", next_at=float(n)).execute()
    Schedule.insert(name=f"b{n}", next_at=float(n)).execute()


def stored_names(conn: Connection) -> set[str]:
    return {s.name for s in Schedule.select(Schedule.name)}


def count_schedules(conn: Connection) -> int:
    return int(Schedule.select().count())


async def test_writes_through_a_restart_are_stored_whole_or_answered_failed(
    pg: PostgresServer,
) -> None:
    url = pg.database()
    async with open_store(url) as store:
        succeeded: dict[int, float] = {}  # write -> when it was answered
        failed: list[int] = []
        numbers = iter(range(1_000_000))
        stop = trio.Event()

        async def writer() -> None:
            while not stop.is_set():
                n = next(numbers)
                try:
                    await store.write(write_pair, n)
                except StoreError:  # anything else fails the test
                    failed.append(n)
                else:
                    succeeded[n] = time.monotonic()
                await trio.sleep(0.002)

        async with trio.open_nursery() as nursery:
            for _ in range(WRITERS):
                nursery.start_soon(writer)
            await trio.sleep(0.3)
            await trio.to_thread.run_sync(pg.restart)
            back = time.monotonic()
            with trio.fail_after(BACK_WITHIN_SECONDS):
                while not any(at > back for at in succeeded.values()):
                    await trio.sleep(0.01)
            await trio.sleep(0.3)
            stop.set()

        assert failed, "the restart cut the connection: some writes must have failed"
        names = await store.read(stored_names)
        for n in [*succeeded, *failed]:
            assert (f"a{n}" in names) == (f"b{n}" in names), f"write {n} is half-stored"
        for n in succeeded:
            assert f"a{n}" in names, f"write {n} was answered stored but is not"
        assert not store.stalled() and store.lost_for() == 0.0


async def test_reads_and_writes_fail_as_store_errors_while_down_and_work_after(
    pg: PostgresServer,
) -> None:
    url = pg.database()
    async with open_store(url) as store:
        await store.write(write_pair, 0)
        await trio.to_thread.run_sync(pg.down)
        try:
            for _ in range(3):  # the first finds the connection cut, the next cannot connect
                with pytest.raises(StoreError):
                    await store.read(count_schedules)
                with pytest.raises(StoreError):
                    await store.write(write_pair, 1)
                assert store.stalled()
                await trio.sleep(0.1)
            assert store.lost_for() > 0.2
        finally:
            await trio.to_thread.run_sync(pg.up)

        async def readable() -> bool:
            try:
                return await store.read(count_schedules) == 2
            except StoreError:
                return False

        await wait_for(readable, timeout=BACK_WITHIN_SECONDS)
        assert store.lost_for() == 0.0
        await store.write(write_pair, 2)
        assert await store.read(count_schedules) == 4  # write 1 was never stored
        assert not store.stalled()


async def test_an_idle_connection_cut_by_a_restart_costs_no_call(pg: PostgresServer) -> None:
    """A restart cuts every connection; an idle one shows it only at its next statement.
    That statement is the BEGIN of a write batch (nothing of it ran) or a read: both are run
    again on a new connection, so the first write after a restart is stored, not refused
    (a submit through a long-running daemon would otherwise lose a training FAL accepted)."""
    url = pg.database()
    async with open_store(url) as store:
        await store.write(write_pair, 0)
        await trio.to_thread.run_sync(pg.restart)
        await store.write(write_pair, 1)  # no StoreError
        assert await store.read(count_schedules) == 4
        await trio.to_thread.run_sync(pg.restart)
        assert await store.read(count_schedules) == 4  # a read first, then a write
        await store.write(write_pair, 2)
        assert await store.read(stored_names) == {f"{x}{n}" for x in "ab" for n in range(3)}
        assert store.lost_for() == 0.0 and not store.stalled()


async def launch_on(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, url: str, client: httpx.AsyncClient
) -> Harness:
    """A daemon with only the webhook layer, on ``url``, leases of 0.25 s."""
    settings = daemon_settings(
        tmp_path / "db.sqlite",
        sim,
        only=("webhook",),
        url=url,
        extra={"cluster": {"lease_seconds": 0.25}},
    )
    daemon = Daemon(settings, pm=build_manager(entry_points=False))
    await nursery.start(daemon.run)
    return Harness(daemon, sim, client, settings.webhook["public_url"])


async def test_a_webhook_while_the_database_is_down_gets_503_and_200_after(
    pg: PostgresServer, nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=10.0) as client:
        h = await launch_on(nursery, tmp_path, sim, pg.database(), client)
        assert h.daemon.ops_address is not None
        ready_url = "http://{}:{}/readyz".format(*h.daemon.ops_address)
        rid = await h.track()
        assert (await client.get(ready_url)).status_code == 200

        await trio.to_thread.run_sync(pg.down)
        try:
            for _ in range(3):
                reply = await h.deliver(ok_body(rid), rid)
                assert reply.status_code == 503, reply.text
                assert (await client.get(ready_url)).status_code == 503
                await trio.sleep(0.1)
        finally:
            await trio.to_thread.run_sync(pg.up)

        async def delivered() -> bool:
            reply = await h.deliver(ok_body(rid), rid)
            assert reply.status_code in (200, 503), reply.text
            return reply.status_code == 200

        await wait_for(delivered, timeout=BACK_WITHIN_SECONDS)
        assert (await h.training(rid)).status == "COMPLETED"
        assert [r["outcome"] for r in await h.receipts(rid)] == ["result"]

        async def ready() -> bool:
            return (await client.get(ready_url)).status_code == 200

        await wait_for(ready, timeout=BACK_WITHIN_SECONDS)


async def test_the_watchdog_is_not_fed_once_the_database_is_lost_for_two_leases(
    pg: PostgresServer,
    nursery: trio.Nursery,
    tmp_path: Path,
    sim: Simulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor, "GAUGE_INTERVAL_SECONDS", 0.1)  # finds the loss at once
    fake = FakeSystemd(tmp_path / "notify")
    await nursery.start(fake.serve)
    monkeypatch.setenv("NOTIFY_SOCKET", str(fake.path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    async with httpx.AsyncClient(trust_env=False, timeout=10.0) as client:
        h = await launch_on(nursery, tmp_path, sim, pg.database(), client)
        await fake.wait_for("READY=1")
        await trio.sleep(0.3)
        assert fake.count("WATCHDOG=1") >= 2

        await trio.to_thread.run_sync(pg.down)
        try:
            with trio.fail_after(5.0):
                while not any(n.startswith("STATUS=database unreachable") for n in fake.lines):
                    await trio.sleep(0.02)
            assert h.store.lost_for() > 0.5  # two leases of 0.25 s
            pings = fake.count("WATCHDOG=1")
            await trio.sleep(0.5)
            assert fake.count("WATCHDOG=1") == pings
        finally:
            await trio.to_thread.run_sync(pg.up)

        async def fed_again() -> bool:
            return fake.count("WATCHDOG=1") > pings

        await wait_for(fed_again, timeout=BACK_WITHIN_SECONDS)
        assert h.store.lost_for() == 0.0


def test_a_reconnect_waits_for_the_server_at_most_connect_timeout() -> None:
    """libpq waits forever for an unreachable host by default: the store's connections get
    ``CONNECT_TIMEOUT_SECONDS`` unless the URL's query names its own."""
    url = "postgresql://tg@127.0.0.1:5/db"
    assert PostgresDialect().open(url).connect_params["connect_timeout"] == 5
    mine = PostgresDialect().open(f"{url}?connect_timeout=1&sslmode=disable")
    assert mine.connect_params["connect_timeout"] == 1


async def test_a_write_failed_by_a_deadlock_runs_again_alone_and_is_stored(
    pg: PostgresServer,
) -> None:
    """Two instances' writes lock the same two rows in opposite orders: PostgreSQL breaks
    the deadlock by failing one of them (40P01). That one runs again alone once the other
    has committed, so both are stored; neither caller sees an error."""
    url = pg.database()
    barrier = threading.Barrier(2, timeout=10.0)
    runs: list[str] = []

    def lock_both(conn: Connection, first: str, second: str) -> str:
        runs.append(first)
        Schedule.select().where(Schedule.name == first).for_update().get()
        if runs.count(first) == 1:
            barrier.wait()  # both hold their first row: each now waits for the other's
        Schedule.select().where(Schedule.name == second).for_update().get()
        Schedule.update(next_at=Schedule.next_at + 1).where(
            Schedule.name.in_([first, second])
        ).execute()
        return first

    async with open_store(url) as a, open_store(url) as b:
        await a.write(write_pair, 0)  # rows a0 and b0
        done: list[str] = []

        async def one(store: Store, first: str, second: str) -> None:
            done.append(await store.write(lock_both, first, second))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, a, "a0", "b0")
            nursery.start_soon(one, b, "b0", "a0")
        assert sorted(done) == ["a0", "b0"]
        assert sorted(runs) == ["a0", "a0", "b0"] or sorted(runs) == ["a0", "b0", "b0"]
        assert await a.read(lambda conn: sorted(s.next_at for s in Schedule.select())) == [2.0, 2.0]
