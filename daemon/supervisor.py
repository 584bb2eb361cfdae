"""The daemon: one trio nursery that runs every enabled layer and keeps it running.

Start order: the store and its writer, the metrics listener (``/readyz`` answers 503 until
ready), this instance's row and its first try for each leader role (``cluster.Cluster``,
handed to every layer as ``ctx.cluster``), then each layer by ``order`` with
``nursery.start``, so "started" means working: the webhook listener is bound before the
startup sweep runs, and the startup sweep has finished before READY=1 is sent. A layer that
fails before it has started stops the daemon with a clear error (a port in use, say); one
that crashes later is logged, counted and restarted alone, with exponential backoff (reset
only once the layer has stayed up a while, so a layer that crashes right after each start
backs off too). SIGTERM/SIGINT, from the very start of ``run``, send STOPPING=1 and cancel
everything: a database batch already handed to the database thread is committed whole,
nothing is half-written; the instance hands its leader roles over and deletes its row.
The systemd watchdog is fed only while every running layer's heartbeat is fresh and the
database has not been lost for longer than two leases (``DATABASE_LOST_LEASES``); ``/readyz``
answers 503 at once while it is lost (``Store.stalled``).
"""

from __future__ import annotations

import random
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import httpx
import structlog
import trio

from trainguard import config, http, logs
from trainguard.admin import AdminApi, check_listen_allowed
from trainguard.clock import Clock
from trainguard.cluster import Cluster
from trainguard.config import ConfigError, Settings
from trainguard.errors import LayerStartError, StartError
from trainguard.fal import FalClient, RateLimiter
from trainguard.identity import instance_id
from trainguard.layer import Layer, LayerContext, declared_options, layer_options
from trainguard.metrics import Metrics
from trainguard.plugins.manager import (
    HookRunner,
    LayerEntry,
    PluginManager,
    build_manager,
    collect_layers,
    outbox_collector,
)
from trainguard.reconcile import Reconciler
from trainguard.sdnotify import Notifier
from trainguard.store import Store, open_store

log = structlog.get_logger("trainguard.supervisor")

RESTART_BACKOFF_FIRST = 1.0
RESTART_BACKOFF_CAP = 60.0
#: A layer that stayed up this long before crashing is restarted with the first delay again.
RESTART_STABLE_SECONDS = 60.0
GAUGE_INTERVAL_SECONDS = 5.0
RELOAD_STOP_SECONDS = 10.0  # how long a reload waits for a layer it turned off to stop
DEFAULT_HEARTBEAT_TIMEOUT = 300.0  # a sweep beats after every training it handles
#: The watchdog is not fed once the database has been lost for this many leases (see
#: ``Daemon.database_lost_too_long``), so systemd restarts an instance cut off for good.
DATABASE_LOST_LEASES = 2


@dataclass
class RunningLayer:
    entry: LayerEntry
    ctx: LayerContext
    heartbeat_timeout: float
    running: bool = False
    scope: trio.CancelScope | None = None  # cancels this layer alone (a reload turning it off)
    supervised: bool = False  # its supervisor task is alive (running, or waiting to restart)
    stopped: trio.Event = field(default_factory=trio.Event)  # set when the supervisor ends


class Daemon:
    """One trainguard process. ``await nursery.start(daemon.run)`` returns once READY."""

    def __init__(
        self,
        settings: Settings,
        *,
        pm: PluginManager | None = None,
        clock: Clock | None = None,
        notifier: Notifier | None = None,
        fal_transport: httpx.AsyncBaseTransport | None = None,
        handle_signals: bool = False,
        config_path: str | None = None,
    ) -> None:
        check_listen_allowed(settings.metrics["listen"], settings.admin_token)
        self.settings = settings
        self.config_path = config_path
        self.pm = pm or build_manager()
        self.clock = clock or Clock()
        self.notifier = notifier or Notifier()
        self.fal_transport = fal_transport
        self.handle_signals = handle_signals
        self.metrics = Metrics()
        self.instance_id = instance_id(settings)  # the owner of this process's claims
        self.layers: dict[str, RunningLayer] = {}
        self.ready = False
        self.db_ok = False
        self.ops_address: tuple[str, int] | None = None
        self.store: Store | None = None
        self.reconciler: Reconciler | None = None
        self.fal: FalClient | None = None
        self.cluster: Cluster | None = None
        self._nursery: trio.Nursery | None = None
        self._all_entries = collect_layers(self.pm, self.settings)
        for entry in self._all_entries:
            self.metrics.add_layer(entry.layer.name)
        self._entries = self._select_layers(self.settings)

    def _select_layers(self, settings: Settings) -> list[LayerEntry]:
        offered = {e.layer.name for e in self._all_entries}
        unknown = sorted(set(settings.layers) - offered)
        if unknown:
            raise ConfigError(
                f"layers.{unknown[0]}: no installed plugin offers a layer of that name "
                f"(installed: {', '.join(sorted(offered))})"
            )
        chosen = [e for e in self._all_entries if settings.layer(e.layer.name).enabled]
        return sorted(chosen, key=lambda e: getattr(e.layer, "order", 50))

    # -- the main task -------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled (or, with ``handle_signals``, until SIGTERM/SIGINT).

        Raises ``StartError`` (``LayerStartError`` for a layer) itself, not wrapped in an
        exception group, when the daemon cannot start.
        """
        try:
            if not self.handle_signals:
                await self._run(task_status)
                return
            # Opened before anything else, so that a signal during a long startup sweep is a
            # clean stop too (Python's default SIGTERM handling would kill us outright).
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._stop_on_signal, signals, nursery.cancel_scope)
                    await self._run(task_status)
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            leaf = _leaf(group)
            if isinstance(leaf, StartError):
                raise leaf from leaf.__cause__
            raise

    async def _run(self, task_status: trio.TaskStatus[Daemon]) -> None:
        s = self.settings
        self.notifier.status("starting")
        for entry in self._entries:  # before anything starts: a bad [layers.NAME] table
            name = entry.layer.name
            try:
                layer_options(name, declared_options(entry.layer), s)
            except ConfigError as exc:
                raise LayerStartError(f"layer {name} failed to start: {_describe(exc)}") from exc
        async with open_store(s.database["url"], on_commit=self.metrics.db_commit) as store:
            self.store = store
            self.db_ok = True
            async with FalClient(
                queue_url=s.fal["queue_url"],
                backup_queue_url=s.fal["backup_queue_url"],
                key=s.fal_key,
                rate_limiter=RateLimiter(s.fal["max_requests_per_second"]),
                timeout=s.fal["timeout_seconds"],
                retries=s.fal["retries"],
                observe=self.metrics.fal_request,
                transport=self.fal_transport,
            ) as fal_client:
                self.fal = fal_client
                self.reconciler = Reconciler(
                    store,
                    s,
                    clock=self.clock,
                    metrics=self.metrics,
                    hooks=HookRunner(self.pm, self.metrics),
                    outbox=outbox_collector(self.pm, self.metrics),
                )
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    app = http.ops_app(
                        self.metrics,
                        ready=self.is_ready,
                        healthy=self.is_healthy,
                        extra=AdminApi(self, s.admin_token),
                    )
                    try:
                        self.ops_address = await nursery.start(
                            partial(
                                http.serve_asgi,
                                app,
                                s.metrics["listen"],
                                max_connections=s.metrics["max_connections"],
                            )
                        )
                    except OSError as exc:
                        raise StartError(f"metrics listener failed to start: {exc}") from exc
                    nursery.start_soon(self._gauges)
                    self.cluster = Cluster(
                        store, s, metrics=self.metrics, instance_id=self.instance_id
                    )
                    host, port = self.ops_address
                    self.cluster.metrics_listen = (
                        f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                    )
                    # Registered, and its first try for each leader role answered, before
                    # any layer starts: a lone instance leads from its first pass.
                    await nursery.start(self.cluster.run)
                    for entry in self._entries:
                        await self._start_layer(nursery, entry)
                    self.ready = True
                    running = sum(r.running for r in self.layers.values())
                    summary = f"ready: {running} layers running"
                    self.notifier.ready(summary)
                    log.info(summary, layers=sorted(self.layers), metrics=self.ops_address)
                    nursery.start_soon(self._watchdog)
                    task_status.started(self)

    def is_ready(self) -> bool:
        stalled = self.store is not None and self.store.stalled()
        return self.ready and self.db_ok and not stalled

    def is_healthy(self) -> bool:
        return self.db_ok

    async def _start_layer(self, nursery: trio.Nursery, entry: LayerEntry) -> None:
        layer = entry.layer
        assert self.store is not None and self.reconciler is not None and self.fal is not None
        ctx = LayerContext(
            name=layer.name,
            settings=self.settings,
            store=self.store,
            reconciler=self.reconciler,
            fal=self.fal,
            metrics=self.metrics,
            clock=self.clock,
            notifier=self.notifier,
            declared=declared_options(layer),
            instance_id=self.instance_id,
            cluster=self.cluster,
        )
        timeout_fn = getattr(layer, "heartbeat_timeout", None)
        timeout = timeout_fn(ctx.options) if callable(timeout_fn) else DEFAULT_HEARTBEAT_TIMEOUT
        running = RunningLayer(entry, ctx, float(timeout))
        self.layers[layer.name] = running
        self.notifier.status(f"starting layer {layer.name}")
        try:
            await nursery.start(self._supervise, running)
        except Exception as exc:  # boundary: a layer's start, whatever its error
            raise LayerStartError(f"layer {layer.name} failed to start: {_describe(exc)}") from exc

    async def _supervise(
        self,
        running: RunningLayer,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run one layer; restart it alone, with backoff, whenever it crashes."""
        running.supervised = True
        try:
            with trio.CancelScope() as running.scope:
                await self._supervise_loop(running, task_status)
        finally:
            running.supervised = False
            running.stopped.set()

    async def _supervise_loop(
        self, running: RunningLayer, task_status: trio.TaskStatus[None]
    ) -> None:
        layer: Layer = running.entry.layer
        name = layer.name
        backoff = RESTART_BACKOFF_FIRST
        started = False
        while True:
            up_since: float | None = None  # when this run of the layer had started
            try:
                async with trio.open_nursery() as inner:
                    await inner.start(self._run_layer, running)
                    up_since = trio.current_time()
                    if not started:
                        started = True
                        task_status.started()
                log.info(f"{logs.tag_for(name)} layer finished its work", layer=name)
                return
            except Exception as exc:  # boundary: a layer's crash restarts that layer alone
                self.metrics.layer_error(name)
                if not started:
                    raise
                if (
                    up_since is not None
                    and trio.current_time() - up_since >= RESTART_STABLE_SECONDS
                ):
                    backoff = RESTART_BACKOFF_FIRST
                self.metrics.layer_restart(name)
                delay = backoff * random.uniform(0.5, 1.0)
                log.error(
                    f"{logs.WARN} layer crashed; restarting it",
                    layer=name,
                    error=_describe(exc),
                    restart_in=round(delay, 2),
                    exc_info=exc,
                )
                await trio.sleep(delay)
                backoff = min(backoff * 2, RESTART_BACKOFF_CAP)

    async def _run_layer(
        self,
        running: RunningLayer,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        name = running.entry.layer.name

        def mark_started() -> None:
            running.ctx.heartbeat()
            running.running = True
            self.metrics.set_layer_up(name, True)
            task_status.started()

        try:
            with logs.bound(layer=name):
                await running.entry.layer.run(running.ctx, task_status=_Started(mark_started))
        finally:  # returned, crashed or cancelled: not running any more
            running.running = False
            self.metrics.set_layer_up(name, False)

    # -- background chores ---------------------------------------------------------------
    async def _gauges(self) -> None:
        """Trainings by status, and whether the database still takes a durable write."""
        assert self.store is not None
        while True:
            try:
                self.metrics.set_trainings(await self.store.status_counts())
                self.db_ok = await self.store.writable()
            except Exception as exc:  # boundary: the readiness probe reports, never crashes
                self.db_ok = False
                log.error(f"{logs.WARN} database check failed", error=_describe(exc))
            await trio.sleep(GAUGE_INTERVAL_SECONDS)

    def stale_layers(self) -> list[str]:
        now = trio.current_time()
        return [
            name
            for name, r in self.layers.items()
            if r.running and now - r.ctx.last_beat > r.heartbeat_timeout
        ]

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            stale = self.stale_layers()
            lost = self.database_lost_too_long()
            if stale:
                log.error(f"{logs.WARN} watchdog not fed: stale layer heartbeat", layers=stale)
                self.notifier.status(f"stale layers: {', '.join(stale)}")
            elif lost is not None:
                log.error(f"{logs.WARN} watchdog not fed: database lost", seconds=round(lost, 1))
                self.notifier.status(f"database unreachable for {lost:.0f} s")
            else:
                self.notifier.watchdog()
            await trio.sleep(interval)

    def database_lost_too_long(self) -> float | None:
        """How long the connection to the database has been lost, once that is longer than
        ``DATABASE_LOST_LEASES`` x ``[cluster] lease_seconds`` (30 s by default: by then any
        lease this instance held is another's); None before that, and while connected."""
        lost = self.store.lost_for() if self.store is not None else 0.0
        bound = DATABASE_LOST_LEASES * float(self.settings.cluster["lease_seconds"])
        return lost if lost > bound else None

    async def _stop_on_signal(self, signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                await self.reload()
                continue
            log.info("stopping", signal=signal.Signals(signum).name)
            self.ready = False  # /readyz answers 503 while we drain
            self.notifier.stopping()
            scope.cancel()
            return

    # -- reload (SIGHUP) -----------------------------------------------------------------
    async def reload(self) -> bool:
        """Re-read the config file and apply it without a restart: timings, log level,
        fallback policy and templates, layer switches. An invalid file is refused with a log
        line and the running config is kept. What is bound at start (database, listeners,
        the FAL client, secrets) keeps its running value; a change there is logged as
        needing a restart."""
        self.notifier.reloading()
        try:
            new = config.load(self.config_path)
            self._select_layers(new)  # unknown layer names are refused here
            self._check_layer_options(new)  # every layer's declared options, as at start
        except ConfigError as exc:
            log.error(f"{logs.WARN} reload refused: the running config is kept", error=str(exc))
            self.notifier.ready("reload refused; running config kept")
            return False
        old = self.settings
        fixed = {
            "database": old.database,
            "fal": old.fal,
            "webhook": old.webhook,
            "metrics": old.metrics,
            "artifacts": old.artifacts,
            "delivery": old.delivery,
        }
        ignored = sorted(k for k, v in fixed.items() if getattr(new, k) != v)
        new = replace(
            new,
            **fixed,
            fal_key=old.fal_key,
            admin_token=old.admin_token,
            delivery_secret=old.delivery_secret,
        )
        self._apply(new)
        logs.configure(new.log["level"], secrets=new.secrets)
        await self._switch_layers()
        log.info(
            "config reloaded",
            source=new.source,
            needs_restart=ignored or None,
            layers=sorted(n for n, r in self.layers.items() if r.running),
        )
        self.notifier.ready("reloaded")
        return True

    def _check_layer_options(self, settings: Settings) -> None:
        """Check every enabled layer's ``[layers.NAME]`` table of ``settings`` against the
        options it declares; a ``ConfigError`` names the first bad key."""
        for entry in self._select_layers(settings):
            layer_options(entry.layer.name, declared_options(entry.layer), settings)

    def _apply(self, settings: Settings) -> None:
        self.settings = settings
        self.pm.configure(settings)
        if self.reconciler is not None:
            self.reconciler.settings = settings
        if self.cluster is not None:
            self.cluster.settings = settings
        for running in self.layers.values():
            running.ctx.settings = settings

    async def _switch_layers(self) -> None:
        """Stop the layers the config turned off, start the ones it turned on."""
        wanted = {e.layer.name for e in self._select_layers(self.settings)}
        for name, running in self.layers.items():
            if name not in wanted and running.supervised and running.scope is not None:
                log.info(f"{logs.tag_for(name)} layer turned off by reload", layer=name)
                running.scope.cancel()
                with trio.move_on_after(RELOAD_STOP_SECONDS):
                    await running.stopped.wait()
        for entry in self._select_layers(self.settings):
            current = self.layers.get(entry.layer.name)
            if current is not None and (current.supervised or entry.layer.name == "startup"):
                continue  # running already; the startup sweep runs only at start
            assert self._nursery is not None
            log.info(
                f"{logs.tag_for(entry.layer.name)} layer turned on by reload",
                layer=entry.layer.name,
            )
            try:
                await self._start_layer(self._nursery, entry)
            except LayerStartError as exc:
                log.error(f"{logs.WARN} layer could not be started by reload", error=str(exc))


class _Started:
    """The task_status handed to a layer: our bookkeeping, then the real ``started()``."""

    def __init__(self, on_started: Callable[[], None]) -> None:
        self._on_started = on_started

    def started(self, value: Any = None) -> None:
        self._on_started()


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups (else ``exc``)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    leaf = _leaf(exc)
    return f"{type(leaf).__name__}: {leaf}"
