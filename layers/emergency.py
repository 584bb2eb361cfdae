"""⚠️ emergency: guards against a provider that never answers.

A training still unfinished at its ``deadline_at`` (submit + ``deadline_seconds``) is asked of
FAL one last time: its status (and its result when FAL says COMPLETED), and then, when that
gave no final answer, its result itself (a status call that failed, or a wall clock that
jumped past the deadline, must not hide a result FAL holds). Only if FAL still has no final
answer is it finished by the fallback policy, marked as a fallback of this layer; a real
result arriving later replaces it.

With several instances on one database, only the holder of the leader role ``sweeps`` runs
its passes (``run_due``'s gate; the others wait, beating their heartbeat). A leader, not
per-training claims: a deadline is rare (a training FAL never finished), so there is no load
to spread, and one leader keeps each last chance once across the cluster; a leader that dies
is replaced within ``[cluster] lease_seconds``, which only delays a fallback that is already
hours late by seconds.
"""

from __future__ import annotations

import trio

from trainguard.cluster import SWEEPS
from trainguard.config import LAYER_SCHEMA
from trainguard.layer import LayerContext, check_training, run_due
from trainguard.plugins.hookspecs import hookimpl
from trainguard.reconcile import Change, Kind, Observation
from trainguard.store import TrainingView


def _final(change: Change) -> bool:
    return change.training is not None and change.training.finished


class EmergencyLayer:
    name = "emergency"
    order = 60
    #: ``[layers.emergency]``, declared with core config: reconcile reads these options too.
    options = LAYER_SCHEMA["emergency"]

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        async def last_chance(training: TrainingView) -> None:
            if not ctx.leads(SWEEPS):  # the lead was lost during the pass: leave the rest
                return
            change = await check_training(ctx, training, self.name)
            if not _final(change):
                answer = await ctx.fal.result(ctx.urls(training)[1])
                change = await ctx.reconciler.observe_answer(answer, training.request_id, self.name)
            if not _final(change):
                await ctx.reconciler.observe(
                    Observation(training.request_id, self.name, Kind.DEADLINE)
                )

        await run_due(ctx, "deadline", last_chance, role=SWEEPS, task_status=task_status)


@hookimpl
def trainguard_layers() -> list[EmergencyLayer]:
    return [EmergencyLayer()]
