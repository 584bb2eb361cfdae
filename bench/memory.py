"""Memory: resident memory of a running daemon, idle after startup, by database size.

Cases, each a fresh database and a fresh ``python -m daemon run`` (every built-in layer
enabled, shipped settings except ``[fal] max_requests_per_second = 10000``):

* empty: no trainings (the cost of the process itself);
* 10k: 10,000 trainings, 90% finished (9,000 COMPLETED with a verified real result, 1,000
  running);
* 100k: 100,000 trainings, 90% finished (90,000 + 10,000 running);
* 100k-1k-running: 100,000 trainings, 99,000 finished and the same 1,000 running as in 10k,
  so that 10k -> 100k-1k-running changes only the count of finished trainings.

Running trainings are real at the simulator (its own process, ``never_finish``), so the
startup sweep and the poller get real answers. Finished ones need no more work (their
delayed check is done, their LoRA URL was probed), as in a daemon that has run for a while.
After READY the daemon is left idle for ``--idle`` seconds, then VmRSS, RssAnon and VmHWM
(the peak, startup included) are read from /proc/PID/status. Target: under 150 MB at 100k,
and no growth with the count of finished trainings.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import trio
from _common import (
    Children,
    fake_submission,
    memory_kib,
    run_main,
    say,
    seed_database,
    simulator_config,
    start_daemon,
    start_simulator,
    submit_to_simulator,
    training_row,
)


async def measure(
    children: Children,
    workdir: Path,
    name: str,
    running: list[dict[str, str]],
    finished: int,
    sim_url: str,
    idle: float,
) -> dict[str, Any]:
    now = time.time()
    rows = [
        training_row(s, i, now=now, next_check_at=now + 30 + (i % 60))
        for i, s in enumerate(running)
    ]
    rows += [
        training_row(fake_submission(sim_url), len(running) + i, now=now, finished=True)
        for i in range(finished)
    ]
    db_path = workdir / f"{name}.db"
    t0 = time.monotonic()
    seed_database(db_path, rows)
    say(f"  seeded {len(rows)} trainings in {time.monotonic() - t0:.1f} s")
    del rows
    config, metrics_port = simulator_config(workdir, name, db_path=db_path, sim_url=sim_url)
    daemon, ready = await start_daemon(children, config, name, metrics_port, timeout=600)
    at_ready = memory_kib(daemon.pid)
    say(f"  READY after {ready:.1f} s; idle {idle:.0f} s")
    samples = []
    t_end = time.monotonic() + idle
    while time.monotonic() < t_end:
        await trio.sleep(min(5.0, max(0.0, t_end - time.monotonic())))
        samples.append(memory_kib(daemon.pid)["VmRSS"])
    final = memory_kib(daemon.pid)
    children.stop(daemon)
    return {
        "trainings": len(running) + finished,
        "finished": finished,
        "running": len(running),
        "seconds_to_ready": ready,
        "db_megabytes": db_path.stat().st_size / 2**20,
        "rss_mb_at_ready": at_ready["VmRSS"] / 1024,
        "rss_mb_idle": final["VmRSS"] / 1024,
        "rss_anon_mb_idle": final["RssAnon"] / 1024,
        "peak_rss_mb": final["VmHWM"] / 1024,
        "rss_mb_samples": [s / 1024 for s in samples],
    }


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {"idle_seconds": args.idle}
    small, large = args.small, args.large
    with Children(workdir) as children:
        _sim, sim_url = await start_simulator(children, run_seconds=3600, faults=["never_finish=1"])
        say(f"submitting {large // 10} never-finishing trainings to the simulator")
        running = await submit_to_simulator(sim_url, large // 10)
        few = running[: small // 10]
        cases = [
            ("empty", [], 0),
            (f"{small // 1000}k", few, small - len(few)),
            (f"{large // 1000}k", running, large - len(running)),
            (f"{large // 1000}k-{len(few)}-running", few, large - len(few)),
        ]
        for name, run, fin in cases:
            say(f"case {name}: {len(run)} running, {fin} finished")
            figures[name] = await measure(children, workdir, name, run, fin, sim_url, args.idle)
            say(f"  idle VmRSS {figures[name]['rss_mb_idle']:.1f} MB")
    k_small, k_large, k_fin = (name for name, _, _ in cases[1:])
    figures["growth_finished_only_mb"] = (
        figures[k_fin]["rss_mb_idle"] - figures[k_small]["rss_mb_idle"]
    )
    figures["ratio_large_to_small"] = (
        figures[k_large]["rss_mb_idle"] / figures[k_small]["rss_mb_idle"]
    )
    figures["ratio_finished_only"] = figures[k_fin]["rss_mb_idle"] / figures[k_small]["rss_mb_idle"]
    figures["cases"] = ["empty", k_small, k_large, k_fin]
    figures["targets"] = {
        "rss_mb_below_at_large": 150.0,
        "met": figures[k_large]["rss_mb_idle"] < 150.0,
        "no_growth_with_finished": "compare growth_finished_only_mb with 0",
    }
    return figures


def report(f: dict[str, Any]) -> None:
    print()
    print(f"memory (VmRSS after READY + {f['idle_seconds']:.0f} s idle)")
    for name in f["cases"]:
        c = f[name]
        print(
            f"  {name:<18} {c['trainings']:>7} trainings ({c['running']:>6} running): "
            f"VmRSS {c['rss_mb_idle']:6.1f} MB (anon {c['rss_anon_mb_idle']:6.1f}), peak "
            f"{c['peak_rss_mb']:6.1f} MB, at READY {c['rss_mb_at_ready']:6.1f} MB; READY after "
            f"{c['seconds_to_ready']:.1f} s; database {c['db_megabytes']:.0f} MB"
        )
    large = f["cases"][2]
    print(
        f"  {large}: {f[large]['rss_mb_idle']:.1f} MB (target < 150 MB); ratio to "
        f"{f['cases'][1]}: {f['ratio_large_to_small']:.2f}"
    )
    print(
        f"  growth from finished trainings alone ({f['cases'][1]} -> {f['cases'][3]}): "
        f"{f['growth_finished_only_mb']:+.1f} MB (ratio {f['ratio_finished_only']:.2f}; target: none)"
    )


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds idle after READY")


if __name__ == "__main__":
    run_main(__doc__, options, bench, report, "bench-memory-")
