"""Several ``trainguard run`` subprocesses on one database behind one balancer (issue 11).

The several-instance chaos test and ``trainguard demo --instances N`` need what an operator
runs: N instances, each with its own config file (its own webhook and metrics ports), the
same ``[database] url`` and the same ``[webhook] public_url``, the address of a round-robin
balancer (``testing/balancer.py``) in front of the instances' webhook listeners. Every
instance can be SIGKILLed and restarted by its index; the balancer keeps all of them as
backends and skips one that refuses the connection, as a load balancer with health checks
would after its first failed try.

The cluster times are short (``CLUSTER_TIMES``) so that a dead instance's leases and claims
are taken over within the few seconds a test can wait. Nothing here is imported by
``trainguard run``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from trainguard import actions, config
from trainguard.cluster import SWEEPS, live_instances
from trainguard.reconcile import Reconciler
from trainguard.store import Store, open_store
from trainguard.testing.balancer import Balancer, open_balancer
from trainguard.testing.demo import (
    DEMO_KEY,
    FAULTS_TOLD,
    DaemonProcess,
    Report,
    all_finished,
    compare_with_truth,
    demo_config,
    demo_simulator,
    free_port,
    submit_wave,
)
from trainguard.testing.simulator import Simulator

#: ``[cluster]`` for tests: a lease taken over ~2 s after its holder died, an instance seen
#: dead 1.5 s after its last heartbeat, a claim of a dead instance on another host free
#: after 5 s (on this host it is taken at once: ``identity.gone``).
CLUSTER_TIMES: Mapping[str, float] = {
    "heartbeat_seconds": 0.5,
    "lease_seconds": 2.0,
    "claim_seconds": 5.0,
}
#: The log event of ``LayerContext.claimed``: the rows one claim took over from another owner.
RESCUE_EVENT = "claims taken over from an instance that stopped holding them"


@dataclass
class Instance:
    """One instance: its daemon subprocess, its ports, how often it was SIGKILLed."""

    index: int
    daemon: DaemonProcess
    webhook_port: int
    metrics_port: int
    kills: int = 0

    @property
    def up(self) -> bool:
        process = self.daemon.process
        return process is not None and process.poll() is None


@dataclass
class InstanceCluster:
    """N instances on one database and the balancer in front of their webhook listeners."""

    instances: list[Instance]
    balancer: Balancer
    settings: config.Settings
    """Instance 0's settings: what a client (``trainguard submit``) of the cluster reads; its
    ``[webhook] public_url`` is the balancer's."""

    @property
    def kills(self) -> int:
        return sum(i.kills for i in self.instances)

    @property
    def starts(self) -> int:
        return sum(i.daemon.starts for i in self.instances)

    async def start(self, index: int) -> None:
        """Start instance ``index`` and return once it is READY (``/readyz`` 200)."""
        await self.instances[index].daemon.start()

    async def start_all(self) -> None:
        """All at once, as an operator's hosts come up: one migrates the schema, the others
        wait for it (``Dialect.lock_schema``); returns once every one is READY."""
        async with trio.open_nursery() as nursery:
            for instance in self.instances:
                nursery.start_soon(instance.daemon.start)

    async def kill(self, index: int) -> None:
        """SIGKILL instance ``index`` and wait until the process is gone."""
        instance = self.instances[index]
        assert instance.daemon.process is not None and instance.up
        instance.daemon.kill()
        await instance.daemon.process.wait()
        instance.kills += 1

    async def stop_all(self) -> list[int | None]:
        """SIGTERM every instance (concurrently) and return their exit statuses."""
        statuses: list[int | None] = [None] * len(self.instances)

        async def stop(i: int) -> None:
            statuses[i] = await self.instances[i].daemon.stop()

        async with trio.open_nursery() as nursery:
            for i in range(len(self.instances)):
                nursery.start_soon(stop, i)
        return statuses

    def index_of_pid(self, pid: int) -> int | None:
        for instance in self.instances:
            process = instance.daemon.process
            if instance.up and process is not None and process.pid == pid:
                return instance.index
        return None

    async def leader(self, store: Store) -> int | None:
        """The index of the running instance that holds the ``sweeps`` lease (None: none
        does, or only a dead one whose lease has not expired yet)."""
        for row in await live_instances(store, self.settings):
            if SWEEPS in row.roles:
                return self.index_of_pid(row.pid)
        return None

    async def wait_for_leader(
        self, store: Store, *, other_than: int | None = None, timeout: float = 15.0
    ) -> int:
        """Wait until a running instance (not ``other_than``) holds the ``sweeps`` lease."""
        with trio.fail_after(timeout):
            while True:
                index = await self.leader(store)
                if index is not None and index != other_than:
                    return index
                await trio.sleep(0.1)

    def rescued(self) -> int:
        """Rows whose claim one instance took over from another, summed over every
        instance's log (the counter ``trainguard_rescued_total`` dies with its process)."""
        total = 0
        for instance in self.instances:
            path = instance.daemon.log_path
            if not path.exists():
                continue
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                if RESCUE_EVENT not in line:
                    continue
                try:
                    total += int(json.loads(line).get("rows", 0))
                except (ValueError, AttributeError):
                    continue
        return total


def _merged(
    base: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    out = {name: dict(values) for name, values in base.items()}
    for name, values in extra.items():
        out.setdefault(name, {}).update(values)
    return out


@asynccontextmanager
async def open_cluster(
    workdir: Path,
    sim: Simulator,
    database_url: str,
    count: int = 3,
    *,
    layers: Mapping[str, Mapping[str, Any]] | None = None,
    tables: Mapping[str, Mapping[str, Any]] | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[InstanceCluster]:
    """``count`` instances configured on ``database_url`` behind a balancer (none started:
    ``start_all``); every one still running is stopped with SIGTERM on the way out.

    ``layers`` and ``tables`` are ``demo_config``'s; ``[database] url``, ``[webhook]
    public_url`` and ``[cluster]`` (``CLUSTER_TIMES``, unless ``tables`` names others) are
    set here. ``env`` is added to every instance's environment.
    """
    ports = [(free_port(), free_port()) for _ in range(count)]
    async with open_balancer([("127.0.0.1", webhook) for webhook, _ in ports]) as balancer:
        shared = _merged(
            {"cluster": CLUSTER_TIMES},
            _merged(
                tables or {},
                {
                    "database": {"url": database_url},
                    "webhook": {"public_url": f"{balancer.url}/fal/webhook"},
                },
            ),
        )
        instances = []
        paths = []
        for index, (webhook_port, metrics_port) in enumerate(ports):
            path = demo_config(
                workdir,
                sim,
                webhook_port=webhook_port,
                metrics_port=metrics_port,
                layers=layers,
                tables=shared,
                config_name=f"instance{index}.toml",
            )
            paths.append(path)
            daemon = DaemonProcess(
                path, metrics_port, workdir / f"instance{index}.log", env=dict(env or {})
            )
            instances.append(Instance(index, daemon, webhook_port, metrics_port))
        settings = config.load(paths[0], env={"FAL_KEY": DEMO_KEY, **(env or {})})
        cluster = InstanceCluster(instances, balancer, settings)
        try:
            yield cluster
        finally:
            with trio.CancelScope(shield=True):
                await cluster.stop_all()


# -- trainguard demo --instances N ----------------------------------------------------------
async def run_cluster_demo(
    workdir: Path,
    database_url: str,
    *,
    instances: int = 3,
    trainings: int = 30,
    seed: int = 7,
    out: Any = sys.stdout,
) -> Report:
    """The demo's flow on ``instances`` instances behind the balancer on ``database_url``:
    the same simulator, faults and trainings; the sweeps leader is SIGKILLed where the
    single-instance demo kills its daemon, and restarted after another took over."""

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    sim = demo_simulator(seed)
    # One connection per webhook: the balancer then spreads deliveries, not connections.
    sim.config.webhook_connection_per_delivery = True
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve)
        async with (
            open_cluster(workdir, sim, database_url, instances) as cluster,
            actions.fal_client(cluster.settings) as fal,
            open_store(database_url) as store,
        ):
            say(
                f"simulator on {sim.base_url}; {instances} instances on PostgreSQL behind the "
                f"balancer {cluster.balancer.url}; logs in {workdir}/instance*.log"
            )
            await cluster.start_all()
            leader = await cluster.wait_for_leader(store)
            say(
                f"instances ready, #{leader} leads the sweeps; submitting {trainings} trainings "
                f"in two waves ({FAULTS_TOLD})"
            )
            reconciler = Reconciler(store, cluster.settings)
            half = trainings // 2
            await submit_wave(cluster.settings, fal, reconciler, range(half), trainings)
            await trio.sleep(2.5)
            killed_at = trio.current_time()
            await cluster.kill(leader)
            say(
                f"first wave of {half} in flight; instance #{leader}, the sweeps leader, killed "
                "with SIGKILL (the balancer sends its webhooks to the others)"
            )
            successor = await cluster.wait_for_leader(store, other_than=leader)
            say(
                f"instance #{successor} took the sweeps lead "
                f"{trio.current_time() - killed_at:.1f} s after the kill"
            )
            await cluster.start(leader)
            say(f"instance #{leader} restarted; its startup sweep ran before READY")
            await submit_wave(cluster.settings, fal, reconciler, range(half, trainings), trainings)
            say(f"second wave of {trainings - half} submitted")
            with trio.move_on_after(45.0):
                while not await all_finished(database_url):
                    await trio.sleep(0.5)
            statuses = await cluster.stop_all()
            say(f"instances stopped with SIGTERM (exit statuses {statuses})")
            report = await compare_with_truth(store, list(sim.truth.values()), sim.deliveries)
        nursery.cancel_scope.cancel()
    report.restarts = cluster.kills
    return report
