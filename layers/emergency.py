"""⚠️ emergency: guards against a provider that never answers.

A training still unfinished at its ``deadline_at`` (submit + ``deadline_seconds``) is asked of
FAL one last time; if FAL still has no final answer, it is finished by the fallback policy,
marked as a fallback of this layer.
"""

from __future__ import annotations

import trio

from daemon.layer import LayerContext, check_training, run_due
from daemon.reconcile import Kind, Observation
from daemon.store import Training, TrainingView
from plugins.hookspecs import hookimpl


class EmergencyLayer:
    name = "emergency"
    order = 60

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        async def last_chance(training: TrainingView) -> None:
            change = await check_training(ctx, training, self.name)
            if change.training is None or not change.training.finished:
                await ctx.reconciler.observe(
                    Observation(training.request_id, self.name, Kind.DEADLINE)
                )

        await run_due(ctx, Training.deadline_at, last_chance, task_status=task_status)


@hookimpl
def trainguard_layers() -> list[EmergencyLayer]:
    return [EmergencyLayer()]
