"""Every hook of trainguard, in one module (pytest's ``hookspec.py``, datasette's layout).

A plugin is a module or an object with functions marked ``@hookimpl`` (from
``trainguard.api``) whose names match the specs below; an implementation takes only the
arguments it names, in any order. Built-in layers and plugins register exactly as a
third-party one does (entry-point group ``trainguard``).

How trainguard calls them:

* Through pluggy (``pm.hook.NAME`` via one ``subset_hook_caller`` per implementing plugin),
  so ``@hookimpl(wrapper=True)`` wrappers and ``pm.add_hookcall_monitoring`` see every call.
  Each plugin is called on its own, inside every wrapper: a plugin that raises, answers
  garbage or is slow is logged (``plugin hook failed``), counted
  (``trainguard_hook_errors_total{hook}``) and never breaks the transition, the daemon or
  the other plugins. Plugins are called in pluggy's order (``tryfirst``, then the latest
  registered, ..., ``trylast``).
* ``context`` is the calling plugin's own :class:`trainguard.api.PluginContext`: the
  settings, the validated options of its layers and its ``stash`` (a wrapper sees the
  context of the plugin it wraps). Within a call, ``trainguard.api.current_context()``
  returns the same object.
* "May be async": the implementation may return an awaitable (be ``async def``), which the
  daemon awaits (datasette's ``await_me_maybe``). Otherwise it must be synchronous.
* The time limit is per plugin, awaiting included; a plugin past it is cut off (an async
  one is cancelled; synchronous code cannot be interrupted, so keep it short).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from trainguard.config import Settings
    from trainguard.layer import Layer, PluginContext
    from trainguard.store import TrainingView

PROJECT = "trainguard"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: The seconds each plugin has for one call of a training hook, awaiting included.
HOOK_TIMEOUT_SECONDS = 10.0

#: The hooks about trainings, called by reconcile (through ``plugins.manager``).
TRAINING_HOOKS = (
    "trainguard_training_finished",
    "trainguard_fallback_applied",
    "trainguard_fallback_upgraded",
    "trainguard_outbox",
)


@hookspec
def trainguard_layers(settings: Settings, context: PluginContext) -> list[Layer]:
    """Return the guard layers this plugin contributes (objects with ``name`` and ``run``;
    see ``trainguard.api.Layer``), or an empty list.

    When: once per daemon (and once per CLI command that finishes trainings), at
    construction, before any layer starts and before any other hook of the plugin. A plugin
    learns the settings here (also ``context.settings``); a reload does not call it again.
    ``settings``: the validated configuration. Return: a list of layers; names must be unique
    across all plugins. Synchronous only; not time-limited (it runs before the daemon does).
    Errors: an exception stops the daemon at start (a ``PluginError`` says which plugin).
    """


@hookspec
def trainguard_training_finished(training: TrainingView, layer: str, context: PluginContext) -> Any:
    """A training reached a terminal state: a real result, a fallback, a failure or a cancel.

    When: after the transition is committed (it is durable and visible in the store), in the
    daemon's trio thread. ``training``: the training as committed. ``layer``: the layer whose
    observation finished it. Return: ignored. May be async; ``HOOK_TIMEOUT_SECONDS`` per
    plugin. For a fallback, ``trainguard_fallback_applied`` follows.
    """


@hookspec
def trainguard_fallback_applied(
    training: TrainingView, layer: str, reason: str, context: PluginContext
) -> Any:
    """A layer finished a training by the fallback policy (``training.is_fallback`` is true).

    When: after the commit, right after ``trainguard_training_finished`` for the same
    transition. ``layer``: the layer that applied it; ``reason``: why (for the operator).
    Return: ignored. May be async; ``HOOK_TIMEOUT_SECONDS`` per plugin.
    """


@hookspec
def trainguard_fallback_upgraded(training: TrainingView, layer: str, context: PluginContext) -> Any:
    """A fallback was replaced by the real result that FAL finally gave.

    When: after the commit of the upgrade. ``training``: with the real result now;
    ``layer``: the layer that observed it. Return: ignored. May be async;
    ``HOOK_TIMEOUT_SECONDS`` per plugin.
    """


@hookspec
def trainguard_outbox(
    training: TrainingView, event: str, layer: str, context: PluginContext
) -> list[dict[str, Any]] | None:
    """Return outbox entries to store atomically with a finishing transition:
    ``{"consumer": NAME, "payload": {...}}`` each, or None.

    When: INSIDE the transaction of the transition, on the database thread, before the
    commit. ``training``: the training as it is being written; ``event``: one of
    ``training.completed``, ``training.fallback``, ``training.failed``,
    ``training.cancelled``, ``training.upgraded``; ``layer``: the observing layer.
    Synchronous only (an awaitable is refused as garbage), fast, no I/O, no time limit it
    could be held to: it delays the commit of every write batched with it. An entry that is
    not a dict with a string ``consumer`` and a dict ``payload`` drops that plugin's
    entries (logged, counted); the transition and the other plugins' entries go ahead. A
    consumer (a layer of the same plugin) delivers the entries later: that an entry exists is
    as certain as the transition itself.
    """
