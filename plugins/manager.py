"""The plugin manager: built-in layers and entry-point plugins, through the same hooks.

Every hook is called through pluggy, one plugin at a time: for each plugin implementing
it, ``pm.subset_hook_caller(name, remove_plugins=<the other implementing plugins>)``. That
caller still holds every ``wrapper=True`` / ``hookwrapper=True`` implementation, so wrappers
and ``pm.add_hookcall_monitoring`` see each plugin's call with its result, while one
plugin's error or time-out is caught around its own call only (pluggy stops a single
``pm.hook.NAME(...)`` call at the first error and drops None results, which would leave the
other plugins uncalled and the results unattributable). It also lets each plugin get its
own ``context``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy
import structlog
import trio

from trainguard.errors import PluginError
from trainguard.layer import PluginContext, declared_options
from trainguard.names import BUILTIN_MODULES
from trainguard.plugins import hookspecs

if TYPE_CHECKING:
    from trainguard.config import Settings
    from trainguard.layer import Layer
    from trainguard.metrics import Metrics

log = structlog.get_logger("trainguard.plugins")

ENTRY_POINT_GROUP = "trainguard"

#: The context of the plugin whose hook is being called (``trainguard.api.current_context``).
_current: ContextVar[PluginContext | None] = ContextVar("trainguard_plugin", default=None)


def current_context() -> PluginContext | None:
    """The ``PluginContext`` of the plugin whose hook is running now; None outside a hook
    call (a hook called directly, as a test does)."""
    return _current.get()


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, plus one :class:`PluginContext` per registered plugin."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self._contexts: dict[str, PluginContext] = {}

    def context(self, plugin_name: str) -> PluginContext:
        """The context of a plugin (created on first use, kept for the manager's life)."""
        found = self._contexts.get(plugin_name)
        if found is None:
            found = self._contexts[plugin_name] = PluginContext(plugin_name)
        return found

    def configure(self, settings: Settings) -> None:
        """Hand every plugin's context the running settings (at start, on each reload)."""
        for name, _ in self.list_name_plugin():
            self.context(name).settings = settings

    def callers(self, name: str) -> Iterator[tuple[str, pluggy.HookCaller]]:
        """For each plugin implementing hook ``name`` (wrappers aside), in pluggy's call
        order: its name and a caller of its implementation inside every wrapper."""
        impls = [
            i for i in getattr(self.hook, name).get_hookimpls() if not (i.wrapper or i.hookwrapper)
        ]
        for impl in reversed(impls):  # pluggy calls the end of its list first
            others = [i.plugin for i in impls if i is not impl]
            yield impl.plugin_name, self.subset_hook_caller(name, remove_plugins=others)

    @contextmanager
    def calling(self, plugin_name: str) -> Iterator[PluginContext]:
        """The plugin's context, current for the duration of a call of its hook."""
        context = self.context(plugin_name)
        token = _current.set(context)
        try:
            yield context
        finally:
            _current.reset(token)


@dataclass(frozen=True)
class LayerEntry:
    layer: Layer
    plugin: str
    source: str  # "built-in" or the distribution that provides it


def build_manager(*, entry_points: bool = True, extra: Iterable[object] = ()) -> PluginManager:
    """A manager with the built-in layers, then entry-point plugins, then ``extra`` ones."""
    pm = PluginManager()
    for module in BUILTIN_MODULES:
        pm.register(importlib.import_module(module), name=f"builtin:{module}")
    if entry_points:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as exc:  # boundary: a third-party plugin's import
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


def collect_layers(pm: PluginManager, settings: Settings) -> list[LayerEntry]:
    """Every layer every plugin offers, with where it came from; names must be unique.

    Listed in registration order (pluggy calls the latest registered first). Each plugin's
    context learns the settings and its layers' option declarations.
    """
    pm.configure(settings)
    offers: list[tuple[str, list[Any]]] = []
    for plugin_name, caller in pm.callers("trainguard_layers"):
        with pm.calling(plugin_name) as context:
            offered = [
                layer
                for result in caller(settings=settings, context=context)
                for layer in result or ()
            ]
        offers.append((plugin_name, offered))
    entries: list[LayerEntry] = []
    seen: dict[str, str] = {}
    for plugin_name, offered in reversed(offers):
        plugin = pm.get_plugin(plugin_name)
        context = pm.context(plugin_name)
        for layer in offered:
            name = getattr(layer, "name", None)
            if not isinstance(name, str) or not callable(getattr(layer, "run", None)):
                raise PluginError(f"plugin {plugin_name} offers a layer without name/run")
            if name in seen:
                raise PluginError(
                    f"layer {name!r} is offered by both {seen[name]} and {plugin_name}"
                )
            seen[name] = plugin_name
            context.layers[name] = declared_options(layer)
            entries.append(LayerEntry(layer, plugin_name, _source(pm, plugin, plugin_name)))
    return entries


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, trio.TooSlowError):
        return f"no answer within {timeout:g} s"
    return f"{type(exc).__name__}: {exc}"


class HookRunner:
    """Calls a training hook on every plugin implementing it, each isolated from the others.

    Plugins run in pluggy's call order (``tryfirst`` first, then the latest registered),
    each through pluggy with the wrappers around it, and get ``timeout`` seconds, awaiting
    included.
    """

    def __init__(
        self,
        pm: PluginManager,
        metrics: Metrics | None = None,
        timeout: float = hookspecs.HOOK_TIMEOUT_SECONDS,
    ):
        self.pm = pm
        self.metrics = metrics
        self.timeout = timeout
        if metrics is not None:  # every hook's error counter exported at 0 from the start
            for name in hookspecs.TRAINING_HOOKS:
                metrics.add_hook(name)

    async def __call__(self, name: str, **kwargs: Any) -> None:
        for plugin_name, caller in self.pm.callers(name):
            try:
                with trio.fail_after(self.timeout), self.pm.calling(plugin_name) as context:
                    for value in caller(**kwargs, context=context):
                        if inspect.isawaitable(value):
                            await value
            except Exception as exc:  # boundary: a plugin's hook never breaks a transition
                if self.metrics is not None:
                    self.metrics.hook_error(name)
                log.error(
                    "plugin hook failed",
                    hook=name,
                    plugin=plugin_name,
                    error=_describe(exc, self.timeout),
                )


def _entries(results: list[Any]) -> list[dict[str, Any]]:
    """The outbox entries one plugin answered, checked (``TypeError`` on garbage)."""
    entries: list[dict[str, Any]] = []
    for offered in results:
        if inspect.isawaitable(offered):
            if inspect.iscoroutine(offered):
                offered.close()  # never awaited: do not warn about it
            raise TypeError("trainguard_outbox must be synchronous, it returned an awaitable")
        for entry in offered:
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("consumer"), str)
                or not isinstance(entry.get("payload"), dict)
            ):
                raise TypeError(f"outbox entry needs a consumer and a payload object: {entry!r}")
            entries.append(entry)
    return entries


def outbox_collector(pm: PluginManager, metrics: Any = None) -> Callable[..., list[dict[str, Any]]]:
    """The ``trainguard_outbox`` hook as reconcile calls it, on the database thread.

    Each plugin is isolated: one that raises or answers garbage is logged and counted, and
    the transition and the other plugins' entries go ahead.
    """

    def collect(training: Any, event: str, layer: str) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        for plugin_name, caller in pm.callers("trainguard_outbox"):
            try:
                with pm.calling(plugin_name) as context:
                    results = caller(training=training, event=event, layer=layer, context=context)
                entries.extend(_entries(results))
            except Exception as exc:  # boundary: a plugin's hook never undoes a transition
                if metrics is not None:
                    metrics.hook_error("trainguard_outbox")
                log.error(
                    "plugin outbox hook failed",
                    plugin=plugin_name,
                    error=f"{type(exc).__name__}: {exc}",
                )
        return entries

    return collect
