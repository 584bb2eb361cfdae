"""🔍 startup: guards against work missed while the daemon was down.

Once, when the daemon starts and before READY: every stored webhook receipt of a known
training not yet applied is applied (one for an unknown training is not: it waits for its
registration or its eviction), then every unfinished training, however old, is reconciled
with FAL (the original skipped trainings older than 24 h): its result is asked for directly
(the status too, when the result's answer is anything but an output or "in progress"), by a
fixed pool of ``concurrency`` workers fed page by page. With several instances, each page is
claimed: a training another instance checks right now (its sweep, its poller) is passed
over, not checked twice. One summary log line.
"""

from __future__ import annotations

from collections import Counter

import trio

from trainguard import fal, logs
from trainguard.config import LAYER_SCHEMA
from trainguard.layer import CLAIM_ROUNDS, LayerContext, check_training
from trainguard.plugins.hookspecs import hookimpl
from trainguard.reconcile import Change
from trainguard.store import UNFINISHED, TrainingView

PROGRESS_EVERY_SECONDS = 5.0
EXTEND_START_SECONDS = 30.0


async def ask_result(ctx: LayerContext, training: TrainingView) -> Change:
    """The result first: a finished training answers with its output, one still running
    usually with "in progress" (the poller takes it from there). Half the calls of
    status-then-result, which matters for a large backlog. Any other answer is not certainly
    final before FAL said COMPLETED (fal documents no "not ready" wording): the status is
    asked before anything is decided, and the result again if it says COMPLETED."""
    answer = await ctx.fal.result(ctx.urls(training)[1])
    if (
        answer.kind in (fal.Kind.SUCCEEDED, fal.Kind.PENDING)
        or training.fal_completed_at is not None
        or (answer.kind is fal.Kind.TRANSIENT and (answer.http_status or 0) < 500)
    ):
        return await ctx.reconciler.observe_answer(answer, training.request_id, StartupLayer.name)
    return await check_training(ctx, training, StartupLayer.name)


class StartupLayer:
    name = "startup"
    order = 20
    #: ``[layers.startup]``, declared with core config (checked as the file is read).
    options = LAYER_SCHEMA["startup"]

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        started = trio.current_time()
        outcomes: Counter[str] = Counter()
        # Stored webhooks of KNOWN trainings never applied (a crash between store and apply).
        # One for a training nobody registered waits for its registration, which applies it,
        # or for its eviction: replaying those here would hold READY for nothing.
        receipts = await ctx.store.pending_receipts()
        for receipt_id in receipts:
            change = await ctx.reconciler.apply_receipt(receipt_id)
            outcomes[f"receipt_{change.kind}"] += 1
            ctx.heartbeat()

        gone = await ctx.gone_owners("trainings")
        total = sum(
            n for status, n in (await ctx.store.status_counts()).items() if status in UNFINISHED
        )
        done = 0
        shown = trio.current_time()

        async def worker(
            queue: trio.MemoryReceiveChannel[TrainingView], checked: list[int]
        ) -> None:
            nonlocal done, shown
            async with queue:
                async for training in queue:
                    try:
                        change = await ask_result(ctx, training)
                        outcomes[change.kind] += 1
                    except Exception as exc:  # one training's trouble must not stop the sweep
                        outcomes["error"] += 1
                        ctx.failed(exc)
                    finally:
                        checked.append(training.id)
                    ctx.heartbeat()
                    done += 1
                    if trio.current_time() - shown >= PROGRESS_EVERY_SECONDS:
                        # A big backlog at a modest FAL rate limit takes longer than
                        # systemd's start timeout: while the sweep moves, ask for more time.
                        shown = trio.current_time()
                        ctx.progress(
                            f"startup sweep: {done}/{total} trainings checked",
                            extend_start_seconds=EXTEND_START_SECONDS,
                        )

        # A fixed pool of workers fed a page at a time: memory stays flat however big the
        # backlog. Each page is claimed (another instance's sweep or poller passes over it)
        # and holds CLAIM_ROUNDS rounds of the pool, so no claim waits in line long; what the
        # workers have checked is given back with the next claim, in one write.
        pool = int(ctx.options["concurrency"])
        checked: list[int] = []  # claimed, checked, not given back yet
        held: set[int] = set()  # claimed and not given back yet
        send, receive = trio.open_memory_channel[TrainingView](0)
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(pool):
                    nursery.start_soon(worker, receive.clone(), checked)
                receive.close()
                async with send:
                    after = 0
                    while True:
                        if checked:
                            done_ids = _take(checked)
                            await ctx.release("trainings", done_ids)
                            held.difference_update(done_ids)
                        claim = await ctx.store.claim_unfinished(
                            after,
                            pool * CLAIM_ROUNDS,
                            ctx.instance_id,
                            ctx.clock.now(),
                            ctx.claim_seconds,
                            gone,
                        )
                        ctx.claimed("trainings", claim)
                        if not claim.items:
                            break
                        held.update(training.id for training in claim.items)
                        for training in claim.items:
                            await send.send(training)
                        after = claim.items[-1].id
        finally:  # also when stopped half-way: what this sweep holds goes back at once
            if held:
                await ctx.release("trainings", sorted(held))
        ctx.passed()
        ctx.log.info(
            f"{logs.CHECK} startup sweep done",
            receipts_applied=len(receipts),
            trainings_checked=done,
            seconds=round(trio.current_time() - started, 3),
            **dict(sorted(outcomes.items())),
        )
        task_status.started()


def _take(ids: list[int]) -> list[int]:
    """Empty ``ids`` and return what it held."""
    taken = ids[:]
    ids.clear()
    return taken


@hookimpl
def trainguard_layers() -> list[StartupLayer]:
    return [StartupLayer()]
