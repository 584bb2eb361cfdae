"""Failover: how long the sweeps leader role goes unserved after its holder is SIGKILLed.

Three ``trainguard run`` processes (``--instances``) on one throwaway PostgreSQL server
(``trainguard.testing.postgres``), only the two sweeps layers enabled (completeness and
emergency, the ones the ``sweeps`` leader role gates), ``[layers.completeness]
interval_seconds`` short (1 s) so that a pass is due whenever a new leader takes over. The
leader is the one instance whose /metrics shows ``trainguard_leader{role="sweeps"} 1``. After
a random wait within one renew period (a third of the lease, so that the kill lands anywhere in
the renew cycle) it is SIGKILLed, and the survivors' /metrics are read every 50 ms:

- *leader*: seconds from the kill to a survivor showing ``trainguard_leader{role="sweeps"} 1``;
- *pass*: seconds from the kill to that survivor's
  ``trainguard_layer_passes_total{layer="completeness"}`` moving (a completeness pass has run
  elsewhere: the sweeps run again).

The new leader's ``GET /v1/instances`` (the leases in the database) must then name it as
the one holder of the role. The killed instance is started again (a new instance id) before the next repetition. Repeated
``--repeats`` times for each ``--lease`` (``[cluster] lease_seconds``; default 15, the
shipped value, and 3), with ``heartbeat_seconds`` the shipped 5 s or a third of a shorter
lease. The bound is the lease: a dead leader's lease expires at most ``lease_seconds`` after
its last renew, which was at most a third of a lease before the kill.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from _common import (
    Children,
    Databases,
    ForeignLoad,
    daemon_args,
    free_port,
    metrics,
    run_main,
    say,
    wait_http,
    wait_quiet,
    write_config,
)

LEADER = 'trainguard_leader{role="sweeps"}'
PASSES = 'trainguard_layer_passes_total{layer="completeness"}'
POLL_SECONDS = 0.05


class Instance:
    """One ``trainguard run`` of the cluster: its config, metrics port and process."""

    def __init__(self, config: Path, metrics_port: int, name: str) -> None:
        self.config = config
        self.metrics_port = metrics_port
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, children: Children) -> None:
        self.proc = children.spawn(daemon_args(self.config), self.name)
        await wait_http(f"http://127.0.0.1:{self.metrics_port}/readyz", self.proc)

    async def sweeps_holders(self) -> list[str]:
        """Per ``GET /v1/instances`` on this instance (the leases in the database): the
        metrics listeners of the instances holding the sweeps role."""
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            reply = await client.get(f"http://127.0.0.1:{self.metrics_port}/v1/instances")
        reply.raise_for_status()
        return [i["metrics_listen"] for i in reply.json()["items"] if "sweeps" in i["roles"]]

    async def reading(self) -> dict[str, float] | None:
        """The leader gauge and the completeness passes, or None while it does not answer."""
        try:
            values = await metrics(self.metrics_port)
        except httpx.HTTPError:
            return None
        return {"leader": values.get(LEADER, 0.0), "passes": values.get(PASSES, 0.0)}


async def find_leader(instances: list[Instance], timeout: float) -> Instance:
    """The one instance holding the sweeps role that has run a pass (waits for it)."""
    with trio.fail_after(timeout):
        while True:
            readings = [(i, await i.reading()) for i in instances]
            leaders = [i for i, r in readings if r and r["leader"] == 1 and r["passes"] > 0]
            if len(leaders) == 1:
                return leaders[0]
            await trio.sleep(POLL_SECONDS)


async def one_failover(
    children: Children, instances: list[Instance], lease: float, rng: random.Random
) -> dict[str, Any]:
    leader = await find_leader(instances, timeout=3 * lease + 30)
    await trio.sleep(rng.uniform(0, lease / 3))
    survivors = [i for i in instances if i is not leader]
    before = {i.name: (await i.reading() or {"passes": 0.0})["passes"] for i in survivors}
    assert leader.proc is not None
    foreign = ForeignLoad()
    t0 = time.monotonic()
    os.kill(leader.proc.pid, signal.SIGKILL)
    leader.proc.wait()
    leader_at: float | None = None
    new_leader: Instance | None = None
    with trio.fail_after(3 * lease + 30):
        while True:
            for inst in survivors:
                r = await inst.reading()
                if r is None:
                    continue
                if new_leader is None and r["leader"] == 1:
                    new_leader, leader_at = inst, time.monotonic() - t0
                if inst is new_leader and r["passes"] > before[inst.name]:
                    pass_at = time.monotonic() - t0
                    break
            else:
                await trio.sleep(POLL_SECONDS)
                continue
            break
    assert new_leader is not None and leader_at is not None
    holders = await new_leader.sweeps_holders()
    result = {
        "database_agrees": holders == [f"127.0.0.1:{new_leader.metrics_port}"],
        "killed": leader.name,
        "new_leader": new_leader.name,
        "leader_seconds": leader_at,
        "pass_seconds": pass_at,
        "foreign_cores": foreign.cores(),
    }
    await leader.start(children)  # back to full strength for the next repetition
    return result


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


async def run_lease(
    children: Children, databases: Databases, workdir: Path, args: argparse.Namespace, lease: float
) -> dict[str, Any]:
    heartbeat = min(5.0, lease / 3)
    url = databases.fresh(f"failover-{lease:g}")
    instances = []
    for k in range(args.instances):
        metrics_port = free_port()
        config = write_config(
            workdir,
            db_path=url,
            queue_url="http://127.0.0.1:9",  # no trainings: nothing is asked of FAL
            jwks_url="http://127.0.0.1:9/.well-known/jwks.json",
            webhook_port=free_port(),
            metrics_port=metrics_port,
            enabled=("completeness", "emergency"),
            layers={"completeness": {"interval_seconds": args.completeness_interval}},
            extra_tables={"cluster": {"lease_seconds": lease, "heartbeat_seconds": heartbeat}},
            name=f"lease{lease:g}-{k}.toml",
        )
        instances.append(Instance(config, metrics_port, f"lease{lease:g}-instance{k}"))
    await wait_quiet()
    for inst in instances:
        await inst.start(children)
    say(f"{args.instances} instances up, lease {lease:g} s, heartbeat {heartbeat:g} s")
    rng = random.Random(int(lease * 1000))
    runs = []
    for n in range(args.repeats):
        run = await one_failover(children, instances, lease, rng)
        runs.append(run)
        say(
            f"  kill {n + 1}: {run['killed']} -> {run['new_leader']}: leader after "
            f"{run['leader_seconds']:.2f} s, a pass after {run['pass_seconds']:.2f} s "
            f"(other processes {run['foreign_cores']:.2f} cores); GET /v1/instances agrees: "
            f"{run['database_agrees']}"
        )
    for inst in instances:
        if inst.proc is not None:
            children.stop(inst.proc)
    return {
        "lease_seconds": lease,
        "heartbeat_seconds": heartbeat,
        "completeness_interval_seconds": args.completeness_interval,
        "runs": runs,
        "leader_seconds": summary([r["leader_seconds"] for r in runs]),
        "pass_seconds": summary([r["pass_seconds"] for r in runs]),
        "foreign_cores_max": max(r["foreign_cores"] for r in runs),
        "database_agrees_every_time": all(r["database_agrees"] for r in runs),
    }


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {"instances": args.instances, "repeats": args.repeats}
    with Databases("postgresql", workdir) as databases, Children(workdir) as children:
        for lease in args.lease:
            figures[f"lease_{lease:g}"] = await run_lease(children, databases, workdir, args, lease)
    return figures


def report(f: dict[str, Any]) -> None:
    print()
    print(
        f"failover: {f['instances']} instances on PostgreSQL, sweeps leader SIGKILLed "
        f"{f['repeats']} times per lease (min / median / max seconds after the kill)"
    )
    for key, r in f.items():
        if not key.startswith("lease_"):
            continue
        lead, done = r["leader_seconds"], r["pass_seconds"]
        print(
            f"  lease {r['lease_seconds']:4g} s (bound {r['lease_seconds']:g} s): new leader "
            f"{lead['min']:.2f} / {lead['median']:.2f} / {lead['max']:.2f}; completeness pass "
            f"run {done['min']:.2f} / {done['median']:.2f} / {done['max']:.2f} "
            f"(pass interval {r['completeness_interval_seconds']:g} s); other processes up to "
            f"{r['foreign_cores_max']:.2f} cores; the new leader was the one lease holder in "
            f"GET /v1/instances every time: {r['database_agrees_every_time']}"
        )


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="kills per lease")
    parser.add_argument(
        "--lease", type=float, nargs="+", default=[15.0, 3.0], help="[cluster] lease_seconds"
    )
    parser.add_argument(
        "--completeness-interval",
        type=float,
        default=1.0,
        help="[layers.completeness] interval_seconds",
    )


if __name__ == "__main__":
    run_main(__doc__, options, bench, report, "bench-failover-", needs_postgresql=lambda args: True)
