"""Each guard layer alone (the others turned off) recovers what it is meant to recover."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import daemon_settings
from trainguard import actions
from trainguard import fal as fal_mod
from trainguard.config import Settings
from trainguard.plugins.manager import build_manager
from trainguard.reconcile import Reconciler
from trainguard.store import TERMINAL, TrainingView, open_store
from trainguard.supervisor import Daemon
from trainguard.testing.demo import compare_with_truth, submit_until_accepted
from trainguard.testing.simulator import Simulator


async def start(nursery: trio.Nursery, settings: Settings) -> Daemon:
    daemon = Daemon(settings, pm=build_manager(entry_points=False))
    await nursery.start(daemon.run)
    return daemon


async def submit(
    settings: Settings,
    fal: Any,
    reconciler: Reconciler,
    n: int = 3,
    outcome: str = "ok",
    ttype: str = "portrait",
) -> list[str]:
    ids = []
    for i in range(n):
        arguments = actions.training_arguments(
            settings,
            ttype,
            f"https://example.invalid/u{i}.zip",
            f"u{i} person",
            {"sim_outcome": outcome},
        )
        view = await submit_until_accepted(
            settings,
            fal,
            reconciler,
            training_type=ttype,
            name=f"u{i}",
            arguments=arguments,
            trigger=f"u{i} person",
        )
        ids.append(view.request_id)
    return ids


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.05)


async def finished(daemon: Daemon, ids: list[str]) -> list[TrainingView]:
    assert daemon.store is not None
    views = [await daemon.store.training(rid) for rid in ids]
    return [v for v in views if v is not None and v.status in TERMINAL]


async def run_alone(
    nursery: trio.Nursery,
    tmp_path: Path,
    url: str,
    sim: Simulator,
    only: tuple[str, ...],
    n: int = 3,
    layers: dict[str, dict[str, Any]] | None = None,
    **kw: Any,
) -> tuple[Daemon, list[TrainingView]]:
    settings = daemon_settings(tmp_path / "db.sqlite", sim, only=only, layers=layers, url=url)
    daemon = await start(nursery, settings)
    assert daemon.fal is not None and daemon.reconciler is not None
    ids = await submit(settings, daemon.fal, daemon.reconciler, n, **kw)

    async def done() -> bool:
        return len(await finished(daemon, ids)) == len(ids)

    await wait_for(done)
    return daemon, await finished(daemon, ids)


async def test_webhook_alone(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, database_url: str
) -> None:
    daemon, views = await run_alone(nursery, tmp_path, database_url, sim, ("webhook",))
    assert {(v.status, v.result_layer, v.is_fallback) for v in views} == {
        ("COMPLETED", "webhook", False)
    }
    for v in views:
        assert v.lora_url == sim.truth[v.request_id].output["diffusers_lora_file"]["url"]  # type: ignore[index]
    assert b'trainguard_results_recovered_total{layer="webhook"} 3.0' in daemon.metrics.render()
    assert b'trainguard_webhooks_received_total{outcome="accepted"} 3.0' in daemon.metrics.render()


async def test_poller_alone_recovers_dropped_webhooks(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, database_url: str
) -> None:
    sim.faults.drop_webhook = 1.0
    _, views = await run_alone(nursery, tmp_path, database_url, sim, ("poller",))
    assert {(v.status, v.result_layer) for v in views} == {("COMPLETED", "poller")}
    assert all(v.progress == 100 and v.config_url for v in views)


async def test_delayed_alone_works_without_the_poller(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, database_url: str
) -> None:
    sim.faults.drop_webhook = 1.0
    _, views = await run_alone(nursery, tmp_path, database_url, sim, ("delayed",))
    assert {(v.status, v.result_layer) for v in views} == {("COMPLETED", "delayed")}


async def test_startup_alone_recovers_what_finished_while_down(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, database_url: str
) -> None:
    settings = daemon_settings(tmp_path / "db.sqlite", sim, url=database_url, only=("startup",))
    async with actions.fal_client(settings) as fal, open_store(settings.database["url"]) as store:
        ids = await submit(settings, fal, Reconciler(store, settings), 3)
    await trio.sleep(1.0)  # they finish at FAL while no daemon runs; their webhooks find no one
    daemon = await start(nursery, settings)
    views = await finished(daemon, ids)  # READY means the startup sweep is done
    assert len(views) == 3
    assert {(v.status, v.result_layer) for v in views} == {("COMPLETED", "startup")}


async def test_emergency_alone_applies_a_marked_fallback(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, database_url: str
) -> None:
    _, views = await run_alone(
        nursery,
        tmp_path,
        database_url,
        sim,
        ("emergency",),
        n=1,
        outcome="never",
        layers={"emergency": {"deadline_seconds": 1.0}},
    )
    (v,) = views
    assert v.status == "COMPLETED" and v.is_fallback and v.result_layer is None
    assert (v.fallback_layer, v.fallback_kind) == ("emergency", "deadline")
    assert v.lora_url == "https://emergency.fallback.invalid/lora/u0.safetensors"
    assert v.trigger_phrase == "u0 person"


async def test_completeness_upgrades_a_fallback_and_probes_the_lora(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, database_url: str
) -> None:
    # payload_error spoils the webhook only: the webhook layer applies a fallback, and the
    # completeness layer later finds the real result at FAL and upgrades it.
    daemon, views = await run_alone(
        nursery,
        tmp_path,
        database_url,
        sim,
        ("webhook", "completeness"),
        n=1,
        outcome="payload_error",
    )
    (v,) = views
    assert daemon.store is not None

    async def upgraded() -> bool:
        view = await daemon.store.training(v.request_id)  # type: ignore[union-attr]
        return view is not None and not view.is_fallback and view.lora_available is True

    await wait_for(upgraded)
    final = await daemon.store.training(v.request_id)
    assert final is not None and final.result_layer == "completeness"
    kinds = [e["kind"] for e in await daemon.store.events(v.request_id)]
    assert kinds[-2:] == ["fallback", "upgrade"]
    assert (
        b'trainguard_fallbacks_upgraded_total{layer="completeness"} 1.0' in daemon.metrics.render()
    )


async def test_fallback_mode_fail(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, database_url: str
) -> None:
    settings = daemon_settings(
        tmp_path / "db.sqlite",
        sim,
        url=database_url,
        only=("webhook",),
        extra={"fallback": {"mode": "fail"}},
    )
    daemon = await start(nursery, settings)
    assert daemon.fal is not None and daemon.reconciler is not None
    ids = await submit(settings, daemon.fal, daemon.reconciler, 1, outcome="fail")

    async def done() -> bool:
        return len(await finished(daemon, ids)) == 1

    await wait_for(done)
    (v,) = await finished(daemon, ids)
    assert (v.status, v.lora_url, v.is_fallback, v.fallback_kind) == (
        "FAILED",
        None,
        True,
        "fal_failure",
    )


async def test_all_layers_under_a_fault_mix(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, database_url: str
) -> None:
    sim.faults.drop_webhook = 0.3
    sim.faults.duplicate_webhook = 0.2
    sim.faults.bad_signature = 0.1
    sim.faults.api_error_rate = 0.1
    settings = daemon_settings(tmp_path / "db.sqlite", sim, url=database_url)
    daemon = await start(nursery, settings)
    assert daemon.fal is not None and daemon.reconciler is not None and daemon.store is not None
    ids = []
    for outcome, n in (("ok", 12), ("fail", 2), ("no_lora", 2), ("payload_error", 2)):
        ids += await submit(
            settings, daemon.fal, daemon.reconciler, n, outcome=outcome, ttype="fast"
        )

    async def settled() -> bool:
        report = await compare_with_truth(daemon.store, [sim.truth[r] for r in ids])  # type: ignore[arg-type]
        return not report.problems

    await wait_for(settled, timeout=30)
    report = await compare_with_truth(daemon.store, [sim.truth[r] for r in ids])
    assert report.problems == []
    assert report.double_transitions == []


# -- issue 8 ---------------------------------------------------------------------------------
def _calls(sim: Simulator, route: str) -> int:
    return sum(n for (r, _), n in sim.stats.items() if r == route)


@pytest.mark.parametrize("wording", ["in_progress", "not_completed", "not_found", "bare_422"])
async def test_startup_concludes_no_failure_from_any_not_ready_answer(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, wording: str, database_url: str
) -> None:
    sim.faults.not_ready_answer = wording
    sim.faults.drop_webhook = 1.0
    settings = daemon_settings(tmp_path / "db.sqlite", sim, url=database_url, only=("startup",))
    async with actions.fal_client(settings) as fal, open_store(settings.database["url"]) as store:
        reconciler = Reconciler(store, settings)
        done = await submit(settings, fal, reconciler, 1)
        failed = await submit(settings, fal, reconciler, 1, outcome="error500")
        await trio.sleep(1.0)  # these two finish at FAL while no daemon runs
        sim.config.run_seconds = 60.0
        running = await submit(settings, fal, reconciler, 3)
    before = {route: _calls(sim, route) for route in ("status", "result")}
    daemon = await start(nursery, settings)  # READY: the startup sweep is done
    assert daemon.store is not None
    for rid in running:
        view = await daemon.store.training(rid)
        assert view is not None and view.status in ("SUBMITTED", "IN_QUEUE", "IN_PROGRESS"), view
        assert not view.is_fallback and view.failure_detail is None
        kinds = {e["kind"] for e in await daemon.store.events(rid)}
        assert "fallback" not in kinds
    (ok,) = await finished(daemon, done)
    assert (ok.status, ok.result_layer, ok.is_fallback) == ("COMPLETED", "startup", False)
    (bad,) = await finished(daemon, failed)  # certainly final: COMPLETED, then its 500
    assert (bad.fallback_layer, bad.fallback_kind) == ("startup", "fal_failure")
    assert bad.failure_detail and "CUDA" in bad.failure_detail
    status_calls = _calls(sim, "status") - before["status"]
    result_calls = _calls(sim, "result") - before["result"]
    # The failed one (its COMPLETED status, seeded, carries no error): result, status, result.
    if wording == "in_progress":  # the wording seen in practice: the others one call each
        assert (result_calls, status_calls) == (6, 1)
    else:  # any other not-ready answer: the status is asked before deciding
        assert (result_calls, status_calls) == (6, 4)


@pytest.mark.parametrize("outcome", ["error500", "typed_error", "fail"])
async def test_a_finished_requests_error_fails_it_at_once_not_at_the_deadline(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, outcome: str, database_url: str
) -> None:
    sim.faults.drop_webhook = 1.0
    # Four of them: about half show the error on the COMPLETED status (seeded), the others
    # only on the result, which must be enough.
    _, views = await run_alone(
        nursery,
        tmp_path,
        database_url,
        sim,
        ("poller", "emergency"),
        n=4,
        outcome=outcome,
        layers={"emergency": {"deadline_seconds": 60.0}},
    )
    for view in views:
        assert (view.status, view.fallback_layer, view.fallback_kind) == (
            "COMPLETED",
            "poller",
            "fal_failure",
        )
        assert view.completed_at is not None and view.completed_at - view.submitted_at < 10
        assert view.attempts == 0
    # At least one was judged on the result's own error ("HTTP 500: ..."), not the status's.
    details = {view.failure_detail or "" for view in views}
    assert any(detail.startswith("HTTP ") for detail in details), details


async def test_untyped_5xx_on_a_finished_result_is_retried_a_bounded_number_of_times(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, database_url: str
) -> None:
    sim.faults.drop_webhook = 1.0
    sim.faults.result_gateway_error = 1.0
    settings = daemon_settings(
        tmp_path / "db.sqlite",
        sim,
        url=database_url,
        only=("poller", "emergency"),
        extra={"fal": {"result_error_attempts": 3, "retries": 0}},
    )
    daemon = await start(nursery, settings)
    assert daemon.fal is not None and daemon.reconciler is not None and daemon.store is not None
    ids = await submit(settings, daemon.fal, daemon.reconciler, 1)

    async def done() -> bool:
        return len(await finished(daemon, ids)) == 1

    await wait_for(done)
    (view,) = await finished(daemon, ids)
    assert (view.fallback_layer, view.fallback_kind, view.result_errors) == (
        "poller",
        "result_error",
        3,
    )
    assert view.failure_detail and "(result failed 3 times)" in view.failure_detail
    assert _calls(sim, "result") == 3  # one untyped page per attempt, then judged


async def test_a_cancel_is_watched_to_its_real_end(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, database_url: str
) -> None:
    sim.config.run_seconds = 2.0
    settings = daemon_settings(
        tmp_path / "db.sqlite", sim, url=database_url, only=("webhook", "poller")
    )
    daemon = await start(nursery, settings)
    assert daemon.fal is not None and daemon.reconciler is not None and daemon.store is not None
    store, fal, reconciler = daemon.store, daemon.fal, daemon.reconciler
    queued = await submit(settings, fal, reconciler, 1)
    await actions.cancel(settings, fal, reconciler, queued[0])  # still queued: removed
    running = await submit(settings, fal, reconciler, 1)
    arguments = actions.training_arguments(
        settings, "portrait", "https://example.invalid/i.zip", "i person", {"sim_cancel": "ignore"}
    )
    view = await submit_until_accepted(
        settings,
        fal,
        reconciler,
        training_type="portrait",
        name="i0",
        arguments=arguments,
        trigger="i person",
    )
    ignoring = [view.request_id]

    async def running_at_fal() -> bool:  # the poller saw IN_PROGRESS
        views = [await store.training(rid) for rid in running + ignoring]
        return all(v is not None and v.status == "IN_PROGRESS" for v in views)

    await wait_for(running_at_fal)
    for rid in running + ignoring:
        view = await actions.cancel(settings, fal, reconciler, rid)
        assert view.cancel_requested_at is not None and view.status != "CANCELLED"
    ids = queued + running + ignoring

    async def done() -> bool:
        return len(await finished(daemon, ids)) == len(ids)

    await wait_for(done)
    for rid in queued + running:
        view = await store.training(rid)
        assert view is not None and (view.status, view.is_fallback) == ("CANCELLED", False)
    (kept,) = [await store.training(rid) for rid in ignoring]
    assert kept is not None and (kept.status, kept.is_fallback) == ("COMPLETED", False)
    assert kept.lora_url == sim.truth[kept.request_id].output["diffusers_lora_file"]["url"]  # type: ignore[index]
    result = [e for e in await store.events(kept.request_id) if e["kind"] == "result"]
    assert len(result) == 1 and result[0]["detail"]["cancel_not_honoured"] is True
    report = await compare_with_truth(store, [sim.truth[r] for r in ids])
    assert report.problems == []


async def test_a_cancel_whose_answer_was_lost_is_still_recorded_and_ends_cancelled(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, database_url: str
) -> None:
    """Seen in the chaos run: FAL removed a queued request on a cancel whose answer never
    came back (a timeout), so the retried cancel answers 404. The cancel must still be
    recorded and the training end CANCELLED (through the status), not run to the deadline."""
    sim.config.queue_seconds = 30.0
    settings = daemon_settings(
        tmp_path / "db.sqlite", sim, url=database_url, only=("webhook", "poller")
    )
    daemon = await start(nursery, settings)
    assert daemon.fal is not None and daemon.reconciler is not None and daemon.store is not None
    store, fal, reconciler = daemon.store, daemon.fal, daemon.reconciler
    (rid,) = await submit(settings, fal, reconciler, 1)
    view = await store.training(rid)
    assert view is not None and view.cancel_url
    lost = await fal.cancel(view.cancel_url)  # FAL acts on it; its answer is "lost"
    assert lost.kind == fal_mod.Kind.SUCCEEDED
    requested = await actions.cancel(settings, fal, reconciler, rid)  # the retry: 404
    assert requested.cancel_requested_at is not None

    async def cancelled() -> bool:
        now = await store.training(rid)
        return now is not None and now.status == "CANCELLED"

    await wait_for(cancelled)
    final = await store.training(rid)
    assert final is not None and not final.is_fallback


async def test_two_instances_starting_together_share_the_startup_sweep(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, database_url: str
) -> None:
    """Two instances start at the same moment on one database with a backlog finished at
    FAL while nobody ran: each training is asked about once across both sweeps (a page one
    sweep claimed is passed over by the other), and every one ends COMPLETED."""
    sim.faults.drop_webhook = 1.0
    # A slow FAL (the rate limit) keeps both sweeps running side by side.
    slow = {"fal": {"max_requests_per_second": 40.0}}
    first = daemon_settings(
        tmp_path / "db.sqlite", sim, url=database_url, only=("startup",), extra=slow
    )
    second = daemon_settings(
        tmp_path / "db.sqlite", sim, url=database_url, only=("startup",), extra=slow
    )
    async with actions.fal_client(first) as fal, open_store(first.database["url"]) as store:
        ids = await submit(first, fal, Reconciler(store, first), 60)
    await trio.sleep(1.0)  # they finish at FAL while no daemon runs
    before = _calls(sim, "result")
    daemons: list[Daemon] = []
    async with trio.open_nursery() as both:
        for settings in (first, second):
            both.start_soon(lambda s=settings: _start_into(nursery, s, daemons))
    views = await finished(daemons[0], ids)
    assert len(views) == 60
    assert {v.status for v in views} == {"COMPLETED"}
    assert _calls(sim, "result") - before == 60


async def _start_into(nursery: trio.Nursery, settings: Settings, started: list[Daemon]) -> None:
    started.append(await start(nursery, settings))
