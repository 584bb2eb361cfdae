"""stale_alert: an example third-party trainguard layer, small enough to copy.

Every ``interval_seconds`` the layer looks for trainings that are still ``IN_QUEUE`` at FAL
more than ``queue_warning_seconds`` after they were submitted. It logs one ⚠️ line per
training and exports the count as the gauge ``trainguard_stale_alert_stale_trainings``.

The rules every layer follows:

* Observe, never write. A layer reads ``ctx.store``. When it learns something about a
  training it hands that to ``ctx.reconciler``, the one writer. This layer only reports,
  so it hands nothing over.
* Call ``task_status.started()`` once the layer is ready. An error raised before that (bad
  options, say) stops the daemon at start. An error raised after it makes the supervisor
  restart this layer alone.
* Beat the heartbeat: ``ctx.passed()`` after each pass, ``ctx.heartbeat()`` during a long
  one. The systemd watchdog is fed only while every heartbeat is fresh.

The plugin also implements the ``trainguard_fallback_applied`` hook to show how a plugin
follows trainings. The entry point in pyproject.toml names ``plugin`` below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import structlog
import trio
from prometheus_client import Gauge

from trainguard.config import ConfigError
from trainguard.layer import LayerContext
from trainguard.logs import WARN
from trainguard.plugins.hookspecs import hookimpl
from trainguard.store import TrainingView

NAME = "stale_alert"
#: The options of ``[layers.stale_alert]`` and their defaults (``enabled`` is trainguard's).
DEFAULTS: dict[str, float] = {"interval_seconds": 60.0, "queue_warning_seconds": 900.0}

log = structlog.get_logger(f"trainguard.plugins.{NAME}")


def parse_options(options: Mapping[str, Any]) -> dict[str, float]:
    """Return the options with defaults filled in.

    trainguard passes a plugin's table as it is, so the plugin checks it. A bad value raises
    ``ConfigError`` naming the key.
    """
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        known = ", ".join(DEFAULTS)
        raise ConfigError(f"layers.{NAME}.{unknown[0]}: unknown key (known keys: {known})")
    parsed: dict[str, float] = {}
    for key, default in DEFAULTS.items():
        value = options.get(key, default)
        # bool is an int in Python: `interval_seconds = true` must not pass as 1.
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 < value < math.inf
        ):
            raise ConfigError(
                f"layers.{NAME}.{key}: must be a finite number greater than 0, got {value!r}"
            )
        parsed[key] = float(value)
    return parsed


class StaleAlertLayer:
    """Warns about trainings that wait too long in FAL's queue. It only reads."""

    name = NAME
    order = 90  # start order (lower first): after the built-ins, none of which it needs

    def __init__(self) -> None:
        self.gauge: Gauge | None = None

    def heartbeat_timeout(self, options: Mapping[str, Any]) -> float:
        """How stale the heartbeat may get. It beats once a pass, so allow two missed passes."""
        return 2 * parse_options(options)["interval_seconds"] + 60

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        options = parse_options(ctx.options)  # before started(): bad options stop the daemon
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
    def trainguard_fallback_applied(self, training: TrainingView, layer: str, reason: str) -> None:
        """Runs after the fallback is committed. A hook may also be ``async def``: the daemon
        awaits it, with a timeout. An error in a hook is logged and counted, and never undoes
        the transition."""
        self.fallbacks_heard += 1
        log.info(
            "fallback heard",
            request_id=training.request_id,
            name=training.name,
            by_layer=layer,
            reason=reason,
            fallbacks_heard=self.fallbacks_heard,
        )


plugin = StaleAlertPlugin()
