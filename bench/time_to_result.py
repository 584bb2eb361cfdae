"""Time to result: from FAL having the result to the training's row committed with it.

The simulator runs in this process (a subclass that notes the wall-clock time each webhook
delivery is sent and acknowledged); the daemon is ``python -m daemon run`` with every built-in
layer enabled. Trainings are submitted and recorded from this process the way
``trainguard submit`` does it (``daemon.actions`` / ``Reconciler.register``), so the daemon
finds them in its database. ``completed_at`` is the daemon's wall-clock time of the
transaction that stored the result (taken just before it commits).

1. Webhook delivered: send time of the delivery -> ``completed_at`` (p50, p99), and send ->
   the 200 received by the sender (the listener answers only after the row is committed, so
   this bounds the commit from above). Shipped poller timings, so the webhook does the work.
2. Webhook dropped: the simulator drops every webhook; poller ``interval_seconds`` I (4 s
   here; 60 s shipped) with ``first_check_after_seconds`` I, and the recorded ``submitted_at``
   shifted by up to I so that completion falls at a uniform phase of the polling schedule.
   FAL's completion -> ``completed_at``, as a ratio to I (expected: about 0.5 on average,
   at most 1 + jitter).
3. Outage: webhooks dropped and the queue API answering 503 (``api_down``) for 10 poll
   intervals (the shipped 10 minutes at 60 s, compressed 30x: I = 2 s, with every other
   timing compressed alike: ``max_backoff_seconds`` 30, delayed ``after_seconds`` 20,
   completeness 10 s). The trainings were submitted 12.5 shipped minutes earlier and are
   running (the delayed layer's one-off check is behind them) when FAL's API goes down; they
   complete during the outage. Time from the end of the outage to every result stored, in
   poll intervals and scaled back to shipped minutes.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from _common import (
    LAYERS,
    Children,
    count_rows,
    daemon_args,
    free_port,
    percentile,
    query,
    run_main,
    say,
    wait_http,
    write_config,
)

from trainguard import actions, config
from trainguard.reconcile import Reconciler
from trainguard.store import open_store
from trainguard.testing.simulator import Faults, SimConfig, Simulator

COMPRESSION = 30.0  # part 3: shipped timings divided by this


class TimedSimulator(Simulator):
    """The simulator, noting when each training's first webhook delivery is sent and when
    a delivery was first acknowledged (wall clock)."""

    def __init__(self, cfg: SimConfig) -> None:
        super().__init__(cfg)
        self.sent_at: dict[str, float] = {}
        self.acked_at: dict[str, float] = {}

    async def _send_webhook(self, training: Any, *args: Any, **kwargs: Any) -> bool:
        self.sent_at.setdefault(training.request_id, time.time())
        ok: bool = await super()._send_webhook(training, *args, **kwargs)
        if ok:
            self.acked_at.setdefault(training.request_id, time.time())
        return ok


def wall_offset() -> float:
    """time.time() minus trio's clock in this process (the simulator's truth is on trio's)."""
    return time.time() - trio.current_time()


@asynccontextmanager
async def daemon_for(
    children: Children,
    workdir: Path,
    name: str,
    sim: Simulator,
    layers: dict[str, dict[str, Any]],
) -> AsyncIterator[tuple[config.Settings, Any, Reconciler, Path]]:
    """A daemon on a fresh database, and this process's FAL client and reconciler on it."""
    db_path = workdir / f"{name}.db"
    metrics_port = free_port()
    path = write_config(
        workdir,
        db_path=db_path,
        queue_url=sim.base_url,
        jwks_url=sim.jwks_url,
        webhook_port=free_port(),
        metrics_port=metrics_port,
        enabled=LAYERS,
        layers=layers,
        fal={"max_requests_per_second": 1000.0},
        name=f"{name}.toml",
    )
    settings = config.load(str(path), env={"FAL_KEY": "bench"})
    async with open_store(settings.database["url"]) as store:
        pass  # create the schema before the daemon and this process both open it
    daemon = children.spawn(daemon_args(path), f"daemon-{name}")
    await wait_http(f"http://127.0.0.1:{metrics_port}/readyz", daemon)
    try:
        async with (
            actions.fal_client(settings) as fal,
            open_store(settings.database["url"]) as store,
        ):
            yield settings, fal, Reconciler(store, settings), db_path
    finally:
        children.stop(daemon)


async def submit(
    settings: config.Settings,
    fal: Any,
    reconciler: Reconciler,
    i: int,
    *,
    shift: float = 0.0,
) -> str:
    """Submit one training to FAL (the simulator) with the daemon's webhook URL and record
    it, with ``submitted_at`` moved ``shift`` seconds into the past."""
    ttype = settings.training_type("portrait")
    arguments = actions.training_arguments(
        settings, "portrait", f"https://example.invalid/{i}.zip", f"user{i} person"
    )
    submitted = await fal.submit(ttype.endpoint, arguments, settings.webhook["public_url"])
    await reconciler.register(
        name=f"user{i}",
        training_type="portrait",
        request_id=submitted.request_id,
        layer="submit",
        status_url=submitted.status_url,
        response_url=submitted.response_url,
        cancel_url=submitted.cancel_url,
        trigger_phrase=f"user{i} person",
        arguments=arguments,
        submitted_at=time.time() - shift,
    )
    return submitted.request_id


async def wait_stored(db_path: Path, ids: list[str], timeout: float) -> dict[str, tuple[Any, ...]]:
    """Poll until every training in ``ids`` is finished; (completed_at, result_layer,
    is_fallback) by request id."""
    marks = ",".join("?" * len(ids))
    sql = (
        "SELECT request_id, completed_at, result_layer, is_fallback FROM trainings "
        f"WHERE request_id IN ({marks}) AND status IN ('COMPLETED', 'FAILED', 'CANCELLED')"
    )
    with trio.move_on_after(timeout):
        while True:
            rows = query(db_path, sql, *ids)
            if len(rows) == len(ids):
                break
            await trio.sleep(0.1)
    return {r[0]: r[1:] for r in rows}


def summary(values: list[float], scale: float = 1.0) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50) / scale,
        "p99": percentile(values, 99) / scale,
        "max": max(values) / scale if values else float("nan"),
    }


async def part_webhook(
    children: Children, workdir: Path, sim: TimedSimulator, n: int
) -> dict[str, Any]:
    sim.faults.drop_webhook = 0.0
    sim.faults.api_down = False
    async with daemon_for(children, workdir, "webhook", sim, {}) as (s, fal, rec, db):
        ids = []
        for i in range(n):
            ids.append(await submit(s, fal, rec, i))
            await trio.sleep(0.1)
        stored = await wait_stored(db, ids, 60)
    layers = {v[1] for v in stored.values()}
    delays = [stored[r][0] - sim.sent_at[r] for r in ids if r in stored and r in sim.sent_at]
    acks = [sim.acked_at[r] - sim.sent_at[r] for r in ids if r in sim.acked_at]
    return {
        "trainings": n,
        "stored": len(stored),
        "result_layers": sorted(str(x) for x in layers),
        "sent_to_completed_at_ms": summary([1000 * d for d in delays]),
        "sent_to_200_received_ms": summary([1000 * d for d in acks]),
    }


async def part_dropped(
    children: Children, workdir: Path, sim: TimedSimulator, n: int, interval: float
) -> dict[str, Any]:
    sim.faults.drop_webhook = 1.0
    sim.faults.api_down = False
    layers = {"poller": {"interval_seconds": interval, "first_check_after_seconds": interval}}
    rng = random.Random(5)
    async with daemon_for(children, workdir, "dropped", sim, layers) as (s, fal, rec, db):
        ids = []
        for i in range(n):
            ids.append(await submit(s, fal, rec, 10_000 + i, shift=rng.uniform(0, interval)))
            await trio.sleep(0.05)
        stored = await wait_stored(db, ids, 30 * interval)
    offset = wall_offset()
    delays = []
    for r in ids:
        truth = sim.truth[r]
        if r in stored and truth.completed_at is not None:
            delays.append(stored[r][0] - (truth.completed_at + offset))
    return {
        "trainings": n,
        "stored": len(stored),
        "poll_interval_seconds": interval,
        "result_layers": sorted({str(v[1]) for v in stored.values()}),
        "fallbacks": sum(1 for v in stored.values() if v[2]),
        "completed_to_stored_seconds": summary(delays),
        "completed_to_stored_in_intervals": summary(delays, interval),
    }


async def part_outage(
    children: Children,
    workdir: Path,
    sim: TimedSimulator,
    n: int,
    intervals: int,
    name: str,
) -> dict[str, Any]:
    interval = 60.0 / COMPRESSION
    layers = {
        "poller": {
            "interval_seconds": interval,
            "first_check_after_seconds": 90.0 / COMPRESSION,
            "max_backoff_seconds": 900.0 / COMPRESSION,
        },
        "delayed": {"after_seconds": 600.0 / COMPRESSION, "verify_after_seconds": 60 / COMPRESSION},
        "completeness": {"interval_seconds": 300.0 / COMPRESSION},
        "emergency": {"deadline_seconds": 21600.0 / COMPRESSION},
    }
    sim.faults.drop_webhook = 1.0
    sim.faults.api_down = False
    sim.config.run_seconds = 6.0  # completion falls inside the outage
    async with daemon_for(children, workdir, name, sim, layers) as (s, fal, rec, db):
        # Trainings submitted a while ago (shipped: 12.5 min), still running: the delayed
        # layer's one-off check is done, the poller checks them every interval.
        shift = 750.0 / COMPRESSION
        base = 20_000 + 1000 * int(name.rpartition("-")[2])
        ids = [await submit(s, fal, rec, base + i, shift=shift) for i in range(n)]
        marks = ",".join("?" * len(ids))
        with trio.move_on_after(30):
            while count_rows(
                db,
                f"trainings WHERE request_id IN ({marks}) "
                "AND delayed_check_at IS NULL AND last_checked_at IS NOT NULL",
                *ids,
            ) < len(ids):
                await trio.sleep(0.1)
        refused0 = sum(n for (route, code), n in sim.stats.items() if code == 503)
        sim.faults.api_down = True
        down_at = time.time()
        say(f"  FAL's queue API down for {intervals} poll intervals ({intervals * interval:.0f} s)")
        await trio.sleep(intervals * interval)
        sim.faults.api_down = False
        up_at = time.time()
        refused = sum(n for (route, code), n in sim.stats.items() if code == 503) - refused0
        stored = await wait_stored(db, ids, 60 * interval)
        errors = count_rows(db, f"events WHERE kind = 'error' AND request_id IN ({marks})", *ids)
    sim.config.run_seconds = 2.0
    last = max((v[0] for v in stored.values()), default=float("nan"))
    after_up = [v[0] - up_at for v in stored.values()]
    offset = wall_offset()
    done = sum(
        1
        for r in ids
        if (at := sim.truth[r].completed_at) is not None and down_at <= at + offset <= up_at
    )
    return {
        "trainings": n,
        "completed_at_fal_during_outage": done,
        "stored": len(stored),
        "fallbacks": sum(1 for v in stored.values() if v[2]),
        "result_layers": sorted({str(v[1]) for v in stored.values()}),
        "poll_interval_seconds": interval,
        "outage_intervals": intervals,
        "error_events": errors,
        "fal_calls_refused_per_second_during_outage": refused / (up_at - down_at),
        "outage_end_to_all_stored_seconds": last - up_at,
        "outage_end_to_all_stored_intervals": (last - up_at) / interval,
        "outage_end_to_all_stored_shipped_minutes": (last - up_at) * COMPRESSION / 60,
        "outage_start_to_all_stored_intervals": (last - down_at) / interval,
        "outage_end_to_stored_in_intervals": summary(after_up, interval),
    }


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    if "_send_webhook" not in vars(Simulator):
        raise SystemExit("daemon.simulator.Simulator._send_webhook is gone: update TimedSimulator")
    figures: dict[str, Any] = {}
    sim = TimedSimulator(SimConfig(queue_seconds=0.5, run_seconds=2.0, seed=11, faults=Faults()))
    with Children(workdir) as children:
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.serve)
            say(f"1. webhook delivered: {args.trainings} trainings, 10 per second")
            figures["webhook"] = await part_webhook(children, workdir, sim, args.trainings)
            w = figures["webhook"]["sent_to_completed_at_ms"]
            say(f"  send -> completed_at p50 {w['p50']:.1f} ms, p99 {w['p99']:.1f} ms")
            say(f"2. webhook dropped: {args.trainings} trainings, poll interval {args.interval} s")
            figures["dropped"] = await part_dropped(
                children, workdir, sim, args.trainings, args.interval
            )
            d = figures["dropped"]["completed_to_stored_in_intervals"]
            say(f"  p50 {d['p50']:.2f}, p99 {d['p99']:.2f}, max {d['max']:.2f} poll intervals")
            for k in range(args.outage_repeats):
                say(f"3. outage ({k + 1}/{args.outage_repeats}): {args.outage_trainings} trainings")
                o = await part_outage(
                    children,
                    workdir,
                    sim,
                    args.outage_trainings,
                    args.outage_intervals,
                    f"outage-{k}",
                )
                figures[f"outage_{k}"] = o
                say(
                    f"  all stored {o['outage_end_to_all_stored_intervals']:.1f} intervals after "
                    "FAL came back"
                )
            figures["outage_worst_end_to_all_stored_intervals"] = max(
                figures[f"outage_{k}"]["outage_end_to_all_stored_intervals"]
                for k in range(args.outage_repeats)
            )
            nursery.cancel_scope.cancel()
    return figures


def report(f: dict[str, Any]) -> None:
    w, d = f["webhook"], f["dropped"]
    print()
    print("time to result")
    a, b = w["sent_to_completed_at_ms"], w["sent_to_200_received_ms"]
    print(
        f"  1. webhook: send -> completed_at p50 {a['p50']:.1f} ms, p99 {a['p99']:.1f} ms, "
        f"max {a['max']:.1f} ms; send -> 200 received p50 {b['p50']:.1f} ms, p99 {b['p99']:.1f} ms "
        f"({w['stored']}/{w['trainings']} stored, by {', '.join(w['result_layers'])})"
    )
    s, r = d["completed_to_stored_seconds"], d["completed_to_stored_in_intervals"]
    print(
        f"  2. dropped webhook, poll interval {d['poll_interval_seconds']:.0f} s: FAL done -> "
        f"stored p50 {s['p50']:.2f} s ({r['p50']:.2f} intervals), p99 {s['p99']:.2f} s "
        f"({r['p99']:.2f}), max {r['max']:.2f} intervals ({d['stored']}/{d['trainings']} stored, "
        f"by {', '.join(d['result_layers'])}, {d['fallbacks']} fallbacks)"
    )
    for key in sorted(k for k in f if k.startswith("outage_") and k[7:].isdigit()):
        o = f[key]
        print(
            f"  3. outage of {o['outage_intervals']} poll intervals ({o['poll_interval_seconds']:.0f} s "
            f"each, {COMPRESSION:.0f}x compressed): all {o['stored']}/{o['trainings']} stored "
            f"{o['outage_end_to_all_stored_seconds']:.1f} s after FAL came back = "
            f"{o['outage_end_to_all_stored_intervals']:.1f} intervals (~"
            f"{o['outage_end_to_all_stored_shipped_minutes']:.1f} min at shipped timings; p50 "
            f"{o['outage_end_to_stored_in_intervals']['p50']:.1f} intervals); "
            f"{o['completed_at_fal_during_outage']} completed at FAL during the outage; "
            f"{o['fallbacks']} fallbacks; by {', '.join(o['result_layers'])}; FAL calls during "
            f"the outage {o['fal_calls_refused_per_second_during_outage']:.1f}/s"
        )


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trainings", type=int, default=200, help="for parts 1 and 2")
    parser.add_argument("--interval", type=float, default=4.0, help="poll interval of part 2")
    parser.add_argument("--outage-trainings", type=int, default=100)
    parser.add_argument("--outage-intervals", type=int, default=10)
    parser.add_argument("--outage-repeats", type=int, default=2, help="the phase varies")


if __name__ == "__main__":
    run_main(__doc__, options, bench, report, "bench-ttr-")
