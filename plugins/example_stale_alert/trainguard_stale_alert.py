"""stale_alert: an example third-party trainguard layer, small enough to copy.

Every ``interval_seconds`` the layer looks for trainings that are still ``IN_QUEUE`` at FAL
more than ``queue_warning_seconds`` after they were submitted. It logs one ⚠️ line per
training and exports the count as the gauge ``trainguard_stale_alert_stale_trainings``.

The rules every layer follows:

* Observe, never write. A layer reads ``ctx.store``. When it learns something about a
  training it hands that to ``ctx.reconciler``, the one writer. This layer only reports,
  so it hands nothing over.
* Declare your options (``options`` below). trainguard checks ``[layers.stale_alert]``
  against them at start and on reload (SIGHUP), with the same one-line errors as its own
  config, and hands the layer the checked values, defaults filled in, as ``ctx.options``.
* Call ``task_status.started()`` once the layer is ready. An error raised before that stops
  the daemon at start. An error raised after it makes the supervisor restart this layer alone.
* Beat the heartbeat: ``ctx.passed()`` after each pass, ``ctx.heartbeat()`` during a long
  one. The systemd watchdog is fed only while every heartbeat is fresh.

The plugin also implements the ``trainguard_fallback_applied`` hook to show how a plugin
follows trainings. Everything comes from ``trainguard.api``, the one public module, and
the store is asked by named operations (``ctx.store.trainings(status=...)``), never with
a query of its own. The entry point in pyproject.toml names ``plugin`` below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
import trio
from prometheus_client import Gauge

from trainguard.api import (
    WARN,
    LayerContext,
    Option,
    PluginContext,
    TrainingView,
    hookimpl,
    validate_options,
)

NAME = "stale_alert"
#: The options of ``[layers.stale_alert]`` (``enabled`` is trainguard's).
OPTIONS = {
    "interval_seconds": Option(float, 60.0, above=0, doc="How often to look."),
    "queue_warning_seconds": Option(
        float, 900.0, above=0, doc="How long in the queue is too long."
    ),
}
DEFAULTS: dict[str, float] = {key: option.default for key, option in OPTIONS.items()}

log = structlog.get_logger(f"trainguard.plugins.{NAME}")


def parse_options(options: Mapping[str, Any]) -> dict[str, float]:
    """The options checked as trainguard checks them, defaults filled in (for tests: the
    daemon does this itself). A bad value raises ``ConfigError`` naming the key."""
    return validate_options(NAME, OPTIONS, options)


class StaleAlertLayer:
    """Warns about trainings that wait too long in FAL's queue. It only reads."""

    name = NAME
    order = 90  # start order (lower first): after the built-ins, none of which it needs
    options = OPTIONS

    def __init__(self) -> None:
        self.gauge: Gauge | None = None

    def heartbeat_timeout(self, options: Mapping[str, Any]) -> float:
        """How stale the heartbeat may get. It beats once a pass, so allow two missed passes."""
        return 2 * options["interval_seconds"] + 60

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        options = ctx.options  # checked against OPTIONS before any layer started
        # After a crash the supervisor calls run() again with the same registry, which
        # rejects a second metric with the same name. Register the gauge only once.
        if self.gauge is None:
            self.gauge = Gauge(
                f"trainguard_{NAME}_stale_trainings",
                "Trainings still IN_QUEUE at FAL longer than queue_warning_seconds.",
                registry=ctx.metrics.registry,  # trainguard's registry, not the global one
            )
        task_status.started()
        while True:
            now = ctx.clock.now()  # wall time on trio's clock, as the daemon stores it
            stale = await ctx.store.trainings(
                status="IN_QUEUE",
                submitted_before=now - options["queue_warning_seconds"],
                order="submitted_at",
            )
            for training in stale:
                ctx.log.bind(request_id=training.request_id, name=training.name).warning(
                    f"{WARN} training still waiting in FAL's queue",
                    waiting_seconds=round(now - training.submitted_at),
                )
            self.gauge.set(len(stale))
            ctx.passed()
            # A plain sleep is enough here: a pass runs at every start, so a restart can only
            # make the next pass come sooner. A layer whose work must not be skipped keeps its
            # schedule in the database (see daemon.layer.run_due).
            await trio.sleep(options["interval_seconds"])


class StaleAlertPlugin:
    """The object the entry point loads. It offers the layer and listens to a hook."""

    def __init__(self) -> None:
        self.fallbacks_heard = 0

    @hookimpl
    def trainguard_layers(self) -> list[StaleAlertLayer]:
        return [StaleAlertLayer()]

    @hookimpl
    def trainguard_fallback_applied(
        self, training: TrainingView, layer: str, reason: str, context: PluginContext
    ) -> None:
        """Runs after the fallback is committed. A hook may also be ``async def``: the daemon
        awaits it, with a timeout. An error in a hook is logged and counted, and never undoes
        the transition. ``context`` holds this plugin's settings, validated options and a
        ``stash`` for state its hooks share."""
        self.fallbacks_heard += 1
        log.info(
            "fallback heard",
            request_id=training.request_id,
            name=training.name,
            by_layer=layer,
            reason=reason,
            fallbacks_heard=self.fallbacks_heard,
            queue_warning_seconds=context.options[NAME]["queue_warning_seconds"],
        )


plugin = StaleAlertPlugin()
