"""The one registry of built-in layer names: their modules, log tags and fallback hosts.

Every other module derives its list from here: ``config`` (the built-in ``[layers.NAME]``
tables and the fallback URL templates), ``metrics`` (the series exported at 0 from the
start), ``logs`` (the tag of each layer's lines) and ``plugins.manager`` (the modules
registered, in this order, before any entry-point plugin). Imports nothing of ours.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BUILTIN",
    "BUILTIN_LAYERS",
    "BUILTIN_MODULES",
    "CHECK",
    "FALLBACK_HOSTS",
    "LAYER_TAGS",
    "RECHECK",
    "WARN",
    "WEBHOOK",
    "BuiltinLayer",
]

#: The documented log tags (the original system's), by what a line is about.
WEBHOOK = "[WEBHOOK]"
CHECK = "🔍"
RECHECK = "🔄"
WARN = "⚠️"


@dataclass(frozen=True)
class BuiltinLayer:
    """One built-in guard layer."""

    name: str
    """Its ``[layers.NAME]`` table, metric label and ``layer`` log field."""
    tag: str
    """The tag its log lines carry."""
    fallback_host: str
    """The host of its fallback URLs (under the reserved ``.invalid`` domain), named after the
    original system's handler."""
    registered: int
    """Its place in the registration order (which ``trainguard plugins`` lists)."""

    @property
    def module(self) -> str:
        return f"trainguard.layers.{self.name}"


#: The built-in layers, in the documented order (config tables, metric series, templates).
BUILTIN = (
    BuiltinLayer("webhook", WEBHOOK, "webhook-handler", registered=0),
    BuiltinLayer("poller", CHECK, "status-checker", registered=2),
    BuiltinLayer("delayed", RECHECK, "training-manager", registered=3),
    BuiltinLayer("startup", CHECK, "startup-checker", registered=1),
    BuiltinLayer("completeness", RECHECK, "completeness-check", registered=4),
    BuiltinLayer("emergency", WARN, "emergency", registered=5),
)

BUILTIN_LAYERS = tuple(layer.name for layer in BUILTIN)
LAYER_TAGS = {layer.name: layer.tag for layer in BUILTIN}
FALLBACK_HOSTS = {layer.name: layer.fallback_host for layer in BUILTIN}

#: Every built-in plugin module, in registration order: the layers, then the plugins written
#: as a third party would (their layers are not guard layers: no tag, no fallback).
BUILTIN_MODULES = (
    *(layer.module for layer in sorted(BUILTIN, key=lambda layer: layer.registered)),
    "trainguard.plugins.artifacts",
    "trainguard.plugins.delivery",
)
