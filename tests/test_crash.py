"""The daemon killed with SIGKILL at random moments, as a real subprocess, and restarted:
nothing is lost and nothing is applied twice."""

from __future__ import annotations

import random
from pathlib import Path

import trio

from trainguard import actions, config
from trainguard.reconcile import Reconciler
from trainguard.store import TERMINAL, open_store
from trainguard.testing.demo import (
    DEMO_KEY,
    DaemonProcess,
    compare_with_truth,
    demo_config,
    free_port,
    submit_until_accepted,
)
from trainguard.testing.simulator import Faults, SimConfig, Simulator

OUTCOMES = ["ok"] * 4 + ["fail", "no_lora"]


async def test_sigkill_at_random_moments_loses_nothing(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    sim = Simulator(
        SimConfig(
            queue_seconds=0.5,
            run_seconds=2.0,
            seed=3,
            faults=Faults(
                drop_webhook=0.3, duplicate_webhook=0.2, bad_signature=0.05, api_error_rate=0.05
            ),
            webhook_retry_delays=(0.3, 0.6, 1.2),
        )
    )
    await nursery.start(sim.serve)
    metrics_port = free_port()
    path = demo_config(
        tmp_path,
        sim,
        webhook_port=free_port(),
        metrics_port=metrics_port,
        layers={
            "poller": {
                "first_check_after_seconds": 1.0,
                "interval_seconds": 1.0,
                "max_backoff_seconds": 2.0,
            }
        },
    )
    settings = config.load(path, env={"FAL_KEY": DEMO_KEY})
    daemon = DaemonProcess(path, metrics_port, tmp_path / "daemon.log")
    rng = random.Random(11)
    await daemon.start()
    try:
        async with (
            actions.fal_client(settings) as fal,
            open_store(settings.database["url"]) as store,
        ):
            reconciler = Reconciler(store, settings)
            for crash in range(3):
                for i, outcome in enumerate(OUTCOMES):
                    name = f"c{crash}u{i}"
                    arguments = actions.training_arguments(
                        settings,
                        "portrait",
                        f"https://example.invalid/{name}.zip",
                        None,
                        {"sim_outcome": outcome},
                    )
                    await submit_until_accepted(
                        settings,
                        fal,
                        reconciler,
                        training_type="portrait",
                        name=name,
                        arguments=arguments,
                    )
                    await trio.sleep(rng.uniform(0, 0.3))
                await trio.sleep(rng.uniform(0.2, 2.5))
                daemon.kill()
                assert daemon.process is not None
                await daemon.process.wait()
                await trio.sleep(rng.uniform(0.1, 1.5))
                await daemon.start()

            with trio.fail_after(40):
                while True:
                    counts = await store.status_counts()
                    if all(status in TERMINAL for status in counts):
                        break
                    await trio.sleep(0.2)
            report = await compare_with_truth(store, list(sim.truth.values()))
    finally:
        status = await daemon.stop()
    assert report.problems == [], report.table()
    assert len(report.rows) == 3 * len(OUTCOMES)
    assert report.double_transitions == []
    assert daemon.starts == 4
    assert status == 0  # the last stop was a clean SIGTERM
