"""🔍 poller (the status checker): guards against a webhook that never arrives.

Every unfinished training is asked of FAL ``first_check_after_seconds`` after submit, then
every ``interval_seconds`` (with jitter), with logs so progress moves; on COMPLETED the result
is fetched. Reconcile keeps the schedule in ``next_check_at``: transient errors back off per
training (exponential, capped) and the poller never gives up before the deadline.
"""

from __future__ import annotations

import trio

from trainguard.config import LAYER_SCHEMA
from trainguard.layer import LayerContext, check_training, run_due
from trainguard.plugins.hookspecs import hookimpl


class PollerLayer:
    name = "poller"
    order = 40
    #: ``[layers.poller]``, declared with core config: reconcile reads these options too.
    options = LAYER_SCHEMA["poller"]

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        await run_due(
            ctx,
            "next_check",
            lambda training: check_training(ctx, training, self.name),
            concurrency=int(ctx.options["concurrency"]),
            task_status=task_status,
        )


@hookimpl
def trainguard_layers() -> list[PollerLayer]:
    return [PollerLayer()]
