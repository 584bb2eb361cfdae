"""What a guard layer or a plugin is, what it is handed, and the patterns most layers share.

A layer is any object with a ``name`` and ``async def run(ctx, *, task_status)`` (the
:class:`Layer` protocol). It calls ``task_status.started()`` once it is really working (so
"ready" means ready), beats its heartbeat while alive, and never writes a training itself: it
hands what it observed to ``ctx.reconciler``. Optional attributes:

* ``order``: start order, lower first (default 50);
* ``options``: a mapping of option name to :class:`trainguard.config.Option`, the keys its
  ``[layers.NAME]`` table may hold. trainguard validates the table against it at start
  (before any layer starts) and on reload (SIGHUP refuses a bad table and keeps the running
  config), with the same one-line errors as core config, and hands the layer the validated
  options, defaults filled in, as ``ctx.options``. A layer without ``options`` gets its raw
  table;
* ``heartbeat_timeout(options) -> float``: how stale its heartbeat may get before the systemd
  watchdog stops being fed (300 s when absent); it gets the validated options.

A plugin's hooks get a :class:`PluginContext` (``context``): the settings, the validated
options of its layers, and its own :class:`Stash`, where it keeps what its hooks share (no
module globals: two daemons in one process, or two tests, never see each other's state).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast, runtime_checkable

import structlog
import trio

from trainguard import fal, identity
from trainguard.clock import Clock
from trainguard.cluster import Cluster, live_window
from trainguard.config import Option, Settings, validate_options
from trainguard.errors import StoreClosed
from trainguard.reconcile import Change, Reconciler
from trainguard.store import Claimed, ClaimKind, DueKind, Store, TrainingView

#: How long a layer with nothing due sleeps before looking at the database again, so that a
#: training registered by another process (the CLI) is noticed.
IDLE_RECHECK_SECONDS = 1.0
GATHER_SECONDS = 0.5
#: How long giving claims back may hold up a layer that is being stopped (then they expire).
RELEASE_SECONDS = 2.0
#: A pass of ``run_due`` claims what its ``concurrency`` slots handle in this many rounds, so
#: that its last claims do not wait long in line for a slot (they last ``claim_seconds``).
CLAIM_ROUNDS = 4

T = TypeVar("T")
D = TypeVar("D")


@runtime_checkable
class Layer(Protocol):
    """A guard layer (see the module doc for its optional ``order``, ``options`` and
    ``heartbeat_timeout``)."""

    name: str

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None: ...


def declared_options(layer: object) -> Mapping[str, Option] | None:
    """The options ``layer`` declares, or None when it declares none (it gets its raw table)."""
    declared = getattr(layer, "options", None)
    return declared if isinstance(declared, Mapping) else None


def layer_options(
    layer: str, declared: Mapping[str, Option] | None, settings: Settings
) -> Mapping[str, Any]:
    """The options of ``layer`` in ``settings``: validated against ``declared`` (``ConfigError``
    when they do not fit), else the raw table."""
    raw = settings.layer(layer).options
    return raw if declared is None else validate_options(layer, declared, raw)


class StashKey(Generic[T]):
    """A key of a :class:`Stash`; the value's type is the key's type parameter (pytest's
    ``StashKey``). Create one per thing kept, at module level: ``STATE = StashKey[State]()``."""

    __slots__ = ()


class Stash:
    """Where a plugin keeps what its hooks share, one per plugin per daemon (pytest's
    ``Stash``): ``context.stash[KEY] = value``, ``context.stash.get(KEY, default)``."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: dict[StashKey[Any], Any] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._items[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._items[key])

    def get(self, key: StashKey[T], default: D) -> T | D:
        return cast(T, self._items[key]) if key in self._items else default

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return cast(T, self._items.setdefault(key, default))

    def __delitem__(self, key: StashKey[T]) -> None:
        del self._items[key]

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class PluginContext:
    """What every hook of one plugin is handed as ``context``: one per plugin, for the life of
    its plugin manager (the daemon's)."""

    plugin: str
    """The plugin's name (a built-in module's ``builtin:...``, or its entry point's name)."""
    settings: Settings | None = None
    """The running configuration; a reload (SIGHUP) replaces it. None before the daemon has
    collected the layers (the first hook a plugin hears is ``trainguard_layers``)."""
    layers: dict[str, Mapping[str, Option] | None] = field(default_factory=dict)
    """The layers this plugin offers, with the options each declares."""
    stash: Stash = field(default_factory=Stash)

    @property
    def options(self) -> Mapping[str, Mapping[str, Any]]:
        """The validated options of each layer this plugin offers, by layer name."""
        if self.settings is None:
            return {}
        settings = self.settings
        return {name: layer_options(name, d, settings) for name, d in self.layers.items()}


@dataclass
class LayerContext:
    """Everything a layer may use. One per layer; the heartbeat is the layer's own."""

    name: str
    settings: Settings
    store: Store
    reconciler: Reconciler
    fal: fal.FalClient
    metrics: Any
    clock: Clock
    log: Any = None
    last_beat: float = field(default_factory=lambda: -math.inf)
    #: How long a layer with nothing due waits before looking again (for trainings that
    #: another process, such as the CLI, registers; this process's own wake it at once).
    idle_seconds: float = IDLE_RECHECK_SECONDS
    #: A due-time sweep waits at least this long between passes, so that trainings falling
    #: due close together are handled in one pass; a check is at most this much late.
    gather_seconds: float = GATHER_SECONDS
    #: systemd's notify socket (a ``daemon.sdnotify.Notifier``), when the daemon has one.
    notifier: Any = None
    #: The options the layer declares (``Layer.options``); None: it gets its raw table.
    declared: Mapping[str, Option] | None = None
    #: This instance's id, the owner of its claims (the supervisor sets the one of the
    #: process; empty: ``identity.instance_id`` of the settings).
    instance_id: str = ""
    #: This instance among the others on the database (leader roles); None outside a daemon
    #: (a test or a tool driving a layer alone), which then leads every role.
    cluster: Cluster | None = None

    def __post_init__(self) -> None:
        if not self.instance_id:
            self.instance_id = identity.instance_id(self.settings)
        if self.log is None:
            self.log = structlog.get_logger(f"trainguard.layers.{self.name}").bind(layer=self.name)

    @property
    def options(self) -> Mapping[str, Any]:
        """The layer's ``[layers.NAME]`` options of the running config: validated against
        what it declares, defaults filled in (the daemon refused a bad table before)."""
        return layer_options(self.name, self.declared, self.settings)

    def heartbeat(self) -> None:
        self.last_beat = trio.current_time()

    @property
    def claim_seconds(self) -> float:
        """How long a claim of this instance holds a row before others may take it over."""
        return float(self.settings.cluster["claim_seconds"])

    async def gone_owners(self, kind: ClaimKind) -> list[str]:
        """The owners of claims in the table of ``kind`` known to be gone: processes of
        this host no longer running (``identity.gone``) and instances whose heartbeat stopped
        (``live_window``). Their claims are taken over at once, not at expiry; an
        owner with no instance row is never called gone on that account."""
        owners = await self.store.claim_owners(kind)
        if not owners:
            return []
        silent = set(await self.store.cluster.silent(live_window(self.settings)))
        return [o for o in owners if o in silent or identity.gone(o)]

    def claimed(self, kind: ClaimKind, claim: Claimed[Any]) -> None:
        """Count (``trainguard_rescued_total{kind}``) and log the rows ``claim`` took over
        from another owner."""
        if not claim.rescued:
            return
        if self.metrics is not None:
            self.metrics.rescued_claims(kind, len(claim.rescued))
        self.log.warning(
            "claims taken over from an instance that stopped holding them",
            kind=kind,
            rows=len(claim.rescued),
            owners=sorted(set(claim.rescued.values())),
        )

    async def release(self, kind: ClaimKind, ids: Sequence[int]) -> None:
        """Give up this instance's claims of ``ids``, also while the layer is being stopped
        (shielded, at most ``RELEASE_SECONDS``; what is not given back expires)."""
        shielded = trio.CancelScope(shield=True)
        # StoreClosed: the store closed first; the claims expire.
        with shielded, trio.move_on_after(RELEASE_SECONDS), suppress(StoreClosed):
            await self.store.release(kind, ids, self.instance_id)

    def leads(self, role: str) -> bool:
        """Whether this instance holds leader ``role`` now (always, without a cluster)."""
        return self.cluster is None or self.cluster.is_leader(role)

    async def wait_to_lead(self, role: str, seconds: float) -> None:
        """Wait until this instance becomes the leader of ``role``, ``seconds`` at most
        (a layer that only the leader runs starts the moment its instance takes over)."""
        if self.leads(role):
            return
        assert self.cluster is not None  # leads() is always True without one
        with trio.move_on_after(seconds):
            await self.cluster.taken(role)

    def passed(self) -> None:
        """One pass of the layer's work finished: count it and beat."""
        self.heartbeat()
        if self.metrics is not None:
            self.metrics.layer_pass(self.name)
            self.metrics.layer_success(self.name, self.clock.now())

    def progress(self, text: str, *, extend_start_seconds: float = 0.0) -> None:
        """Show ``text`` as the service's status; before READY, ``extend_start_seconds``
        asks systemd for that much more start time (a long startup sweep that is moving)."""
        if self.notifier is None:
            return
        fields: dict[str, str | int] = {"STATUS": text}
        if extend_start_seconds > 0:
            fields["EXTEND_TIMEOUT_USEC"] = int(extend_start_seconds * 1_000_000)
        self.notifier.notify(**fields)

    def failed(self, exc: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.layer_error(self.name)
        self.log.error("layer pass failed", error=f"{type(exc).__name__}: {exc}")

    def urls(self, training: TrainingView) -> tuple[str, str, str]:
        """The status, response and cancel URLs of a training (those submit returned, else
        built from the endpoint's owner/app)."""
        built = fal.queue_urls(
            self.settings.fal["queue_url"], training.endpoint, training.request_id
        )
        return (
            training.status_url or built[0],
            training.response_url or built[1],
            training.cancel_url or built[2],
        )


async def check_training(ctx: LayerContext, training: TrainingView, layer: str) -> Change:
    """Ask FAL about one training and hand every answer to reconcile.

    Unfinished: the status (with logs, for progress), then the result when FAL says it is
    COMPLETED. Finished: the result directly (to verify, fill in or upgrade a fallback).
    """
    status_url, response_url, _ = ctx.urls(training)
    if not training.finished:
        answer = await ctx.fal.status(status_url, logs=True)
        change = await ctx.reconciler.observe_answer(answer, training.request_id, layer)
        if answer.kind != fal.Kind.COMPLETED:
            return change
    answer = await ctx.fal.result(response_url)
    return await ctx.reconciler.observe_answer(answer, training.request_id, layer)


async def run_due(
    ctx: LayerContext,
    kind: DueKind,
    handle: Callable[[TrainingView], Awaitable[Any]],
    *,
    concurrency: int = 8,
    batch: int = 500,
    role: str | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Forever: claim every training whose ``kind`` time has come and nobody holds
    (``Store.claim_due``), handle it, give the claims back, then sleep until the next one is
    due. The schedule lives in the database; reconcile moves it. Claims make each check once
    at a time across instances; reconcile's idempotent, monotonic rules make a late answer
    of an owner whose claim was taken over change nothing. A pass takes ``batch`` trainings
    at most, and no more than ``CLAIM_ROUNDS`` rounds of ``concurrency``. ``role``: a pass
    runs only while this instance is that role's leader; otherwise the layer waits for it,
    beating its heartbeat."""
    limit = min(batch, concurrency * CLAIM_ROUNDS)
    limiter = trio.CapacityLimiter(concurrency)

    errors = 0

    async def one(training: TrainingView) -> None:
        nonlocal errors
        async with limiter:
            try:
                await handle(training)
            except Exception as exc:  # one training's trouble must not stop the others
                errors += 1
                ctx.failed(exc)
            ctx.heartbeat()

    task_status.started()
    gone = await ctx.gone_owners("trainings")
    while True:
        if role is not None and not ctx.leads(role):
            ctx.heartbeat()
            await ctx.wait_to_lead(role, ctx.idle_seconds)
            continue
        now = ctx.clock.now()
        claim = await ctx.store.claim_due(
            kind, now, limit, ctx.instance_id, ctx.claim_seconds, gone
        )
        ctx.claimed("trainings", claim)
        if due := claim.items:
            errors = 0
            try:
                async with trio.open_nursery() as nursery:
                    for training in due:
                        nursery.start_soon(one, training)
            finally:
                await ctx.release("trainings", [training.id for training in due])
            if errors:  # what failed is still due: do not spin on it
                await trio.sleep(ctx.idle_seconds)
            else:
                ctx.passed()
            continue
        ctx.heartbeat()
        nxt = await ctx.store.next_due(kind)
        if nxt is None:
            wait = ctx.idle_seconds
        else:  # gather what falls due within a short window into one pass (shared queries
            # and commits: 10,000 trainings on a 60 s interval cost half the CPU this way)
            wait = min(ctx.idle_seconds, max(nxt - now, ctx.gather_seconds))
        if wait > 0:
            with trio.move_on_after(wait):
                await ctx.reconciler.changed.wait()
