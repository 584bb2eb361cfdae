"""FAL calls per training: one instance against several on one PostgreSQL, and no check twice.

The same number of trainings (``--trainings``) is followed by each setup: 1 instance on SQLite
(the baseline), 1 instance on PostgreSQL and ``--instances`` (3) on one PostgreSQL (a
throwaway server, fsync on). The simulator runs in this process so that every request it
answers is logged here with its time, route, training and *which instance sent it*: each
instance runs with its own ``FAL_KEY`` (the simulator accepts any key), so the
``Authorization`` header names the sender. The trainings are submitted without a webhook URL
(every webhook is lost, so the poller and the delayed check do all the work), run
``--run-seconds`` at FAL and finish; each is then seeded into the setup's database as
IN_PROGRESS with its first check spread over one poll interval. Every built-in layer runs,
with timings compressed as in the demo (poll every ``--interval`` s, the delayed check 8 s
after the result, completeness every 4 s). A setup ends once every training is finished and
has had its delayed check, plus a few seconds to catch late calls.

Figures per setup: status and result calls per training (from the simulator's log), the
share each instance sent, artifact downloads and LoRA probes (the simulator's files route,
GET and HEAD) per training, and the duplicates: two calls of the same route for the same
training less than half a poll interval apart (a training is handed from one instance to the
next at most once per interval, after its ``next_check_at``, which is at least 0.9 x interval
away with the shipped jitter), counted separately for two different instances (the
claims should make that 0) and for one instance (retries of a transient answer, if faults are
injected with ``--fault``). ``--fault NAME=VALUE`` adds simulator faults (e.g.
``api_error_rate=0.1``); by default there are none but the lost webhooks. With faults, a
transient answer's backoff may be shorter than half an interval, and the retry may be claimed
by another instance: such a pair counts under "two instances" too, so read that figure as
"no duplicates" only without faults.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import statistics
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import trio
from _common import (
    LAYERS,
    Children,
    Databases,
    ForeignLoad,
    count_rows,
    daemon_args,
    free_port,
    run_main,
    say,
    seed_database,
    submit_to_simulator,
    training_row,
    wait_http,
    wait_quiet,
    write_config,
)

from trainguard.testing.simulator import (
    Faults,
    Receive,
    Scope,
    Send,
    SimConfig,
    Simulator,
    parse_fault,
)

KEY_PREFIX = "bench-instance-"
ROUTES = ("status", "result")


@dataclasses.dataclass(frozen=True)
class Call:
    at: float
    sender: str
    route: str
    request_id: str


class RecordingSimulator(Simulator):
    """The simulator, logging every queue call: its time, sender (the key), route and
    training."""

    def __init__(self, config: SimConfig) -> None:
        super().__init__(config)
        self.calls: list[Call] = []

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            parts = [p for p in scope["path"].split("/") if p]
            route = None
            if len(parts) == 4 and parts[2] == "requests" and scope["method"] == "GET":
                route = "result"
            elif len(parts) == 5 and parts[2] == "requests" and parts[4] == "status":
                route = "status"
            elif len(parts) == 3 and parts[0] == "files":  # artifact downloads and LoRA probes
                route, parts = f"files_{scope['method'].lower()}", ["", "", "", parts[1]]
            if route is not None:
                auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
                sender = auth.removeprefix("Key ")
                self.calls.append(Call(trio.current_time(), sender, route, parts[3]))
        await super().app(scope, receive, send)


def duplicates(calls: list[Call], interval: float) -> dict[str, Any]:
    """Pairs of consecutive calls of one route about one training less than half an
    interval apart, by two instances and by one; the smallest gap between two instances'
    calls and the mean gap between one training's status calls (in poll intervals: how
    punctual the polling is, which sets how many checks a training of a given length gets)."""
    by_key: dict[tuple[str, str], list[Call]] = defaultdict(list)
    for call in calls:
        by_key[(call.request_id, call.route)].append(call)
    two = one = 0
    smallest: float | None = None
    status_gaps: list[float] = []
    for (_training, route), series in by_key.items():
        series.sort(key=lambda c: c.at)
        for a, b in itertools.pairwise(series):
            gap = b.at - a.at
            if route == "status":
                status_gaps.append(gap / interval)
            if a.sender != b.sender:
                smallest = gap if smallest is None else min(smallest, gap)
            if gap < interval / 2:
                if a.sender != b.sender:
                    two += 1
                else:
                    one += 1
    return {
        "two_instances_within_half_interval": two,
        "one_instance_within_half_interval": one,
        "smallest_gap_between_instances_in_intervals": (
            smallest / interval if smallest is not None else None
        ),
        "mean_status_gap_in_intervals": (
            statistics.fmean(status_gaps) if status_gaps else float("nan")
        ),
    }


async def run_setup(
    children: Children,
    sim: RecordingSimulator,
    databases: Databases,
    workdir: Path,
    args: argparse.Namespace,
    kind: str,
    count: int,
) -> dict[str, Any]:
    name = f"{kind}-{count}"
    db = databases.fresh(name)
    seed_database(db, [])  # the schema, so that the instances start on it together
    instances = []
    for k in range(count):
        metrics_port = free_port()
        config = write_config(
            workdir,
            db_path=db,
            queue_url=sim.base_url,
            jwks_url=sim.jwks_url,
            webhook_port=free_port(),
            metrics_port=metrics_port,
            enabled=LAYERS,
            layers={
                "poller": {
                    "first_check_after_seconds": args.interval,
                    "interval_seconds": args.interval,
                    "max_backoff_seconds": 2 * args.interval,
                },
                "delayed": {"after_seconds": 8.0, "verify_after_seconds": 2.0},
                "completeness": {"interval_seconds": 4.0},
            },
            extra_tables={
                "cluster": {"lease_seconds": 3.0, "heartbeat_seconds": 1.0},
                "artifacts": {"dir": str(workdir / f"artifacts-{name}-{k}")},
            },
            name=f"{name}-{k}.toml",
        )
        instances.append((config, metrics_port, f"{KEY_PREFIX}{name}-{k}"))
    await wait_quiet()

    async def start(config: Path, metrics_port: int, key: str) -> None:
        proc = children.spawn(daemon_args(config), key, env={"FAL_KEY": key})
        procs.append(proc)
        await wait_http(f"http://127.0.0.1:{metrics_port}/readyz", proc)

    procs: list[subprocess.Popen[bytes]] = []
    async with trio.open_nursery() as nursery:
        for config, metrics_port, key in instances:
            nursery.start_soon(start, config, metrics_port, key)
    say(f"{name}: {count} instance(s) ready; submitting {args.trainings} trainings")
    foreign = ForeignLoad()
    t0 = time.monotonic()
    subs = await submit_to_simulator(sim.base_url, args.trainings)
    now = time.time()
    rng = random.Random(11)
    seed_database(
        db,
        [
            training_row(s, i, now=now, next_check_at=now + rng.uniform(0, args.interval))
            for i, s in enumerate(subs)
        ],
    )
    ids = {s["request_id"] for s in subs}
    with trio.fail_after(args.run_seconds + 300):
        while count_rows(
            db,
            "trainings WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED') "
            "OR delayed_check_at IS NOT NULL",
        ):
            await trio.sleep(0.5)
    finished = time.monotonic() - t0
    await trio.sleep(args.settle)
    for proc in procs:
        children.stop(proc)
    every = [c for c in sim.calls if c.request_id in ids]
    with (workdir / f"calls-{name}.jsonl").open("w", encoding="utf-8") as log:
        for c in every:  # the simulator's log of this setup, for a second look (--keep)
            log.write(json.dumps(dataclasses.asdict(c)) + "\n")
    calls = [c for c in every if c.route in ROUTES]
    per_route = Counter(c.route for c in every)
    per_training = Counter(c.request_id for c in calls)
    senders = Counter(c.sender for c in calls)
    fallbacks = count_rows(db, "trainings WHERE is_fallback OR lora_url IS NULL")
    return {
        "database": kind,
        "instances": count,
        "trainings": len(subs),
        "seconds_to_all_finished": finished,
        "status_calls_per_training": per_route["status"] / len(subs),
        "result_calls_per_training": per_route["result"] / len(subs),
        "file_gets_per_training": per_route["files_get"] / len(subs),
        "file_heads_per_training": per_route["files_head"] / len(subs),
        "calls_per_training": len(calls) / len(subs),
        "calls_per_training_min_max": [min(per_training.values()), max(per_training.values())],
        "calls_per_training_median": statistics.median(per_training.values()),
        "share_per_instance": sorted(
            (round(n / len(calls), 3) for n in senders.values()), reverse=True
        ),
        "trainings_without_a_real_result": fallbacks,
        **duplicates(calls, args.interval),
        "foreign_cores": foreign.cores(),
    }


SETUPS = (("sqlite", 1), ("postgresql", 1), ("postgresql", 0))  # 0: --instances


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    faults = Faults(**dict(parse_fault(spec) for spec in args.fault))
    sim = RecordingSimulator(
        SimConfig(port=free_port(), queue_seconds=0.0, run_seconds=args.run_seconds, faults=faults)
    )
    figures: dict[str, Any] = {
        "poll_interval_seconds": args.interval,
        "run_seconds": args.run_seconds,
        "faults": args.fault,
    }
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve)
        with (
            Children(workdir) as children,
            Databases("sqlite", workdir) as sqlite,
            Databases("postgresql", workdir) as pg,
        ):
            for kind, count in SETUPS:
                n = count or args.instances
                r = await run_setup(
                    children, sim, sqlite if kind == "sqlite" else pg, workdir, args, kind, n
                )
                figures[f"{kind}_{n}"] = r
                say(
                    f"  {kind}, {n} instance(s): {r['calls_per_training']:.2f} calls per "
                    f"training; duplicates by two instances "
                    f"{r['two_instances_within_half_interval']}"
                )
        nursery.cancel_scope.cancel()
    return figures


def report(f: dict[str, Any]) -> None:
    print()
    print(
        f"FAL calls per training (poll every {f['poll_interval_seconds']:g} s, trainings run "
        f"{f['run_seconds']:g} s, no webhooks; faults {f['faults'] or 'none'})"
    )
    print(
        "  setup          trainings  calls/training (status + result; median, min-max)"
        "  same training within half an interval: two instances / one"
    )
    for r in f.values():
        if not isinstance(r, dict):
            continue
        low, high = r["calls_per_training_min_max"]
        print(
            f"  {r['database']:10} x{r['instances']}  {r['trainings']:9}  "
            f"{r['calls_per_training']:5.2f} ({r['status_calls_per_training']:.2f} + "
            f"{r['result_calls_per_training']:.2f}; {r['calls_per_training_median']:g}, "
            f"{low}-{high})"
            f"{r['two_instances_within_half_interval']:24} / {r['one_instance_within_half_interval']}"
        )
        gap = r["smallest_gap_between_instances_in_intervals"]
        print(
            "      smallest gap between two instances' calls: "
            + (f"{gap:.2f} intervals" if gap is not None else "none (one sender)")
            + f"; mean gap between status calls {r['mean_status_gap_in_intervals']:.2f} "
            f"intervals; shares {r['share_per_instance']}; artifact GETs "
            f"{r['file_gets_per_training']:.2f}, HEADs {r['file_heads_per_training']:.2f} per "
            f"training; without a real result {r['trainings_without_a_real_result']}; all "
            f"finished after {r['seconds_to_all_finished']:.1f} s; other processes "
            f"{r['foreign_cores']:.2f} cores"
        )


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trainings", type=int, default=200)
    parser.add_argument("--instances", type=int, default=3, help="instances on PostgreSQL")
    parser.add_argument("--interval", type=float, default=2.0, help="poll interval, seconds")
    parser.add_argument("--run-seconds", type=float, default=20.0, help="time a training runs")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds counted after the end")
    parser.add_argument(
        "--fault", action="append", default=[], metavar="NAME=VALUE", help="simulator fault"
    )


if __name__ == "__main__":
    run_main(
        __doc__, options, bench, report, "bench-fal-calls-", needs_postgresql=lambda args: True
    )
