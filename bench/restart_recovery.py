"""Restart recovery: from process start to READY with 10,000 unfinished trainings whose
results came in while the daemon was down.

The simulator runs in its own process (``python -m daemon simulate``, trainings done 1 s after
submit). 10,000 trainings are submitted to it over HTTP without a webhook (the daemon is
"down": nothing would have received one) and have all COMPLETED there before the daemon
starts. The database holds them as IN_PROGRESS, as the daemon last saw them. Then
``python -m daemon run`` starts with every built-in layer enabled; the startup layer checks
every unfinished training (status, then result) before READY. The time is taken from just
before the process is spawned to READY=1 on a NOTIFY_SOCKET this script binds (and to the
first 200 from /readyz, polled every 20 ms). ``[fal] max_requests_per_second`` is set to
10,000 in the benchmark's config (the shipped 10/s alone would make 20,000 requests take
2,000 s). Measured at the shipped ``[layers.startup] concurrency`` (8) and at 32.

Compared in the same run with the time to READY on an empty database (the fixed cost of
starting Python and the daemon). Target: under 10 s.
"""

from __future__ import annotations

import argparse
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from _common import (
    Children,
    ForeignLoad,
    count_rows,
    cpu_seconds,
    daemon_args,
    print_profile,
    profile_rows,
    run_main,
    say,
    seeded_config,
    start_profile,
    start_simulator,
    submit_to_simulator,
    training_row,
    wait_quiet,
)


async def time_to_ready(
    children: Children,
    workdir: Path,
    name: str,
    rows: list[dict[str, Any]],
    sim_url: str,
    *,
    concurrency: int,
    profile: bool = False,
) -> dict[str, Any]:
    db_path, config, metrics_port = seeded_config(
        workdir, name, rows, sim_url=sim_url, layers={"startup": {"concurrency": concurrency}}
    )
    notify_path = workdir / f"{name}.notify"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(notify_path))
    await wait_quiet()
    foreign = ForeignLoad()
    start = time.monotonic()
    daemon = children.spawn(
        daemon_args(config), f"daemon-{name}", env={"NOTIFY_SOCKET": str(notify_path)}
    )
    spy = None
    spy_out = workdir / f"profile-{name}.txt"
    if profile:
        spy = start_profile(children, daemon.pid, 60, spy_out)
    got: dict[str, float] = {}

    async def notified() -> None:
        while "notify" not in got:
            data = await sock.recv(4096)
            if b"READY=1" in data.split(b"\n"):
                got["notify"] = time.monotonic() - start

    async def readyz() -> None:
        url = f"http://127.0.0.1:{metrics_port}/readyz"
        async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
            while "readyz" not in got:
                if daemon.poll() is not None:
                    raise RuntimeError(
                        f"the daemon exited; see {children.log_path('daemon-' + name)}"
                    )
                try:
                    if (await client.get(url)).status_code == 200:
                        got["readyz"] = time.monotonic() - start
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.02)

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notified)
            nursery.start_soon(readyz)
    cpu = cpu_seconds(daemon.pid)
    foreign_cores = foreign.cores()
    sock.close()
    children.stop(daemon)
    hot: list[dict[str, Any]] = []
    if spy is not None:
        spy.wait(30)  # py-spy writes its profile when the process it samples exits
        if spy_out.exists():
            hot = profile_rows(spy_out, 60)
    recovered = count_rows(
        db_path,
        "trainings WHERE status = 'COMPLETED' AND result_layer = 'startup' AND is_fallback = 0",
    )
    unfinished = count_rows(
        db_path, "trainings WHERE status IN ('SUBMITTED', 'IN_QUEUE', 'IN_PROGRESS')"
    )
    return {
        "trainings": len(rows),
        "startup_concurrency": concurrency,
        "seconds_to_ready_notify": got["notify"],
        "seconds_to_readyz_200": got["readyz"],
        "daemon_cpu_seconds_at_ready": cpu,
        "recovered_by_startup": recovered,
        "unfinished_after_stop": unfinished,
        "foreign_cores": foreign_cores,
        "profile": hot,
    }


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with Children(workdir) as children:
        _sim, sim_url = await start_simulator(children, run_seconds=1.0)
        say(f"submitting {args.trainings} trainings to the simulator (no webhook: daemon down)")
        subs = await submit_to_simulator(sim_url, args.trainings)
        await trio.sleep(2.0)  # every one is COMPLETED at the simulator now

        say("baseline: time to READY on an empty database")
        empty = await time_to_ready(children, workdir, "empty", [], sim_url, concurrency=8)
        figures["empty"] = empty
        say(f"  {empty['seconds_to_ready_notify']:.2f} s")
        for concurrency in args.concurrency:
            now = time.time()
            rows = [
                training_row(s, i, now=now, next_check_at=now + 30 + i % 60)
                for i, s in enumerate(subs)
            ]
            say(f"{len(rows)} trainings finished while down; startup concurrency {concurrency}")
            r = await time_to_ready(
                children,
                workdir,
                f"recover-{concurrency}",
                rows,
                sim_url,
                concurrency=concurrency,
                profile=args.profile and concurrency == args.concurrency[0],
            )
            r["ratio_to_empty_start"] = (
                r["seconds_to_ready_notify"] / empty["seconds_to_ready_notify"]
            )
            figures[f"recover_concurrency_{concurrency}"] = r
            say(
                f"  READY after {r['seconds_to_ready_notify']:.2f} s; "
                f"{r['recovered_by_startup']} results recovered by the startup sweep"
            )
    figures["targets"] = {
        "seconds_to_ready_below": 10.0,
        "met": {
            k: r["seconds_to_ready_notify"] < 10.0
            for k, r in figures.items()
            if k.startswith("recover_")
        },
        "fal_max_requests_per_second_in_config": 10_000.0,
    }
    return figures


def report(f: dict[str, Any]) -> None:
    print()
    print("restart recovery ([fal] max_requests_per_second = 10000 in the bench config)")
    e = f["empty"]
    print(
        f"  empty database: READY=1 after {e['seconds_to_ready_notify']:.2f} s "
        f"(/readyz 200 after {e['seconds_to_readyz_200']:.2f} s)"
    )
    for key, r in f.items():
        if not key.startswith("recover_"):
            continue
        print(
            f"  {r['trainings']} finished while down, startup concurrency "
            f"{r['startup_concurrency']:>2}: READY=1 after {r['seconds_to_ready_notify']:.2f} s "
            f"(target < 10 s; {r['ratio_to_empty_start']:.1f}x an empty start); /readyz 200 after "
            f"{r['seconds_to_readyz_200']:.2f} s; {r['recovered_by_startup']} recovered, "
            f"{r['unfinished_after_stop']} unfinished; daemon CPU {r['daemon_cpu_seconds_at_ready']:.1f} s; "
            f"other processes {r['foreign_cores']:.2f} cores"
        )
        print_profile(r["profile"])


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trainings", type=int, default=10_000)
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[8, 32], help="[layers.startup] concurrency"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the first recovery")


if __name__ == "__main__":
    run_main(__doc__, options, bench, report, "bench-restart-")
