"""Every hook of trainguard, in one module (pytest's and datasette's layout).

A plugin is any module or object with functions marked ``@hookimpl`` whose names match the
specs below. Built-in layers register through ``trainguard_layers`` exactly as a third-party
plugin does. Hooks about trainings are called after the transition is committed; an
implementation may return an awaitable, which the daemon awaits (datasette's
``await_me_maybe``). A failing or slow hook is logged and counted and never breaks a
transition.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from trainguard.config import Settings
    from trainguard.layer import Layer
    from trainguard.store import TrainingView

PROJECT = "trainguard"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: The hooks about trainings, called by reconcile through ``plugins.manager.HookRunner``.
TRAINING_HOOKS = (
    "trainguard_training_finished",
    "trainguard_fallback_applied",
    "trainguard_fallback_upgraded",
    "trainguard_outbox",
)


@hookspec
def trainguard_layers(settings: Settings) -> list[Layer]:
    """Return the guard layers this plugin contributes (objects with ``name`` and ``run``)."""


@hookspec
def trainguard_training_finished(training: TrainingView, layer: str) -> Any:
    """A training reached a terminal state (real result, fallback, failure or cancel)."""


@hookspec
def trainguard_fallback_applied(training: TrainingView, layer: str, reason: str) -> Any:
    """A layer finished a training by the fallback policy (``training.is_fallback`` is true)."""


@hookspec
def trainguard_fallback_upgraded(training: TrainingView, layer: str) -> Any:
    """A fallback was replaced by the real result that FAL finally gave."""


@hookspec
def trainguard_outbox(
    training: TrainingView, event: str, layer: str
) -> list[dict[str, Any]] | None:
    """Inside the transaction of a finishing transition, return outbox entries to store
    atomically with it: ``{"consumer": NAME, "payload": {...}}`` each.

    ``event`` is one of ``training.completed``, ``training.fallback``, ``training.failed``,
    ``training.cancelled``, ``training.upgraded``. Runs on the database thread: synchronous,
    fast, no I/O. A consumer (a layer of the same plugin) delivers the entries later; that
    an entry exists is as certain as the transition itself.
    """
