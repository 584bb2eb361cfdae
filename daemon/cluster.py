"""Several trainguard instances on one database: who is running, and who leads what.

Every instance registers a row in ``instances`` at start and moves its heartbeat every
``[cluster] heartbeat_seconds``; a clean stop deletes the row. An instance is *live* while its
heartbeat is at most ``LIVE_HEARTBEATS`` x ``heartbeat_seconds`` old (a missed beat or two is
no death; 15 s with the defaults, the same as ``lease_seconds``).

A leader role (River's ``river_leader``) is a row of ``leases``: taken or renewed in one
statement (``store.cluster.try_lead``) for ``lease_seconds``, renewed every third of that,
deleted on a clean stop so that another instance takes over at its next try (a third of a
lease at most). An instance that dies holds its roles until the lease expires; the others,
told by each failed try when it expires, try again just after that and one takes them.

``is_leader(role)`` is known locally and errs on the safe side: it holds only until
``LEASE_TRUST`` of a lease after the moment the last successful renew was *sent* (trio's
monotonic clock), so a renew that fails, or is late, ends the belief before the lease in the
database can have expired and been taken by another instance. The times in the database are
the database's own clock (``Dialect.now_sql``): two hosts whose clocks differ never disagree
about whether a lease has expired.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import structlog
import trio

from trainguard import __version__, identity, logs
from trainguard.config import Settings
from trainguard.store import InstanceRow, Store

log = structlog.get_logger("trainguard.cluster")

#: The leader role that runs the completeness and emergency passes.
SWEEPS = "sweeps"
#: Every leader role an instance tries to take.
ROLES = (SWEEPS,)
#: An instance is live while its heartbeat is younger than this many heartbeat intervals.
LIVE_HEARTBEATS = 3
#: A lease is renewed this many times per lease (a renew or two may fail without a gap).
RENEWS_PER_LEASE = 3
#: How much of a lease, from the moment its renew was sent, this instance trusts it.
LEASE_TRUST = 0.8
#: How long after another's lease expires this instance tries to take it.
TAKEOVER_SLACK = 0.05
#: How long a clean stop may take to hand the roles back and delete the instance's row.
LEAVE_SECONDS = 5.0
#: The sweeps leader deletes the rows of instances silent for this long (gone without a
#: clean stop). Until then a silent instance's claims are taken over at once (its heartbeat
#: stopped); after it, they have all expired (claims are never renewed, only retaken).
PRUNE_AFTER_SECONDS = 3600.0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def instance_as_dict(row: InstanceRow) -> dict[str, Any]:
    """An instance as ``trainguard instances --json`` and ``GET /v1/instances`` show it."""
    data = asdict(row)
    data["started_at"] = _iso(row.started_at)
    data["heartbeat_at"] = _iso(row.heartbeat_at)
    data["roles"] = list(row.roles)
    return data


def live_window(settings: Settings) -> float:
    """How old an instance's heartbeat may be while it counts as live (see the module doc)."""
    return LIVE_HEARTBEATS * float(settings.cluster["heartbeat_seconds"])


async def live_instances(store: Store, settings: Settings) -> list[InstanceRow]:
    """The live instances on ``store``'s database (see the module doc), with their roles."""
    return await store.cluster.live(live_window(settings))


class Cluster:
    """This instance among the others on one database: its row, its heartbeat, its leases."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        metrics: Any = None,
        roles: tuple[str, ...] = ROLES,
        instance_id: str | None = None,
    ) -> None:
        self.store = store
        #: The running config (a reload replaces it: heartbeat and lease times apply anew).
        self.settings = settings
        self.metrics = metrics
        self.roles = roles
        #: The process's one id (``identity.instance_id``): also the owner of its claims.
        self.id = instance_id or identity.instance_id(settings)
        self.host = socket.gethostname()
        #: Where this instance listens (the metrics listener's bound address once known).
        self.webhook_listen: str | None = settings.webhook["listen"]
        self.metrics_listen: str | None = settings.metrics["listen"]
        self._trusted_until: dict[str, float] = {}
        self._leading: set[str] = set()
        #: Per role held by another: in how many seconds its lease expires (its last try).
        self._free_in: dict[str, float] = {}
        #: Per role: who waits in ``taken`` for this instance to become its leader.
        self._waiting: dict[str, list[trio.Event]] = {}
        if metrics is not None:
            for role in roles:
                metrics.set_leader(role, False)

    @property
    def lease_seconds(self) -> float:
        return float(self.settings.cluster["lease_seconds"])

    # -- the instance's row --------------------------------------------------------------
    def _row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "host": self.host,
            "pid": os.getpid(),
            "version": __version__,
            "webhook_listen": self.webhook_listen,
            "metrics_listen": self.metrics_listen,
        }

    async def register(self) -> None:
        """Insert this instance's row (or start it anew under a configured id)."""
        await self.store.cluster.beat(self._row(), start=True)
        log.info("instance registered", instance=self.id, host=self.host, pid=os.getpid())

    async def heartbeat(self) -> None:
        """Move this instance's heartbeat (inserting its row again if it is gone)."""
        await self.store.cluster.beat(self._row(), start=False)

    async def instances(self) -> list[InstanceRow]:
        """The live instances, with the roles each holds."""
        return await live_instances(self.store, self.settings)

    # -- leader leases -------------------------------------------------------------------
    def is_leader(self, role: str) -> bool:
        """Whether this instance holds ``role`` now, surely (see the module doc)."""
        return trio.current_time() < self._trusted_until.get(role, -math.inf)

    async def taken(self, role: str) -> None:
        """Return once this instance becomes the leader of ``role`` (a lease it did not hold
        before is taken), so a layer that waits for the role runs the moment it has it."""
        event = trio.Event()
        waiting = self._waiting.setdefault(role, [])
        waiting.append(event)
        try:
            await event.wait()
        finally:
            if event in waiting:
                waiting.remove(event)

    async def try_lead(self, role: str) -> bool:
        """Take or renew the lease of ``role``; whether this instance holds it now. A
        database error means no: the lease may not have been renewed."""
        lease = self.lease_seconds
        sent = trio.current_time()
        try:
            holder, left = await self.store.cluster.try_lead(role, self.id, lease)
        except Exception as exc:  # boundary: a lost database ends the lead, never the daemon
            self._trusted_until.pop(role, None)
            log.warning(
                f"{logs.WARN} leader lease not taken or renewed",
                role=role,
                error=f"{type(exc).__name__}: {exc}",
            )
            return False
        if holder != self.id:
            self._trusted_until.pop(role, None)
            self._free_in[role] = left
            return False
        self._trusted_until[role] = sent + LEASE_TRUST * lease
        return True

    def _note(self, role: str) -> None:
        """Log and export a change of this instance's leadership of ``role``."""
        leads = self.is_leader(role)
        if leads == (role in self._leading):
            return
        if leads:
            self._leading.add(role)
            log.info("this instance is now the leader", role=role, instance=self.id)
            for event in self._waiting.pop(role, []):
                event.set()
        else:
            self._leading.discard(role)
            log.info("this instance is no longer the leader", role=role, instance=self.id)
        if self.metrics is not None:
            self.metrics.set_leader(role, leads)

    async def resign(self) -> None:
        """Give up every role and delete this instance's row (a clean stop)."""
        self._trusted_until.clear()
        for role in list(self._leading):
            self._note(role)
        await self.store.cluster.leave(self.id)
        log.info("instance left the cluster", instance=self.id)

    async def prune(self) -> int:
        """Delete the rows of instances gone for ``PRUNE_AFTER_SECONDS``; how many."""
        pruned = await self.store.cluster.prune(
            max(PRUNE_AFTER_SECONDS, live_window(self.settings))
        )
        if pruned:
            log.info("rows of instances gone without a clean stop deleted", instances=pruned)
        return pruned

    # -- the loops -----------------------------------------------------------------------
    async def _heartbeats(self) -> None:
        while True:
            await trio.sleep(float(self.settings.cluster["heartbeat_seconds"]))
            try:
                await self.heartbeat()
                if self.metrics is not None:
                    self.metrics.set_instances(len(await self.instances()))
                if self.is_leader(SWEEPS):
                    await self.prune()
            except Exception as exc:  # boundary: a lost database skips a beat, never stops us
                log.warning(f"{logs.WARN} heartbeat failed", error=f"{type(exc).__name__}: {exc}")

    async def _lead(self, role: str, *, task_status: trio.TaskStatus[None]) -> None:
        """Forever: try to take or renew ``role`` every third of a lease, and, while another
        holds it, again just after its lease expires (a dead leader is replaced at once).
        Started once the first try is answered (a lone instance leads before its layers
        start)."""
        started = False
        while True:
            period = self.lease_seconds / RENEWS_PER_LEASE
            began = trio.current_time()
            with trio.move_on_after(period):  # a renew that hangs is a failed one
                await self.try_lead(role)
            self._note(role)
            if not started:
                started = True
                task_status.started()
            next_try = began + period
            free_in = self._free_in.pop(role, None)
            if free_in is not None:
                next_try = min(next_try, trio.current_time() + max(free_in, 0.0) + TAKEOVER_SLACK)
            await trio.sleep_until(next_try)

    async def loops(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The heartbeat and the lease loops, until cancelled; started once every role has
        had its first try. Cancelled alone, they leave the row and leases to expire (what a
        dead instance leaves); ``run`` resigns on the way out."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeats)
            for role in self.roles:
                await nursery.start(self._lead, role)
            if self.metrics is not None:
                self.metrics.set_instances(len(await self.instances()))
            task_status.started()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Register, run the loops until cancelled, then resign (bounded by LEAVE_SECONDS)."""
        await self.register()
        try:
            await self.loops(task_status=task_status)
        finally:
            with trio.move_on_after(LEAVE_SECONDS, shield=True):
                try:
                    await self.resign()
                except Exception as exc:  # boundary: a stop goes on; the leases expire instead
                    log.warning(
                        f"{logs.WARN} could not resign; the leases expire instead",
                        error=f"{type(exc).__name__}: {exc}",
                    )
