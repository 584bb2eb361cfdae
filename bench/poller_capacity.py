"""Poller capacity: status checks per second one daemon sustains, and the CPU it needs to keep
10,000 unfinished trainings on a 60 s interval.

The simulator runs in its own process (``python -m daemon simulate --fault never_finish=1``)
and the trainings are real there: they are submitted to it over HTTP first, so every status
check is answered 202 IN_PROGRESS with logs, as FAL does for a training that is running. The
same request ids are then written straight into a fresh database as IN_PROGRESS trainings,
and the daemon (``python -m daemon run``) is started on it. ``[fal] max_requests_per_second``
is set to 10,000 in the benchmark's config: the shipped default of 10 requests/s would itself
cap a daemon at 600 trainings per 60 s interval.

A. Capacity: all trainings due at once, interval 3600 s (each is checked exactly once), only
   the poller enabled; status checks per second from the first to the last, at the shipped
   ``concurrency`` (8) and at 32.
B. Steady state: ``next_check_at`` spread evenly over the first 60 s, ``interval_seconds`` 60
   (jitter 0.1, as shipped); every built-in layer enabled except startup (its one-off sweep is
   restart_recovery's subject, and would bunch the schedule). After a warm-up, the daemon's
   CPU (utime+stime from /proc/PID/stat, all threads) over a window of at least 60 s, as a
   share of one core. Target: under 25%.

``--database`` picks the daemon's database: sqlite (the default, as before), postgresql (a
throwaway server, fsync on; its CPU, the postmaster and every backend, is reported beside the
daemon's) or both, one after the other in one run, with the ratios PostgreSQL / SQLite.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import trio
from _common import (
    RATIOS_KEY,
    Children,
    Databases,
    ForeignLoad,
    add_database_option,
    count_rows,
    cpu_seconds,
    database_kinds,
    metrics,
    print_profile,
    profile_rows,
    report_per_database,
    run_main,
    say,
    seeded_config,
    start_daemon,
    start_profile,
    start_simulator,
    submit_to_simulator,
    training_row,
)

BUILTIN_BUT_STARTUP = ("webhook", "poller", "delayed", "completeness", "emergency")


def status_checks(values: dict[str, float]) -> float:
    return sum(
        v
        for k, v in values.items()
        if k.startswith("trainguard_fal_requests_total{") and 'operation="status"' in k
    )


async def capacity(
    children: Children,
    databases: Databases,
    workdir: Path,
    subs: list[dict[str, str]],
    sim_url: str,
    sim_pid: int,
    concurrency: int,
) -> dict[str, Any]:
    """Every training due now, checked once; checks per second first to last."""
    name = f"capacity-{concurrency}"
    now = time.time()
    _db_path, config, metrics_port = seeded_config(
        workdir,
        name,
        [training_row(s, i, now=now, next_check_at=now - 1) for i, s in enumerate(subs)],
        sim_url=sim_url,
        db=databases.fresh(name),
        enabled=("poller",),
        layers={"poller": {"interval_seconds": 3600.0, "concurrency": concurrency}},
    )
    daemon, _ready = await start_daemon(children, config, name, metrics_port)
    n = len(subs)
    first: float | None = None
    cpu0 = sim0 = db0 = 0.0
    foreign = ForeignLoad()
    with trio.fail_after(600):
        while True:
            count = status_checks(await metrics(metrics_port))
            t = time.monotonic()
            if first is None and count > 0:
                first, first_count = t, count
                cpu0, sim0 = cpu_seconds(daemon.pid), cpu_seconds(sim_pid)
                db0 = databases.server_cpu_seconds()
                foreign.start()
            if count >= n:
                break
            await trio.sleep(0.25)
    assert first is not None
    wall = t - first
    result = {
        "concurrency": concurrency,
        "checks": count - first_count,
        "seconds": wall,
        "checks_per_second": (count - first_count) / wall,
        "daemon_cpu_share": (cpu_seconds(daemon.pid) - cpu0) / wall,
        "simulator_cpu_share": (cpu_seconds(sim_pid) - sim0) / wall,
        "database_server_cpu_share": (databases.server_cpu_seconds() - db0) / wall,
        "foreign_cores": foreign.cores(),
    }
    children.stop(daemon)
    return result


async def steady(
    children: Children,
    databases: Databases,
    workdir: Path,
    subs: list[dict[str, str]],
    sim_url: str,
    sim_pid: int,
    *,
    interval: float,
    warmup: float,
    window: float,
    profile: bool,
) -> dict[str, Any]:
    now = time.time()
    rng = random.Random(4)
    rows = [
        training_row(s, i, now=now, next_check_at=now + rng.uniform(0, interval))
        for i, s in enumerate(subs)
    ]
    db_path, config, metrics_port = seeded_config(
        workdir,
        "steady",
        rows,
        sim_url=sim_url,
        db=databases.fresh("steady"),
        enabled=BUILTIN_BUT_STARTUP,
        layers={"poller": {"interval_seconds": interval}},
    )
    daemon, _ready = await start_daemon(children, config, "steady", metrics_port)
    say(f"steady state: warming up {warmup:.0f} s, then measuring {window:.0f} s")
    await trio.sleep(warmup)
    before = status_checks(await metrics(metrics_port))
    cpu0, sim0, t0 = cpu_seconds(daemon.pid), cpu_seconds(sim_pid), time.monotonic()
    db0 = databases.server_cpu_seconds()
    foreign = ForeignLoad()
    spy_out = workdir / "profile-steady.txt"
    spy = start_profile(children, daemon.pid, window - 2, spy_out) if profile else None
    samples: list[float] = []
    while time.monotonic() - t0 < window:
        await trio.sleep(10.0)
        samples.append(
            (cpu_seconds(daemon.pid) - cpu0) / (time.monotonic() - t0)
        )  # running share, to see it is steady
    wall = time.monotonic() - t0
    checks = status_checks(await metrics(metrics_port)) - before
    cpu = cpu_seconds(daemon.pid) - cpu0
    db_cpu = databases.server_cpu_seconds() - db0
    overdue = count_rows(
        db_path,
        "trainings WHERE status = 'IN_PROGRESS' AND next_check_at < ?",
        time.time() - 5,
    )
    children.stop(daemon)
    hot: list[dict[str, Any]] = []
    if spy is not None:
        spy.wait(30)
        hot = profile_rows(spy_out, 60)
        say(f"  profile (py-spy --gil, collapsed stacks) in {spy_out}")
    return {
        "profile": hot,
        "trainings": len(subs),
        "interval_seconds": interval,
        "window_seconds": wall,
        "status_checks": checks,
        "checks_per_second": checks / wall,
        "offered_checks_per_second": len(subs) / interval,
        "daemon_cpu_share": cpu / wall,
        "daemon_cpu_ms_per_check": 1000 * cpu / checks if checks else float("nan"),
        "running_cpu_share_every_10s": samples,
        "simulator_cpu_share": (cpu_seconds(sim_pid) - sim0) / wall,
        "database_server_cpu_share": db_cpu / wall,
        "overdue_more_than_5s_at_end": overdue,
        "foreign_cores": foreign.cores(),
    }


async def run_database(
    children: Children,
    databases: Databases,
    workdir: Path,
    subs: list[dict[str, str]],
    sim_url: str,
    sim_pid: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """A and B on one kind of database."""
    figures: dict[str, Any] = {"database": databases.kind}
    for concurrency in args.concurrency:
        say(
            f"A. capacity on {databases.kind}: {len(subs)} due at once, "
            f"poller concurrency {concurrency}"
        )
        a = await capacity(children, databases, workdir, subs, sim_url, sim_pid, concurrency)
        figures[f"capacity_concurrency_{concurrency}"] = a
        say(
            f"  {a['checks_per_second']:.0f} status checks/s, daemon CPU "
            f"{a['daemon_cpu_share']:.0%}, simulator CPU {a['simulator_cpu_share']:.0%}"
        )
    say(
        f"B. steady state on {databases.kind}: {len(subs)} trainings on a {args.interval:.0f} s interval"
    )
    b = await steady(
        children,
        databases,
        workdir,
        subs,
        sim_url,
        sim_pid,
        interval=args.interval,
        warmup=args.warmup,
        window=args.window,
        profile=args.profile,
    )
    figures["steady"] = b
    figures["targets"] = {
        "cpu_share_below": 0.25,
        "met": b["daemon_cpu_share"] < 0.25,
        "fal_max_requests_per_second_in_config": 10_000.0,
    }
    return figures


def ratios(sqlite: dict[str, Any], postgresql: dict[str, Any]) -> dict[str, float]:
    """PostgreSQL / SQLite for the figures that compare."""
    out = {}
    for key, a in sqlite.items():
        if key.startswith("capacity_"):
            out[f"{key}_checks_per_second"] = (
                postgresql[key]["checks_per_second"] / a["checks_per_second"]
            )
    steady_pg, steady_lite = postgresql["steady"], sqlite["steady"]
    out["steady_daemon_cpu_share"] = steady_pg["daemon_cpu_share"] / steady_lite["daemon_cpu_share"]
    out["steady_daemon_and_server_cpu_share"] = (
        steady_pg["daemon_cpu_share"] + steady_pg["database_server_cpu_share"]
    ) / steady_lite["daemon_cpu_share"]
    return out


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    per_kind: dict[str, Any] = {}
    with Children(workdir) as children:
        sim, sim_url = await start_simulator(children, run_seconds=3600, faults=["never_finish=1"])
        say(f"submitting {args.trainings} never-finishing trainings to the simulator")
        t0 = time.monotonic()
        subs = await submit_to_simulator(sim_url, args.trainings)
        say(f"  submitted in {time.monotonic() - t0:.1f} s")
        for kind in database_kinds(args.database):
            with Databases(kind, workdir) as databases:
                per_kind[kind] = await run_database(
                    children, databases, workdir, subs, sim_url, sim.pid, args
                )
    if len(per_kind) == 1:
        return next(iter(per_kind.values()))
    return {**per_kind, RATIOS_KEY: ratios(**per_kind)}


def report(f: dict[str, Any]) -> None:
    r = report_per_database(f, report_one)
    if r is None:
        return
    print()
    print("poller capacity, PostgreSQL / SQLite")
    for key, value in r.items():
        print(f"  {key:45} {value:6.2f}")


def report_one(f: dict[str, Any]) -> None:
    print()
    print(f"poller capacity on {f.get('database', 'sqlite')}")
    for key, a in f.items():
        if key.startswith("capacity_"):
            print(
                f"  A. all due at once, concurrency {a['concurrency']:>2}: "
                f"{a['checks_per_second']:6.0f} status checks/s over {a['seconds']:.1f} s; "
                f"daemon CPU {a['daemon_cpu_share']:.0%} of a core, simulator "
                f"{a['simulator_cpu_share']:.0%}, database server {a['database_server_cpu_share']:.0%}; "
                f"other processes {a['foreign_cores']:.2f} cores"
            )
    b = f["steady"]
    print(
        f"  B. {b['trainings']} trainings every {b['interval_seconds']:.0f} s: daemon CPU "
        f"{b['daemon_cpu_share']:.1%} of one core over {b['window_seconds']:.0f} s "
        f"(target < 25%); {b['checks_per_second']:.0f} checks/s "
        f"(offered {b['offered_checks_per_second']:.0f}/s); {b['daemon_cpu_ms_per_check']:.2f} ms CPU "
        f"per check; database server CPU {b['database_server_cpu_share']:.1%}; overdue at end "
        f"{b['overdue_more_than_5s_at_end']}; other processes "
        f"{b['foreign_cores']:.2f} cores"
    )
    print_profile(b["profile"])
    best = max(
        (a["checks_per_second"] for k, a in f.items() if k.startswith("capacity_")), default=0
    )
    if best:
        print(
            f"  one daemon's check capacity covers {best * b['interval_seconds']:.0f} trainings "
            f"per {b['interval_seconds']:.0f} s interval; the steady-state ratio of "
            f"needed to capacity is {b['offered_checks_per_second'] / best:.2f}"
        )


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trainings", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=70.0, help="at least 60 s")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[8, 32], help="poller concurrency for A"
    )
    parser.add_argument("--profile", action="store_true", help="sample the daemon with py-spy in B")
    add_database_option(parser)


if __name__ == "__main__":
    run_main(
        __doc__,
        options,
        bench,
        report,
        "bench-poller-",
        needs_postgresql=lambda args: args.database != "sqlite",
    )
