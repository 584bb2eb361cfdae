"""🔄 completeness: guards against missing fields, replaceable fallbacks and lost artifacts.

Every ``interval_seconds`` (the next run is a time in the database): finished trainings that
lack a guaranteed field or hold a fallback that FAL may still replace are asked of FAL again
(a real result upgrades the fallback), and stored LoRA URLs are checked to answer (HEAD, 2xx).
A fallback of kind ``fal_failure`` or ``expired`` is not asked again: FAL has said its last
word on those.

With several instances on one database, only the holder of the leader role ``sweeps`` runs a
pass (the others wait, beating their heartbeat). A leader, not per-training claims: this is a
periodic sweep driven by one query over all finished trainings on one schedule in the
database, not a queue of due rows; one leader keeps each pass once across the cluster, and
the schedule it moves is the one every instance reads, so a new leader (at most
``[cluster] lease_seconds`` after the old one died) carries on where the last pass left off.
"""

from __future__ import annotations

import trio

from trainguard import fal, logs
from trainguard.cluster import SWEEPS
from trainguard.config import LAYER_SCHEMA
from trainguard.layer import IDLE_RECHECK_SECONDS, LayerContext, check_training
from trainguard.plugins.hookspecs import hookimpl
from trainguard.reconcile import Kind, Observation
from trainguard.store import TrainingView

SCHEDULE = "completeness"


class CompletenessLayer:
    name = "completeness"
    order = 70
    #: ``[layers.completeness]``, declared with core config (checked as the file is read).
    options = LAYER_SCHEMA["completeness"]

    def heartbeat_timeout(self, options: dict[str, float]) -> float:
        return 300.0 + float(options["interval_seconds"])

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        if await ctx.store.schedule(SCHEDULE) is None:
            await ctx.store.set_schedule(SCHEDULE, ctx.clock.now())
        task_status.started()
        while True:
            due = await ctx.store.schedule(SCHEDULE) or ctx.clock.now()
            while (wait := due - ctx.clock.now()) > 0:
                ctx.heartbeat()
                await trio.sleep(min(wait, IDLE_RECHECK_SECONDS))
            if not ctx.leads(SWEEPS):  # another instance runs this pass
                ctx.heartbeat()
                await ctx.wait_to_lead(SWEEPS, IDLE_RECHECK_SECONDS)
                continue
            await self.sweep(ctx)
            await ctx.store.set_schedule(
                SCHEDULE, ctx.clock.now() + float(ctx.options["interval_seconds"])
            )
            ctx.passed()

    async def sweep(self, ctx: LayerContext) -> None:
        batch = int(ctx.options["batch"])
        ask = await ctx.store.finished_incomplete(batch)
        probe: list[TrainingView] = []
        if ctx.options["check_lora_url"]:
            probe = await ctx.store.lora_unchecked(batch)
        outcomes = {"asked": len(ask), "probed": len(probe), "upgraded": 0, "filled": 0}
        limiter = trio.CapacityLimiter(8)

        async def recheck(training: TrainingView) -> None:
            async with limiter:
                if not ctx.leads(SWEEPS):  # the lead was lost during the pass: leave the rest
                    return
                change = await check_training(ctx, training, self.name)
                if change.kind in ("upgrade", "filled"):
                    outcomes["upgraded" if change.kind == "upgrade" else "filled"] += 1
                ctx.heartbeat()

        async def check_url(training: TrainingView) -> None:
            async with limiter:
                if not ctx.leads(SWEEPS):
                    return
                answer = await ctx.fal.probe(training.lora_url or "")
                if answer.kind != fal.Kind.TRANSIENT:  # no verdict on a passing error
                    available = answer.kind == fal.Kind.SUCCEEDED
                    await ctx.reconciler.observe(
                        Observation(
                            training.request_id,
                            self.name,
                            Kind.PROBED,
                            available=available,
                            detail=None if available else answer.detail or answer.kind.value,
                        )
                    )
                ctx.heartbeat()

        async with trio.open_nursery() as nursery:
            for training in ask:
                nursery.start_soon(recheck, training)
            for training in probe:
                nursery.start_soon(check_url, training)
        if ask or probe:
            ctx.log.info(f"{logs.RECHECK} completeness sweep", **outcomes)


@hookimpl
def trainguard_layers() -> list[CompletenessLayer]:
    return [CompletenessLayer()]
