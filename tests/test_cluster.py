"""Several instances on one database (issue 11): instance rows, heartbeats and leader leases.

"Two instances" here are two ``Store`` objects on the same database URL in one trio run,
each with its own ``Cluster``; every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from tests.conftest import daemon_settings, make_settings
from tests.test_layers import _calls, submit
from trainguard.cluster import (
    LEASE_TRUST,
    PRUNE_AFTER_SECONDS,
    SWEEPS,
    Cluster,
    instance_as_dict,
)
from trainguard.config import Settings
from trainguard.metrics import Metrics
from trainguard.plugins.manager import build_manager
from trainguard.store import Connection, Instance, Lease, Meta, Store, open_store
from trainguard.supervisor import Daemon
from trainguard.testing.simulator import Simulator

LEASE = 1.0  # seconds: short, so that expiry is seen within the test
HEARTBEAT = 0.2  # live within 3 x 0.2 s


def cluster_settings(url: str, instance_id: str) -> Settings:
    return make_settings(
        url,
        {
            "cluster": {
                "instance_id": instance_id,
                "lease_seconds": LEASE,
                "heartbeat_seconds": HEARTBEAT,
            }
        },
    )


@asynccontextmanager
async def two_instances(url: str) -> AsyncIterator[tuple[Cluster, Cluster]]:
    async with open_store(url) as a, open_store(url) as b:
        yield Cluster(a, cluster_settings(url, "a")), Cluster(b, cluster_settings(url, "b"))


async def lease_expiry(store: Store, role: str = SWEEPS) -> float:
    def get(conn: Connection) -> float:
        return float(Lease.get(Lease.name == role).expires_at)

    return await store.read(get)


async def wait_for(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(0.02)


async def cancellable(
    fn: Callable[..., Awaitable[None]], *, task_status: trio.TaskStatus[trio.CancelScope]
) -> None:
    """Start ``fn`` (a ``task_status`` function) and hand back a scope that cancels it alone."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            await inner.start(fn)
            task_status.started(scope)


async def test_exactly_one_of_two_racing_instances_takes_a_free_lease(database_url: str) -> None:
    async with two_instances(database_url) as (a, b):

        async def race(cluster: Cluster, won: dict[str, bool]) -> None:
            won[cluster.id] = await cluster.try_lead(SWEEPS)

        for _ in range(20):
            won: dict[str, bool] = {}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(race, a, won)
                nursery.start_soon(race, b, won)
            assert sorted(won.values()) == [False, True]
            assert a.is_leader(SWEEPS) != b.is_leader(SWEEPS)
            winner = a if won["a"] else b
            await winner.resign()
            assert not winner.is_leader(SWEEPS)


async def test_one_leader_at_a_time_under_concurrent_try_lead_loops(database_url: str) -> None:
    async with two_instances(database_url) as (a, b):
        both = 0
        tries = 0

        async def keep_trying(cluster: Cluster, other: Cluster) -> None:
            nonlocal both, tries
            for _ in range(40):
                await cluster.try_lead(SWEEPS)
                tries += 1
                both += cluster.is_leader(SWEEPS) and other.is_leader(SWEEPS)
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_trying, a, b)
            nursery.start_soon(keep_trying, b, a)
        assert tries == 80 and both == 0
        assert a.is_leader(SWEEPS) != b.is_leader(SWEEPS)  # the first one kept renewing it


async def test_the_leader_resigns_and_the_other_leads_at_once(database_url: str) -> None:
    async with two_instances(database_url) as (a, b):
        assert await a.try_lead(SWEEPS)
        assert not await b.try_lead(SWEEPS)
        assert await a.try_lead(SWEEPS)  # a renew
        await a.resign()
        assert not a.is_leader(SWEEPS)
        assert await b.try_lead(SWEEPS) and b.is_leader(SWEEPS)
        assert not await a.try_lead(SWEEPS)


async def test_a_layer_waiting_for_the_lead_runs_the_moment_its_instance_takes_it(
    database_url: str,
) -> None:
    """``Cluster.taken`` (``LayerContext.wait_to_lead``) returns when this instance becomes
    the leader, not at the waiter's next poll: a sweep starts as soon as the lease is taken."""
    async with two_instances(database_url) as (a, b), trio.open_nursery() as nursery:
        assert await a.try_lead(SWEEPS)
        woke: list[tuple[float, bool]] = []

        async def waiter() -> None:
            await b.taken(SWEEPS)
            woke.append((trio.current_time(), b.is_leader(SWEEPS)))

        nursery.start_soon(waiter)
        await nursery.start(b.loops)
        await trio.sleep(LEASE / 2)
        assert woke == []  # a holds it
        await a.resign()
        await wait_for(lambda: b.is_leader(SWEEPS), timeout=LEASE)
        led_at = trio.current_time()
        await wait_for(lambda: bool(woke), timeout=1.0)
        ((at, leader),) = woke
        assert leader and at - led_at < 0.1
        nursery.cancel_scope.cancel()


async def test_a_dead_leader_is_replaced_within_its_lease_and_never_before_it_expired(
    database_url: str,
) -> None:
    async with two_instances(database_url) as (a, b), trio.open_nursery() as nursery:
        a_alive = await nursery.start(cancellable, a.loops)
        assert a.is_leader(SWEEPS)
        await nursery.start(b.loops)
        assert not b.is_leader(SWEEPS)
        await trio.sleep(LEASE)  # a renews meanwhile, b keeps trying
        assert a.is_leader(SWEEPS) and not b.is_leader(SWEEPS)

        a_alive.cancel()  # a dies: no resign, its lease stays until it expires
        died = trio.current_time()
        await trio.sleep(0.1)  # a renew a had sent may still land
        expires = await lease_expiry(b.store)
        await wait_for(lambda: b.is_leader(SWEEPS), timeout=3 * LEASE)
        took_over = trio.current_time() - died
        assert time.time() >= expires - 0.01  # never before the dead one's lease expired
        assert took_over <= LEASE + 0.5  # b tries again just after the expiry it read
        assert not a.is_leader(SWEEPS)  # the dead one stopped trusting its lease before
        nursery.cancel_scope.cancel()


async def test_a_leader_stops_believing_as_soon_as_its_renew_fails(database_url: str) -> None:
    async with two_instances(database_url) as (a, _):
        assert await a.try_lead(SWEEPS)
        sent = trio.current_time()
        async with open_store(database_url) as gone:  # a store whose database is closed
            pass
        a.store = gone
        assert not await a.try_lead(SWEEPS)
        assert not a.is_leader(SWEEPS)
        assert trio.current_time() - sent < LEASE_TRUST * LEASE  # well before the lease's end


async def test_instances_lists_both_with_their_roles_and_drops_a_dead_one(
    database_url: str,
) -> None:
    async with two_instances(database_url) as (a, b), trio.open_nursery() as nursery:
        await a.register()
        await b.register()
        await nursery.start(a.loops)
        b_alive = await nursery.start(cancellable, b.loops)
        listed = {row.id: row for row in await b.instances()}
        assert sorted(listed) == ["a", "b"]
        assert listed["a"].roles == (SWEEPS,) and listed["b"].roles == ()
        assert listed["a"].heartbeat_at >= listed["a"].started_at
        shown = instance_as_dict(listed["a"])
        assert shown["roles"] == [SWEEPS] and shown["started_at"].endswith("Z")

        b_alive.cancel()  # b dies: its heartbeat stops
        await wait_listed(a, ["a"], timeout=3 * HEARTBEAT + 2.0)  # 3 missed beats
        nursery.cancel_scope.cancel()


async def test_the_leader_deletes_the_rows_of_instances_gone_for_an_hour(database_url: str) -> None:
    """An instance that died without a clean stop leaves its row; the sweeps leader deletes
    it once it has been silent for ``PRUNE_AFTER_SECONDS``, and a merely silent one not yet."""
    async with two_instances(database_url) as (a, b), trio.open_nursery() as nursery:
        await a.register()
        await b.register()
        for instance_id, age in (("dead", PRUNE_AFTER_SECONDS + 60.0), ("quiet", 60.0)):
            await a.store.cluster.beat({**b._row(), "id": instance_id}, start=True)
            await a.store.write(
                lambda conn, i=instance_id, age=age: (
                    Instance.update(heartbeat_at=Instance.heartbeat_at - age)
                    .where(Instance.id == i)
                    .execute()
                )
            )

        async def ids() -> list[str]:
            return await a.store.read(
                lambda conn: sorted(i for (i,) in Instance.select(Instance.id).tuples())
            )

        assert await ids() == ["a", "b", "dead", "quiet"]
        await nursery.start(b.loops)  # b leads (a has no loops) and prunes at its heartbeats
        await wait_for(lambda: b.is_leader(SWEEPS))

        async def pruned() -> bool:
            return await ids() == ["a", "b", "quiet"]

        await wait_for(pruned, timeout=10 * HEARTBEAT + 2.0)
        nursery.cancel_scope.cancel()


async def wait_listed(cluster: Cluster, ids: list[str], timeout: float = 10.0) -> None:
    """Until ``cluster.instances()`` lists exactly ``ids``."""
    with trio.fail_after(timeout):
        while [row.id for row in await cluster.instances()] != ids:
            await trio.sleep(0.02)


async def test_a_clean_stop_deletes_the_row_and_hands_the_role_over_at_once(
    database_url: str,
) -> None:
    async with two_instances(database_url) as (a, b), trio.open_nursery() as nursery:
        metrics = Metrics()
        a.metrics = metrics
        a_running = await nursery.start(cancellable, a.run)
        assert b'trainguard_leader{role="sweeps"} 1.0' in metrics.render()
        assert b"trainguard_instances 1.0" in metrics.render()
        a_running.cancel()
        await wait_listed(b, [])
        assert b'trainguard_leader{role="sweeps"} 0.0' in metrics.render()
        assert await b.try_lead(SWEEPS)  # at once, not after the lease
        nursery.cancel_scope.cancel()


# -- the layers: only the leader sweeps -------------------------------------------------------
async def test_completeness_runs_no_pass_on_a_non_leader_and_does_once_it_leads(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, database_url: str
) -> None:
    async with open_store(database_url) as other_store:
        other = Cluster(other_store, cluster_settings(database_url, "other"))
        other_running = await nursery.start(cancellable, other.run)  # it leads "sweeps"
        settings = daemon_settings(
            tmp_path / "db.sqlite",
            sim,
            only=("webhook", "completeness"),
            url=database_url,
            extra={"cluster": {"lease_seconds": LEASE, "heartbeat_seconds": HEARTBEAT}},
        )
        daemon = Daemon(settings, pm=build_manager(entry_points=False))
        await nursery.start(daemon.run)
        assert daemon.store is not None and daemon.cluster is not None
        assert daemon.fal is not None and daemon.reconciler is not None
        # payload_error spoils the webhook only: the webhook layer applies a fallback that
        # only completeness replaces (as in test_layers)
        (request_id,) = await submit(
            settings, daemon.fal, daemon.reconciler, 1, outcome="payload_error"
        )

        async def is_fallback() -> bool:
            view = await daemon.store.training(request_id)  # type: ignore[union-attr]
            return view is not None and view.is_fallback

        await wait_for(is_fallback)
        asked = _calls(sim, "result")
        await trio.sleep(5 * 0.5)  # five completeness intervals
        assert await is_fallback()  # nobody upgraded it: the leader is elsewhere
        assert not daemon.cluster.is_leader(SWEEPS)
        assert _calls(sim, "result") == asked  # completeness asked FAL nothing
        assert daemon.layers["completeness"].ctx.last_beat > trio.current_time() - 2.0  # fed

        other_running.cancel()  # a clean stop: the role is handed over
        await wait_for(lambda: daemon.cluster.is_leader(SWEEPS), timeout=LEASE)  # type: ignore[union-attr]
        await wait_for(lambda: _not(is_fallback))  # upgraded by this instance's pass


async def _not(predicate: Callable[[], Awaitable[bool]]) -> bool:
    return not await predicate()


async def test_schema_5_adds_the_instances_and_leases_tables(database_url: str) -> None:
    async with open_store(database_url) as s:

        def back_to_4(conn: Connection) -> None:
            conn.db.drop_tables([Instance, Lease])
            Meta.update(value="4").where(Meta.key == "schema_version").execute()

        await s.write(back_to_4)
    async with open_store(database_url) as s:
        tables = await s.read(lambda conn: conn.db.get_tables())
        version = await s.read(lambda conn: Meta.get(Meta.key == "schema_version").value)
        cluster = Cluster(s, cluster_settings(database_url, "a"))
        await cluster.register()
        assert await cluster.try_lead(SWEEPS)
        assert [row.roles for row in await cluster.instances()] == [(SWEEPS,)]
    assert {"instances", "leases"} <= set(tables)
    assert int(version) >= 5
