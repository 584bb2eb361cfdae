"""Issue 11, "prove it": three instances on one PostgreSQL under chaos.

500 trainings under test_chaos's fault mix (``fault_mix``, ``fault_plan``), fal's webhooks
spread over the live instances by a round-robin balancer (testing/balancer.py), a random
instance SIGKILLed every few seconds and restarted (at least ``KILLS`` times), and one
``pg_ctl restart -m fast`` in the middle; the delivery plugin on, POSTing every finished
training to a bot in this test that refuses its first requests (so events are sent again).

Judged by ``compare_with_truth`` (final states, the event history, every webhook delivery
attempt against the stored receipts) and by the bot's record, each of the five properties
asserted on its own: every training ends with its true outcome; no fallback where a real
result existed; no transition applied twice; every webhook answered 2xx is stored; every
finished training has exactly one delivery event id (sent once or more: at least once).
Run with ``pytest -s`` to see the summary table.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from tests.conftest import throwaway_postgres
from tests.test_chaos import (
    API_TIMEOUT_SECONDS,
    DEADLINE_SECONDS,
    EXACT_OUTCOMES,
    FAL_TIMEOUT_SECONDS,
    FAULT_MIX_LAYERS,
    TRAININGS,
    Client,
    fault_mix,
    fault_plan,
    submit_planned,
)
from tests.test_delivery import SECRET, Receiver, serve
from trainguard.errors import StoreError
from trainguard.fal import FalClient, RateLimiter
from trainguard.plugins.delivery import CONSUMER, SECRET_ENV
from trainguard.plugins.manager import build_manager, collect_layers, outbox_collector
from trainguard.reconcile import Reconciler
from trainguard.store import TERMINAL, Connection, Outbox, Store, open_store
from trainguard.testing.cluster import InstanceCluster, open_cluster
from trainguard.testing.demo import DEMO_KEY, REAL_OUTCOMES, Report, compare_with_truth
from trainguard.testing.postgres import PostgresServer
from trainguard.testing.simulator import Simulator

pytestmark = pytest.mark.postgresql

INSTANCES = 3
KILLS = 12
#: The bot answers its first requests 503: those events are sent again, with the same id.
BOT_REFUSALS = 25
#: Submits are spread over about the time the kills take, so that every kill hits work.
SUBMIT_EVERY_SECONDS = 0.08


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """A server of this module's own: the test restarts it."""
    yield from throwaway_postgres()


def nothing(conn: Connection) -> None:
    """A read or write that only shows whether the store's connection works."""


async def reconnected(store: Store) -> None:
    """Until the test's own store reads and writes again after a server restart (the store
    reconnects by itself; this bounds how long the test waits for it)."""
    with trio.fail_after(15.0):
        while True:
            try:
                await store.read(nothing)
                await store.write(nothing)
                return
            except StoreError:
                await trio.sleep(0.1)


def delivery_rows(conn: Connection) -> dict[str, list[str]]:
    """Request id -> the message ids of its delivery outbox entries."""
    out: dict[str, list[str]] = {}
    for row in Outbox.select().where(Outbox.consumer == CONSUMER).order_by(Outbox.id):
        out.setdefault(row.request_id, []).append(row.message_id)
    return out


def summary(
    report: Report, cluster: InstanceCluster, sim: Simulator, bot: Receiver, pg_restarts: int
) -> str:
    queue_calls = sum(n for (route, _), n in sim.stats.items() if route != "jwks")
    forwarded = ", ".join(
        f"#{i.index}: {cluster.balancer.forwarded[('127.0.0.1', i.webhook_port)]}"
        for i in cluster.instances
    )
    sent_ids = {m for m, *_ in bot.got}
    lines = [
        f"{'instances':<34} {INSTANCES:>6}",
        f"{'SIGKILLs (each restarted)':<34} {cluster.kills:>6}",
        f"{'instance starts':<34} {cluster.starts:>6}",
        f"{'PostgreSQL restarts (-m fast)':<34} {pg_restarts:>6}",
        f"{'FAL queue API calls':<34} {queue_calls:>6}",
        f"{'claims rescued (from the logs)':<34} {cluster.rescued():>6}",
        f"{'webhook connections balanced':<34} {sum(cluster.balancer.forwarded.values()):>6}"
        f"  ({forwarded}; refused by all: {cluster.balancer.refused})",
        f"{'delivery POSTs / distinct ids':<34} {len(bot.got):>6} / {len(sent_ids)}",
    ]
    return "\n".join(lines) + "\n\n" + report.summary()


@pytest.mark.slow  # ~2-3 min on 2 cores
async def test_500_trainings_on_three_instances_with_sigkills_and_a_postgres_restart(
    nursery: trio.Nursery, tmp_path: Path, pg: PostgresServer
) -> None:
    rng = random.Random(11)
    plan = fault_plan(rng)
    # One connection per webhook: the balancer then spreads deliveries, not connections.
    sim = Simulator(replace(fault_mix(11), webhook_connection_per_delivery=True))
    await nursery.start(sim.serve)
    bot = Receiver(*[503] * BOT_REFUSALS)
    bot_url = await serve(nursery, bot) + "/bot"
    url = pg.database()
    tables = {
        "fal": {"timeout_seconds": FAL_TIMEOUT_SECONDS},
        "delivery": {"enabled": True, "url": bot_url, "timeout_seconds": 2.0},
    }
    pg_restarts = 0
    async with open_cluster(
        tmp_path,
        sim,
        url,
        INSTANCES,
        layers=FAULT_MIX_LAYERS,
        tables=tables,
        env={SECRET_ENV: SECRET},
    ) as cluster:
        settings = cluster.settings
        # Submits and cancels as `trainguard submit` / `cancel` make them: a cancel that
        # ends a training here writes its delivery event too (the plugins' outbox hook).
        pm = build_manager(entry_points=False)
        collect_layers(pm, settings)
        fal = FalClient(
            queue_url=settings.fal["queue_url"],
            key=DEMO_KEY,
            rate_limiter=RateLimiter(settings.fal["max_requests_per_second"]),
            timeout=API_TIMEOUT_SECONDS + 2.0,  # waits out a hanging call (test_chaos)
        )
        async with fal, open_store(url) as store:
            reconciler = Reconciler(store, settings, outbox=outbox_collector(pm))
            client = Client(sim, settings, store, reconciler, fal)
            await cluster.start_all()

            submitters = trio.CapacityLimiter(4)
            began = trio.current_time()

            async def restart_postgres() -> None:
                """``pg_ctl restart -m fast`` with no submit in flight: a submit whose
                training FAL created but the database did not take would be this test
                client's loss (it does not resubmit), not the instances'."""
                nonlocal pg_restarts
                holds = [object() for _ in range(int(submitters.total_tokens))]
                for hold in holds:
                    await submitters.acquire_on_behalf_of(hold)
                try:
                    await trio.to_thread.run_sync(pg.restart)
                    await reconnected(store)
                finally:
                    for hold in holds:
                        submitters.release_on_behalf_of(hold)
                pg_restarts += 1

            async def chaos() -> None:
                """A random running instance SIGKILLed every few seconds and restarted; the
                server restarted once, between two kills, halfway through the submits."""
                for _ in range(KILLS):
                    await trio.sleep(rng.uniform(1.0, 2.5))
                    victim = rng.choice([i.index for i in cluster.instances if i.up])
                    await cluster.kill(victim)
                    await trio.sleep(rng.uniform(0.1, 1.0))
                    await cluster.start(victim)
                    halfway = TRAININGS * SUBMIT_EVERY_SECONDS / 2
                    if not pg_restarts and trio.current_time() - began >= halfway:
                        await restart_postgres()

            async with trio.open_nursery() as work:
                work.start_soon(chaos)
                for i in range(TRAININGS):
                    work.start_soon(submit_planned, client, plan, i, submitters)
                    await trio.sleep(SUBMIT_EVERY_SECONDS)
            await client.wait_until_finished(TRAININGS, timeout=DEADLINE_SECONDS + 30.0)

            def bot_has_all() -> bool:
                return len({rid for *_, rid in bot.acked()}) >= TRAININGS

            with trio.move_on_after(30.0):
                while not bot_has_all():
                    await trio.sleep(0.5)
            statuses = await cluster.stop_all()
            report = await compare_with_truth(store, list(sim.truth.values()), sim.deliveries)
            report.restarts = cluster.kills
            outbox = await store.read(delivery_rows)
    print(f"\n== {INSTANCES} instances, fault mix, SIGKILLs, a PostgreSQL restart ==")
    print(summary(report, cluster, sim, bot, pg_restarts))
    print(report.verdict())

    # The chaos happened: kills, each restarted, a restart of the server in the middle,
    # webhooks through every instance, every instance stopped cleanly at the end.
    assert cluster.kills >= KILLS
    assert cluster.starts == INSTANCES + cluster.kills
    assert pg_restarts == 1
    assert all(cluster.balancer.forwarded[("127.0.0.1", i.webhook_port)] for i in cluster.instances)
    assert statuses == [0] * INSTANCES
    assert len(report.rows) == TRAININGS

    # 1. Every training ends with its true outcome (final state, result, fallback kind).
    wrong = [f"{t.request_id} ({t.outcome}): {p}" for _, t, p in report.rows if p]
    assert wrong == [], "\n".join(wrong[:30])
    # 2. No fallback where FAL had a real result: none in any training's history either.
    on_real = [
        t.request_id
        for v, t, _ in report.rows
        if t.outcome in REAL_OUTCOMES and (v is None or v.is_fallback)
    ]
    assert on_real == [] and report.fallbacks_on_real == []
    assert sum(report.fallbacks_by_layer.values()) == sum(EXACT_OUTCOMES.values())
    # 3. No transition applied twice (the same result, fallback, status or cancel event).
    assert report.double_transitions == []
    # 4. Every webhook answered 2xx is stored, verified and applied; none forged is.
    assert report.webhooks is not None
    assert report.webhooks.problems == [], "\n".join(report.webhooks.problems[:30])
    assert any(d.acked for d in sim.deliveries)
    # 5. Exactly one delivery event per finished training, and the bot has that one id
    #    (sent once or more: resends of one id are at-least-once, never a second event).
    finished = {t.request_id for v, t, _ in report.rows if v is not None and v.status in TERMINAL}
    assert finished == set(sim.truth)
    multiple = {rid: ids for rid, ids in outbox.items() if len(ids) != 1}
    assert multiple == {} and set(outbox) == finished
    acked_ids: dict[str, set[str]] = {}
    for message_id, _, rid in bot.acked():
        acked_ids.setdefault(rid, set()).add(message_id)
    missing = sorted(finished - set(acked_ids))
    assert missing == [], f"{len(missing)} finished trainings never reached the bot"
    assert {rid: ids for rid, ids in acked_ids.items() if ids != set(outbox[rid])} == {}
    assert bot.unverified == 0
    sends = Counter(m for m, *_ in bot.got)
    assert any(n > 1 for n in sends.values())  # the refused ones were sent again, same id

    assert report.problems == [], "\n".join(report.problems[:30])
