"""🔍 startup: guards against work missed while the daemon was down.

Once, when the daemon starts and before READY: every stored webhook receipt not yet applied is
applied, then every unfinished training, however old, is reconciled with FAL (the original
skipped trainings older than 24 h), with bounded concurrency. One summary log line.
"""

from __future__ import annotations

from collections import Counter

import trio

from daemon import logs
from daemon.layer import LayerContext, check_training
from daemon.store import UNFINISHED, Training, TrainingView, WebhookReceipt
from plugins.hookspecs import hookimpl

PROGRESS_EVERY_SECONDS = 5.0
EXTEND_START_SECONDS = 30.0


def _pending_receipts() -> list[int]:
    query = (
        WebhookReceipt.select(WebhookReceipt.id)
        .where(
            WebhookReceipt.processed_at.is_null(),
            WebhookReceipt.verification.in_(("verified", "skipped")),
        )
        .order_by(WebhookReceipt.id)
    )
    return [r.id for r in query]


class StartupLayer:
    name = "startup"
    order = 20

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        started = trio.current_time()
        outcomes: Counter[str] = Counter()
        receipts = await ctx.store.read(_pending_receipts)
        for receipt_id in receipts:
            change = await ctx.reconciler.apply_receipt(receipt_id)
            outcomes[f"receipt_{change.kind}"] += 1
            ctx.heartbeat()

        unfinished = await ctx.store.trainings(Training.status.in_(UNFINISHED))
        limiter = trio.CapacityLimiter(int(ctx.options["concurrency"]))
        done = 0
        shown = trio.current_time()

        async def one(training: TrainingView) -> None:
            nonlocal done, shown
            async with limiter:
                try:
                    change = await check_training(ctx, training, self.name)
                    outcomes[change.kind] += 1
                except Exception as exc:  # one training's trouble must not stop the sweep
                    outcomes["error"] += 1
                    ctx.failed(exc)
                ctx.heartbeat()
                done += 1
                if trio.current_time() - shown >= PROGRESS_EVERY_SECONDS:
                    # A big backlog at a modest FAL rate limit takes longer than systemd's
                    # start timeout: while the sweep moves, ask for more time.
                    shown = trio.current_time()
                    ctx.progress(
                        f"startup sweep: {done}/{len(unfinished)} trainings checked",
                        extend_start_seconds=EXTEND_START_SECONDS,
                    )

        async with trio.open_nursery() as nursery:
            for training in unfinished:
                nursery.start_soon(one, training)
        ctx.passed()
        ctx.log.info(
            f"{logs.CHECK} startup sweep done",
            receipts_applied=len(receipts),
            trainings_checked=len(unfinished),
            seconds=round(trio.current_time() - started, 3),
            **dict(sorted(outcomes.items())),
        )
        task_status.started()


@hookimpl
def trainguard_layers() -> list[StartupLayer]:
    return [StartupLayer()]
