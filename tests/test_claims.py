"""Issue 11, "each check once at a time": claims of trainings, outbox heads and artifacts.

"Two instances" are two ``Store`` objects on the same database URL in one trio run; every
test runs on SQLite and on PostgreSQL (where the claims take the ``SKIP LOCKED`` path).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
import trio
import trio.lowlevel

from trainguard import identity
from trainguard.clock import Clock
from trainguard.config import Settings
from trainguard.layer import LayerContext, run_due
from trainguard.metrics import Metrics
from trainguard.reconcile import Kind, Observation, Reconciler
from trainguard.store import (
    Connection,
    Instance,
    Meta,
    Outbox,
    Store,
    Training,
    TrainingView,
    open_store,
)

LORA = {
    "diffusers_lora_file": {"url": "https://v3.fal.media/files/x/pytorch_lora_weights.safetensors"},
    "config_file": {"url": "https://v3.fal.media/files/x/config.json"},
}


@asynccontextmanager
async def two_instances(url: str) -> AsyncIterator[tuple[Store, Store]]:
    async with open_store(url) as a, open_store(url) as b:
        yield a, b


def _add_trainings(conn: Connection, count: int, due_at: float) -> list[int]:
    return [
        Training.create(
            name="n",
            training_type="portrait",
            endpoint="fal-ai/x",
            request_id=f"req-{i}",
            submitted_at=1.0,
            updated_at=1.0,
            next_check_at=due_at,
        ).id
        for i in range(count)
    ]


def context(store: Store, settings: Settings, owner: str, metrics: Any = None) -> LayerContext:
    return LayerContext(
        name="poller",
        settings=settings,
        store=store,
        reconciler=Reconciler(store, settings),
        fal=None,  # type: ignore[arg-type]
        metrics=metrics,
        clock=Clock(),
        instance_id=owner,
    )


async def test_two_instances_claiming_at_once_get_disjoint_sets(database_url: str) -> None:
    async with two_instances(database_url) as (a, b):
        ids = await a.write(_add_trainings, 40, 1.0)
        for round_ in range(12):
            taken: list[tuple[str, list[int]]] = []

            async def claim(store: Store, owner: str, now: float, taken: list[Any]) -> None:
                await trio.sleep(random.uniform(0, 0.005))
                got = await store.claim_due("next_check", now, 8, owner, 60.0)
                taken.append((owner, [t.id for t in got.items]))
                assert got.rescued == {}

            async with trio.open_nursery() as nursery:
                for n in range(3):  # 2 instances x 3 tasks x 8 >= 40: all of them are taken
                    nursery.start_soon(claim, a, f"A{n}", 10.0 + round_, taken)
                    nursery.start_soon(claim, b, f"B{n}", 10.0 + round_, taken)
            every = [i for _, got in taken for i in got]
            assert len(every) == len(set(every)), f"round {round_}: a training claimed twice"
            assert sorted(every) == sorted(ids)
            for owner, got in taken:
                store = a if owner.startswith("A") else b
                assert await store.release("trainings", got, owner) == len(got)


async def test_an_expired_claim_is_taken_over_counted_and_logged(
    database_url: str, settings: Settings
) -> None:
    async with two_instances(database_url) as (a, b):
        (tid,) = await a.write(_add_trainings, 1, 1.0)
        first = await a.claim_due("next_check", 100.0, 10, "A", 10.0)
        assert [t.id for t in first.items] == [tid] and first.rescued == {}
        # B sees it held until A's claim expires at 110, and counts it from then.
        assert (await b.claim_due("next_check", 109.0, 10, "B", 10.0)).items == []
        assert await b.next_due("next_check") == 110.0
        taken = await b.claim_due("next_check", 111.0, 10, "B", 10.0)
        assert [t.id for t in taken.items] == [tid] and taken.rescued == {tid: "A"}
        metrics = Metrics()
        with structlog.testing.capture_logs() as logs:
            context(b, settings, "B", metrics).claimed("trainings", taken)
        sample = metrics.registry.get_sample_value
        assert sample("trainguard_rescued_total", {"kind": "trainings"}) == 1
        assert sample("trainguard_rescued_total", {"kind": "outbox"}) == 0
        (line,) = [e for e in logs if e["event"].startswith("claims taken over")]
        assert (line["kind"], line["rows"], line["owners"]) == ("trainings", 1, ["A"])
        # A's late release gives up nothing: the training is B's now.
        assert await a.release("trainings", [tid], "A") == 0
        assert (await a.claim_due("next_check", 112.0, 10, "A", 10.0)).items == []


async def test_a_released_claim_is_claimable_at_once(database_url: str) -> None:
    async with two_instances(database_url) as (a, b):
        (tid,) = await a.write(_add_trainings, 1, 1.0)
        await a.claim_due("next_check", 100.0, 10, "A", 60.0)
        assert await b.release("trainings", [tid], "B") == 0  # not B's to give up
        assert (await b.claim_due("next_check", 100.0, 10, "B", 60.0)).items == []
        assert await a.release("trainings", [tid], "A") == 1
        assert await b.next_due("next_check") == 1.0
        again = await b.claim_due("next_check", 100.0, 10, "B", 60.0)
        assert [t.id for t in again.items] == [tid] and again.rescued == {}


def _dead_pid() -> int:
    """The id of a process of this host that has ended."""
    code = "import os; print(os.getpid())"
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return int(done.stdout)


async def test_claims_of_a_process_gone_from_this_host_are_taken_at_once(
    database_url: str,
) -> None:
    owner = f"{identity.made_up().rsplit('-', 2)[0]}-{_dead_pid()}-abcdef"
    assert identity.gone(owner)
    async with two_instances(database_url) as (a, b):
        (tid,) = await a.write(_add_trainings, 1, 1.0)
        await a.claim_due("next_check", 100.0, 10, owner, 600.0)
        assert await b.claim_owners("trainings") == [owner]
        assert (await b.claim_due("next_check", 101.0, 10, "B", 60.0)).items == []
        taken = await b.claim_due("next_check", 101.0, 10, "B", 60.0, [owner])
        assert taken.rescued == {tid: owner}


def test_only_a_dead_process_of_this_host_is_gone() -> None:
    me = identity.made_up()
    host, pid, _ = me.rsplit("-", 2)
    assert int(pid) == os.getpid() and not identity.gone(me)
    assert not identity.gone(f"{host}-1-abcdef")  # init is alive
    assert not identity.gone(f"another-host-{os.getpid() + 1_000_000}-abcdef")
    assert not identity.gone("worker-a")  # a configured name: its claims wait for expiry


async def test_two_pollers_never_check_one_training_at_once(
    database_url: str, settings: Settings
) -> None:
    """Two instances' ``run_due`` loops over the same due trainings: each is handled once
    (the check moves its next time on), never by both at the same moment."""
    async with two_instances(database_url) as (a, b):
        now = time.time()
        await a.write(_add_trainings, 30, now - 1)
        in_flight: set[str] = set()
        handled: list[tuple[str, str]] = []
        overlaps: list[str] = []  # (run_due counts a handler's error and goes on)

        def handler(ctx: LayerContext) -> Any:
            async def handle(training: TrainingView) -> None:
                if training.request_id in in_flight:
                    overlaps.append(training.request_id)
                in_flight.add(training.request_id)
                await trio.sleep(random.uniform(0.01, 0.05))
                await ctx.reconciler.observe(
                    Observation(training.request_id, "poller", Kind.RUNNING)
                )
                in_flight.discard(training.request_id)
                handled.append((ctx.instance_id, training.request_id))

            return handle

        contexts = [context(a, settings, "A"), context(b, settings, "B")]
        with trio.move_on_after(3.0):
            async with trio.open_nursery() as nursery:
                for ctx in contexts:
                    nursery.start_soon(run_due, ctx, "next_check", handler(ctx))
        assert overlaps == []
        assert sorted(rid for _, rid in handled) == sorted(f"req-{i}" for i in range(30))
        assert await a.claim_owners("trainings") == []  # every claim was given back


async def test_a_stale_owners_late_answer_changes_nothing(
    database_url: str, settings: Settings
) -> None:
    """A claims, its claim expires, B claims and completes the training; A's late answer
    goes through reconcile like any other and changes nothing."""
    async with two_instances(database_url) as (a, b):
        ra, rb = Reconciler(a, settings), Reconciler(b, settings)
        view = await ra.register(name="ann", training_type="portrait", request_id="r", layer="t")
        now = view.next_check_at
        assert now is not None
        assert [t.id for t in (await a.claim_due("next_check", now, 5, "A", 10.0)).items]
        taken = await b.claim_due("next_check", now + 11, 5, "B", 10.0)
        assert taken.rescued == {view.id: "A"}
        done = await rb.observe(Observation("r", "poller", Kind.SUCCEEDED, output=LORA))
        assert done.to_status == "COMPLETED"
        await b.release("trainings", [view.id], "B")
        before = await b.training("r"), await b.events("r")
        # A's answers, asked before B's check: still running; or a failure.
        for kind in (Kind.RUNNING, Kind.QUEUED, Kind.FAILED, Kind.TRANSIENT):
            late = await ra.observe(Observation("r", "poller", kind, detail="late"))
            assert late.kind == "none", kind
        after = await a.training("r"), await a.events("r")
        assert after[0] is not None and after[0].status == "COMPLETED"
        assert after[0].lora_url == before[0].lora_url  # type: ignore[union-attr]
        assert after[1] == before[1]


# -- delivery heads ------------------------------------------------------------------------
def _add_outbox(conn: Connection, trainings: int, events: int, prefix: str = "m") -> None:
    for n in range(events):
        for t in range(trainings):
            Outbox.create(
                consumer="delivery",
                message_id=f"{prefix}-{t}-{n}",
                request_id=f"req-{t}",
                event=f"e{n}",
                payload_json="{}",
                created_at=1.0,
                next_attempt_at=1.0,
            )


async def test_two_senders_claim_each_head_once_and_keep_the_order(database_url: str) -> None:
    async with two_instances(database_url) as (a, b):
        await a.write(_add_outbox, 6, 4)
        sent: list[str] = []
        in_flight: set[str] = set()

        async def sender(store: Store, owner: str) -> None:
            busy: set[str] = set()
            idle = 0
            async with trio.open_nursery() as nursery:
                while idle < 20:
                    now = time.time()
                    claim = await store.outbox.claim_heads(
                        "delivery", now, sorted(busy), 3, owner, 60.0
                    )
                    idle = 0 if claim.items or busy else idle + 1
                    for message in claim.items:
                        assert message.request_id not in in_flight, "two senders of a training"
                        in_flight.add(message.request_id)
                        busy.add(message.request_id)
                        nursery.start_soon(send, store, owner, message, busy)
                    await trio.sleep(0.01)

        async def send(store: Store, owner: str, message: Any, busy: set[str]) -> None:
            await trio.sleep(random.uniform(0, 0.02))
            sent.append(message.message_id)
            in_flight.discard(message.request_id)
            await store.outbox.delivered(message.id, time.time(), owner)
            busy.discard(message.request_id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender, a, "A")
            nursery.start_soon(sender, b, "B")
        assert sorted(sent) == sorted(f"m-{t}-{n}" for t in range(6) for n in range(4))
        for t in range(6):
            assert [m for m in sent if m.startswith(f"m-{t}-")] == [f"m-{t}-{n}" for n in range(4)]
        backlog, _, next_due = await a.outbox.stats("delivery", [], time.time())
        assert (backlog, next_due) == (0, None)


async def test_a_training_with_a_held_entry_gets_no_second_sender(database_url: str) -> None:
    """The head of a training is held by A; even once it stops being the head (abandoned by
    someone else), the training's next entry waits until A's claim is gone."""
    async with two_instances(database_url) as (a, b):
        await a.write(_add_outbox, 1, 2)
        (head,) = (await a.outbox.claim_heads("delivery", 10.0, [], 5, "A", 60.0)).items
        assert (await b.outbox.claim_heads("delivery", 10.0, [], 5, "B", 60.0)).items == []
        assert (await b.outbox.stats("delivery", [], 10.0))[2] is None  # nothing due for B
        await b.outbox.abandon_pending("delivery", 10.0, "test")  # both abandoned ...
        await b.write(
            lambda conn: Outbox.update(abandoned_at=None).where(Outbox.id != head.id).execute()
        )  # ... and the second one back
        assert (await b.outbox.claim_heads("delivery", 10.0, [], 5, "B", 60.0)).items == []
        await a.outbox.failed(head.id, "HTTP 500", None, "A")  # gives A's claim up
        (second,) = (await b.outbox.claim_heads("delivery", 10.0, [], 5, "B", 60.0)).items
        assert second.message_id == "m-0-1"
        # An expired claim of a head is taken over and reported.
        await b.write(lambda conn: Outbox.update(abandoned_at=10.0).execute())
        await b.write(_add_outbox, 2, 1, "n")
        mine = await a.outbox.claim_heads("delivery", 80.0, [], 5, "A", 5.0)
        taken = await b.outbox.claim_heads("delivery", 86.0, [], 5, "B", 5.0)
        assert len(mine.items) == 2 and taken.rescued == {m.id: "A" for m in mine.items}


# -- artifacts -----------------------------------------------------------------------------
async def test_an_artifact_is_claimed_by_one_instance(database_url: str) -> None:
    async with two_instances(database_url) as (a, b):
        rows = [
            {"request_id": f"req-{i}", "kind": "lora", "url": f"https://x/{i}", "path": f"/{i}"}
            for i in range(20)
        ]
        assert await a.artifacts.create(rows, 1.0) == 0
        got: dict[str, list[int]] = {"A": [], "B": []}

        async def claim(store: Store, owner: str) -> None:
            for _ in range(10):
                claim = await store.artifacts.claim_due(5.0, 3, owner, 60.0)
                got[owner] += [f.id for f in claim.items]
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(claim, a, "A")
            nursery.start_soon(claim, b, "B")
        every = got["A"] + got["B"]
        assert len(every) == len(set(every)) == 20
        assert await a.artifacts.next_due() == 65.0  # held: due for anyone when claims expire
        # A stored file is never claimed again; the expired claims of the others are taken
        # over: A's are rescued, B's own are simply B's again.
        stored = every[0]
        await a.artifacts.update(stored, stored_at=6.0)
        later = await b.artifacts.claim_due(70.0, 50, "B", 60.0)
        assert sorted(f.id for f in later.items) == sorted(every[1:])
        assert later.rescued == {i: "A" for i in got["A"] if i != stored}


async def test_schema_6_adds_the_claim_columns_to_an_older_database(database_url: str) -> None:
    tables = ("trainings", "outbox", "artifacts")
    async with open_store(database_url) as s:
        await s.write(_add_trainings, 1, 1.0)

        def downgrade(conn: Connection) -> None:  # the three tables as schema 4 had them
            for table, model in zip(tables, ("training", "outbox", "artifact"), strict=True):
                conn.execute(f"DROP INDEX IF EXISTS {model}_claimed_by")
                for column in ("claimed_by", "claim_expires_at"):
                    conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
            Meta.update(value="4").where(Meta.key == "schema_version").execute()

        await s.write(downgrade)
    async with open_store(database_url) as s:

        def schema(conn: Connection) -> dict[str, tuple[set[str], set[tuple[str, ...]]]]:
            return {
                t: (
                    {c.name for c in conn.db.get_columns(t)},
                    {tuple(i.columns) for i in conn.db.get_indexes(t)},
                )
                for t in tables
            }

        found = await s.read(schema)
        version = await s.read(lambda conn: Meta.get(Meta.key == "schema_version").value)
        claim = await s.claim_due("next_check", 5.0, 10, "A", 60.0)
    assert version == "6" and len(claim.items) == 1
    for columns, indexes in found.values():
        assert {"claimed_by", "claim_expires_at"} <= columns and ("claimed_by",) in indexes


def _instance(instance_id: str) -> dict[str, Any]:
    return {
        "id": instance_id,
        "host": "elsewhere",
        "pid": 1,
        "version": "test",
        "webhook_listen": None,
        "metrics_listen": None,
    }


async def test_claims_of_an_instance_whose_heartbeat_stopped_are_taken_at_once(
    database_url: str, settings: Settings
) -> None:
    """Owners of another host cannot be asked whether they run; their heartbeat says it. A
    claim of an instance silent for longer than the live window is taken over at once; one
    of a live instance, or of an owner with no instance row, waits for its expiry. The
    leader's prune deletes only the silent row."""
    async with two_instances(database_url) as (a, b):
        ids = await a.write(_add_trainings, 3, 1.0)
        for instance_id in ("silent", "alive"):
            await a.cluster.beat(_instance(instance_id), start=True)
        await a.write(
            lambda conn: (
                Instance.update(heartbeat_at=Instance.heartbeat_at - 100.0)
                .where(Instance.id == "silent")
                .execute()
            )
        )
        for tid, owner in zip(ids, ("silent", "alive", "no-row"), strict=True):
            await a.write(
                lambda conn, tid=tid, owner=owner: (
                    Training.update(claimed_by=owner, claim_expires_at=10_000.0)
                    .where(Training.id == tid)
                    .execute()
                )
            )
        gone = await context(b, settings, "B").gone_owners("trainings")
        assert gone == ["silent"]
        taken = await b.claim_due("next_check", 100.0, 10, "B", 60.0, gone)
        assert taken.rescued == {ids[0]: "silent"}
        assert await b.cluster.silent(15.0) == ["silent"]
        assert await b.cluster.prune(50.0) == 1
        assert await b.cluster.silent(15.0) == []
        assert [row.id for row in await b.cluster.live(15.0)] == ["alive"]
