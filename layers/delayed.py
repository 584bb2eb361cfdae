"""🔄 delayed (the training manager's check): guards against a poller that fell behind.

One check ``after_seconds`` after submit, and one ``verify_after_seconds`` after the training
finished that verifies the guaranteed fields (and may upgrade a fallback). Both times live in
``delayed_check_at``, set by reconcile, so they survive a restart; it works with the poller off.
"""

from __future__ import annotations

import trio

from trainguard.config import LAYER_SCHEMA
from trainguard.layer import LayerContext, check_training, run_due
from trainguard.plugins.hookspecs import hookimpl


class DelayedLayer:
    name = "delayed"
    order = 50
    #: ``[layers.delayed]``, declared with core config: reconcile reads these options too.
    options = LAYER_SCHEMA["delayed"]

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        await run_due(
            ctx,
            "delayed_check",
            lambda training: check_training(ctx, training, self.name),
            task_status=task_status,
        )


@hookimpl
def trainguard_layers() -> list[DelayedLayer]:
    return [DelayedLayer()]
