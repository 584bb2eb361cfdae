"""The plugin manager: built-in layers and entry-point plugins, through the same hooks."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy
import structlog
import trio

from trainguard.plugins import hookspecs

if TYPE_CHECKING:
    from trainguard.config import Settings
    from trainguard.layer import Layer
    from trainguard.metrics import Metrics

log = structlog.get_logger("trainguard.plugins")

ENTRY_POINT_GROUP = "trainguard"
BUILTIN_MODULES = (
    "trainguard.layers.webhook",
    "trainguard.layers.startup",
    "trainguard.layers.poller",
    "trainguard.layers.delayed",
    "trainguard.layers.completeness",
    "trainguard.layers.emergency",
    "trainguard.plugins.artifacts",
    "trainguard.plugins.delivery",
)


class PluginError(RuntimeError):
    """A plugin could not be loaded or contributes something inconsistent."""


@dataclass(frozen=True)
class LayerEntry:
    layer: Layer
    plugin: str
    source: str  # "built-in" or the distribution that provides it


def build_manager(
    *, entry_points: bool = True, extra: Iterable[object] = ()
) -> pluggy.PluginManager:
    """A manager with the built-in layers, then entry-point plugins, then ``extra`` ones."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for module in BUILTIN_MODULES:
        pm.register(importlib.import_module(module), name=f"builtin:{module}")
    if entry_points:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as exc:
            raise PluginError(f"cannot load a trainguard plugin: {exc}") from exc
    for plugin in extra:
        pm.register(plugin)
    return pm


def _source(pm: pluggy.PluginManager, plugin: object, name: str) -> str:
    if name.startswith("builtin:"):
        return "built-in"
    for dist_plugin, dist in pm.list_plugin_distinfo():
        if dist_plugin is plugin:
            return f"{dist.project_name} {dist.version}"
    return getattr(plugin, "__name__", name)


def collect_layers(pm: pluggy.PluginManager, settings: Settings) -> list[LayerEntry]:
    """Every layer every plugin offers, with where it came from; names must be unique."""
    entries: list[LayerEntry] = []
    seen: dict[str, str] = {}
    # pluggy lists implementations in registration order (it calls them in reverse).
    for impl in pm.hook.trainguard_layers.get_hookimpls():
        offered = impl.function(settings=settings) if impl.argnames else impl.function()
        for layer in offered or ():
            name = getattr(layer, "name", None)
            if not isinstance(name, str) or not callable(getattr(layer, "run", None)):
                raise PluginError(f"plugin {impl.plugin_name} offers a layer without name/run")
            if name in seen:
                raise PluginError(
                    f"layer {name!r} is offered by both {seen[name]} and {impl.plugin_name}"
                )
            seen[name] = impl.plugin_name
            entries.append(
                LayerEntry(layer, impl.plugin_name, _source(pm, impl.plugin, impl.plugin_name))
            )
    return entries


class HookRunner:
    """Calls a training hook on every implementation, each isolated from the others.

    Implementations run in pluggy's call order (``tryfirst`` first, then the latest
    registered). Each gets ``timeout`` seconds, awaiting included.
    """

    def __init__(
        self, pm: pluggy.PluginManager, metrics: Metrics | None = None, timeout: float = 10.0
    ):
        self.pm = pm
        self.metrics = metrics
        self.timeout = timeout
        if metrics is not None:  # every hook's error counter exported at 0 from the start
            for name in hookspecs.TRAINING_HOOKS:
                metrics.add_hook(name)

    async def __call__(self, name: str, **kwargs: Any) -> None:
        for impl in reversed(getattr(self.pm.hook, name).get_hookimpls()):
            try:
                with trio.fail_after(self.timeout):
                    value = impl.function(**{a: kwargs[a] for a in impl.argnames})
                    if inspect.isawaitable(value):
                        await value
            except Exception as exc:  # a hook never breaks a transition
                if self.metrics is not None:
                    self.metrics.hook_error(name)
                log.error(
                    "plugin hook failed",
                    hook=name,
                    plugin=impl.plugin_name,
                    error=f"no answer within {self.timeout:g} s"
                    if isinstance(exc, trio.TooSlowError)
                    else f"{type(exc).__name__}: {exc}",
                )


def outbox_collector(
    pm: pluggy.PluginManager, metrics: Any = None
) -> Callable[..., list[dict[str, Any]]]:
    """The ``trainguard_outbox`` hook as reconcile calls it, on the database thread.

    Each implementation is isolated: one that raises or answers garbage is logged and
    counted, and the transition and the other plugins' entries go ahead.
    """

    def collect(training: Any, event: str, layer: str) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        for impl in pm.hook.trainguard_outbox.get_hookimpls():
            kwargs = {"training": training, "event": event, "layer": layer}
            try:
                offered = list(impl.function(**{a: kwargs[a] for a in impl.argnames}) or [])
                for entry in offered:
                    if (
                        not isinstance(entry, dict)
                        or not isinstance(entry.get("consumer"), str)
                        or not isinstance(entry.get("payload"), dict)
                    ):
                        raise TypeError(
                            f"outbox entry needs a consumer and a payload object: {entry!r}"
                        )
                entries.extend(offered)
            except Exception as exc:
                if metrics is not None:
                    metrics.hook_error("trainguard_outbox")
                log.error(
                    "plugin outbox hook failed",
                    plugin=impl.plugin_name,
                    error=f"{type(exc).__name__}: {exc}",
                )
        return entries

    return collect
