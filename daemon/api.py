"""trainguard's plugin API: the one module a third-party layer or plugin imports.

```python
from trainguard.api import Layer, LayerContext, Option, PluginContext, hookimpl
```

What is here, and nothing else, is public and kept stable:

* ``hookimpl``: marks a hook implementation; every hook is specified, with when it is
  called, its arguments, its return, whether it may be async and its time limit, in
  ``trainguard.plugins.hookspecs`` (their names and arguments are contract).
* ``Layer``: the protocol of a guard layer (``name``, ``run(ctx, *, task_status)``; optional
  ``order``, ``options``, ``heartbeat_timeout``); ``LayerContext``: what its ``run`` gets.
* ``Option``: one declared option of a ``[layers.NAME]`` table (type, default, bounds); a
  layer's ``options`` maps names to them and trainguard validates the table at start and on
  reload, with the same one-line errors as core config (``validate_options`` checks a table
  the same way, for a plugin's own tests).
* ``PluginContext``, ``Stash``, ``StashKey``: what every hook of a plugin gets as
  ``context`` (the settings, its layers' validated options, its own stash); and
  ``current_context()`` for a hook that does not take ``context``.
* What plugins observe: ``TrainingView`` (a training as stored), ``Change`` (what an
  observation did) with its kind ``ChangeKind``, ``Observation`` and its ``Kind`` (what a
  layer hands ``ctx.reconciler.observe``), ``OUTBOX_EVENTS`` (the ``event`` names of
  ``trainguard_outbox``), ``Settings``; the log tag ``WARN`` for lines an operator must see.
* The errors a plugin raises or catches: ``TrainguardError`` (the base of all),
  ``ConfigError``, ``PluginError``, ``StoreError``, ``FalRequestError``.
"""

from __future__ import annotations

from trainguard.config import Option, Settings, validate_options
from trainguard.decide import OUTBOX_EVENTS, ChangeKind
from trainguard.errors import ConfigError, FalRequestError, PluginError, StoreError, TrainguardError
from trainguard.layer import Layer, LayerContext, PluginContext, Stash, StashKey
from trainguard.names import WARN
from trainguard.observe import Kind, Observation
from trainguard.plugins.hookspecs import hookimpl
from trainguard.plugins.manager import current_context
from trainguard.reconcile import Change
from trainguard.store import TrainingView

__all__ = [
    "OUTBOX_EVENTS",
    "WARN",
    "Change",
    "ChangeKind",
    "ConfigError",
    "FalRequestError",
    "Kind",
    "Layer",
    "LayerContext",
    "Observation",
    "Option",
    "PluginContext",
    "PluginError",
    "Settings",
    "Stash",
    "StashKey",
    "StoreError",
    "TrainguardError",
    "TrainingView",
    "current_context",
    "hookimpl",
    "validate_options",
]
