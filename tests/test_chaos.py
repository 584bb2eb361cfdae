"""Issue 4, "prove it": the daemon as a real subprocess against the simulator under chaos.

Three runs, each ending with the simulator's own record of the truth compared with the
daemon's database (``compare_with_truth``: final states, the event history, and every
webhook delivery attempt against the stored receipts):

1. 500 trainings under a fault mix (webhooks dropped, duplicated, badly signed, reordered;
   API errors (429, untyped gateway pages) and timeouts; failed trainings, final 500s and
   typed errors on finished requests, results without their LoRA, trainings that never
   finish; ambiguous "not ready" answers; cancels of queued and running requests, some
   of which finish anyway) with the daemon SIGKILLed five times and restarted.
2. FAL's key server (JWKS) down for a while, longer than the daemon's key cache lasts, with
   one SIGKILL in the middle: webhooks acknowledged meanwhile are all verified and applied.
3. FAL's queue API down (and no webhook at all) for several poll intervals: everything is
   recovered once it is back, without a single fallback.

A last, instant test checks that the webhook audit does flag what it is meant to flag.
Run with ``pytest -s`` to see the summary table of each run.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from trainguard import actions, config
from trainguard.errors import StoreError
from trainguard.fal import FalClient, RateLimiter
from trainguard.reconcile import Reconciler
from trainguard.store import TERMINAL, Store, open_store
from trainguard.testing.demo import (
    DEMO_KEY,
    TYPES,
    DaemonProcess,
    Report,
    StoredReceipt,
    audit_webhooks,
    compare_with_truth,
    demo_config,
    free_port,
    submit_until_accepted,
)
from trainguard.testing.simulator import Delivery, Faults, SimConfig, Simulator

#: The daemon's time limit for one FAL call, and how long a "timing out" call hangs.
FAL_TIMEOUT_SECONDS = 1.0
API_TIMEOUT_SECONDS = 1.5
#: Compressed like the demo: fal retries a webhook 10 times over ~2 h, here 5 over ~15 s.
WEBHOOK_RETRIES = (0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class Client:
    """A simulator in the test's nursery and the test's own store, reconciler and FAL
    client to submit trainings the way `trainguard submit` does (one daemon or several)."""

    sim: Simulator
    settings: config.Settings
    store: Store
    reconciler: Reconciler
    fal: FalClient

    async def submit(self, i: int, outcome: str, **extra: str) -> str:
        ttype = TYPES[i % len(TYPES)]
        name = f"t{i:03d}"
        arguments = actions.training_arguments(
            self.settings,
            ttype,
            f"https://example.invalid/{name}.zip",
            f"{name} person",
            {"sim_outcome": outcome, **extra},
        )
        view = await submit_until_accepted(
            self.settings,
            self.fal,
            self.reconciler,
            training_type=ttype,
            name=name,
            arguments=arguments,
            trigger=f"{name} person",
        )
        return view.request_id

    async def cancel(self, request_id: str) -> None:
        """Ask for a cancel the way `trainguard cancel` does, until FAL gives an answer (and
        the database takes it: a restarted PostgreSQL fails a call or two, StoreError)."""
        while True:
            try:
                await actions.cancel(self.settings, self.fal, self.reconciler, request_id)
                return
            except (actions.Unavailable, StoreError):
                await trio.sleep(0.2)
            except actions.Conflict:  # finished at FAL (or here) before the cancel: no cancel
                return

    async def wait_until_finished(self, count: int, timeout: float) -> None:
        with trio.fail_after(timeout):
            while True:
                try:
                    counts = await self.store.status_counts()
                except StoreError:  # a restarted PostgreSQL: the store reconnects
                    counts = {}
                if sum(counts.values()) == count and all(s in TERMINAL for s in counts):
                    return
                await trio.sleep(0.5)


@dataclass
class Harness(Client):
    """The client and one daemon subprocess."""

    daemon: DaemonProcess = field(kw_only=True)

    async def crash_and_restart(self, down_seconds: float) -> None:
        """SIGKILL, wait for it to be gone, stay down a while, start (until READY)."""
        self.daemon.kill()
        assert self.daemon.process is not None
        await self.daemon.process.wait()
        await trio.sleep(down_seconds)
        await self.daemon.start()

    async def stop_and_compare(self) -> Report:
        """Stop the daemon cleanly (no webhook is acknowledged after this), then compare
        everything with the simulator's truth and delivery log."""
        assert await self.daemon.stop() == 0
        report = await compare_with_truth(
            self.store, list(self.sim.truth.values()), list(self.sim.deliveries)
        )
        report.restarts = self.daemon.starts - 1
        return report


@asynccontextmanager
async def harness(
    nursery: trio.Nursery,
    tmp_path: Path,
    sim_config: SimConfig,
    *,
    layers: Mapping[str, Mapping[str, Any]],
    tables: Mapping[str, Mapping[str, Any]] | None = None,
) -> AsyncIterator[Harness]:
    sim = Simulator(sim_config)
    await nursery.start(sim.serve)
    metrics_port = free_port()
    path = demo_config(
        tmp_path,
        sim,
        webhook_port=free_port(),
        metrics_port=metrics_port,
        layers=layers,
        tables={"fal": {"timeout_seconds": FAL_TIMEOUT_SECONDS}, **(tables or {})},
    )
    settings = config.load(path, env={"FAL_KEY": DEMO_KEY})
    daemon = DaemonProcess(path, metrics_port, tmp_path / "daemon.log")
    # The test's own client waits out a hanging call: a submit that timed out on our side
    # may still create a training at the simulator, which nobody would then be tracking.
    fal = FalClient(
        queue_url=settings.fal["queue_url"],
        key=DEMO_KEY,
        rate_limiter=RateLimiter(settings.fal["max_requests_per_second"]),
        timeout=API_TIMEOUT_SECONDS + 2.0,
    )
    async with fal, open_store(settings.database["url"]) as store:
        await daemon.start()
        try:
            yield Harness(sim, settings, store, Reconciler(store, settings), fal, daemon=daemon)
        finally:
            await daemon.stop()


def show(title: str, report: Report) -> None:
    print(f"\n== {title} ==\n{report.summary()}\n{report.verdict()}")


# -- 1. 500 trainings, a fault mix, five SIGKILLs --------------------------------------------
TRAININGS = 500
# 2% each, 1% never; the rest "ok". error500: the app's own 500 {"detail"} on the result;
# typed_error: fal's typed 504 (X-Fal-Error-Type); both final once COMPLETED (fal-api.md).
EXACT_OUTCOMES = {"fail": 10, "error500": 10, "typed_error": 10, "no_lora": 10, "never": 5}
EXPECTED_FALLBACKS = {
    "fail": "fal_failure",
    "error500": "fal_failure",
    "typed_error": "fal_failure",
    "no_lora": "no_artifact",
    "never": "deadline",
}
# Of the "ok" ones: cancelled while queued (removed), while running (the app stops), and
# while running by an app that ignores the signal and finishes anyway (a real result).
CANCEL_QUEUED, CANCEL_RUNNING, CANCEL_IGNORED = 8, 8, 12
KILLS = 5
DEADLINE_SECONDS = 30.0


@dataclass
class Plan:
    """What each of the ``TRAININGS`` trainings will do at FAL, and which ones are cancelled."""

    outcomes: list[str]
    cancel_at: dict[int, float]
    """Index -> seconds after its submit when its cancel is asked for."""
    ignores: set[int]
    """Indexes whose app ignores the cancel and finishes anyway."""


def fault_plan(rng: random.Random) -> Plan:
    """The outcomes (``EXACT_OUTCOMES``, the rest "ok") in a random order, and the cancels."""
    outcomes = [o for o, n in EXACT_OUTCOMES.items() for _ in range(n)]
    outcomes += ["ok"] * (TRAININGS - len(outcomes))
    rng.shuffle(outcomes)
    ok = [i for i, o in enumerate(outcomes) if o == "ok"]
    picked = rng.sample(ok, CANCEL_QUEUED + CANCEL_RUNNING + CANCEL_IGNORED)
    cancel_at = {i: 0.0 for i in picked[:CANCEL_QUEUED]}
    cancel_at |= {i: 1.6 for i in picked[CANCEL_QUEUED:]}  # 1 s queued + 2 s running
    ignores = set(picked[CANCEL_QUEUED + CANCEL_RUNNING :])
    return Plan(outcomes, cancel_at, ignores)


async def submit_planned(client: Client, plan: Plan, i: int, limiter: trio.CapacityLimiter) -> None:
    """Submit training ``i`` of ``plan`` (at most ``limiter`` at once) and cancel it if planned."""
    async with limiter:
        extra = {"sim_cancel": "ignore"} if i in plan.ignores else {}
        rid = await client.submit(i, plan.outcomes[i], **extra)
    if i in plan.cancel_at:
        await trio.sleep(plan.cancel_at[i])
        await client.cancel(rid)


def fault_mix(seed: int) -> SimConfig:
    """The simulator under the whole fault mix (the module doc's first run)."""
    return SimConfig(
        queue_seconds=1.0,
        run_seconds=2.0,
        seed=seed,
        faults=Faults(
            drop_webhook=0.3,
            duplicate_webhook=0.1,
            bad_signature=0.05,
            delay_webhook_seconds=2.0,
            api_error_rate=0.1,
            api_timeout_rate=0.02,
            api_timeout_seconds=API_TIMEOUT_SECONDS,
            not_ready_answer="mixed",  # fal documents no wording for "not ready yet"
            gateway_id_header=0.2,
        ),
        webhook_retry_delays=WEBHOOK_RETRIES,
    )


#: The layers' timings of the fault-mix run (compressed like the demo).
FAULT_MIX_LAYERS: Mapping[str, Mapping[str, Any]] = {
    "poller": {
        "first_check_after_seconds": 1.0,
        "interval_seconds": 1.0,
        "max_backoff_seconds": 2.0,
        "concurrency": 16,
    },
    "startup": {"concurrency": 16},
    "delayed": {"after_seconds": 8.0, "verify_after_seconds": 2.0},
    "completeness": {"interval_seconds": 4.0},
    "emergency": {"deadline_seconds": DEADLINE_SECONDS},
}


@pytest.mark.slow  # ~45 s; not deselected by default: CI runs it
async def test_500_trainings_under_faults_and_sigkills(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    rng = random.Random(4)
    plan = fault_plan(rng)
    async with harness(nursery, tmp_path, fault_mix(4), layers=FAULT_MIX_LAYERS) as h:
        submitters = trio.CapacityLimiter(4)

        async def crash_at_random_moments() -> None:
            for _ in range(KILLS):
                await trio.sleep(rng.uniform(1.0, 4.0))
                await h.crash_and_restart(rng.uniform(0.1, 1.5))

        async with trio.open_nursery() as chaos:
            chaos.start_soon(crash_at_random_moments)
            async with trio.open_nursery() as submissions:
                for i in range(TRAININGS):
                    submissions.start_soon(submit_planned, h, plan, i, submitters)
                    await trio.sleep(0.02)
        # The last "never" training ends at its deadline, at most DEADLINE_SECONDS from now.
        await h.wait_until_finished(TRAININGS, timeout=DEADLINE_SECONDS + 30.0)
        report = await h.stop_and_compare()
    show("500 trainings, fault mix, 5 SIGKILLs", report)

    assert report.problems == [], "\n".join(report.problems[:50])
    truths = Counter(t.outcome for _, t, _ in report.rows)
    cancelled = truths.pop("cancelled", 0)
    assert truths == {**EXACT_OUTCOMES, "ok": TRAININGS - sum(EXACT_OUTCOMES.values()) - cancelled}
    assert report.double_transitions == []
    assert report.restarts == KILLS
    # The cancels really happened, each kind of them.
    finished_anyway = [t for _, t, _ in report.rows if t.cancel_ignored]
    assert cancelled >= CANCEL_QUEUED and finished_anyway
    assert all(t.outcome == "ok" for t in finished_anyway)
    for view, truth, _ in report.rows:
        assert view is not None
        if truth.cancel_requested:
            assert view.cancel_requested_at is not None, view
        if truth.outcome == "ok":
            assert not view.is_fallback and view.result_layer, view
        elif truth.outcome == "cancelled":
            assert (view.status, view.is_fallback) == ("CANCELLED", False), view
        else:
            assert (view.fallback_kind, bool(view.fallback_reason)) == (
                EXPECTED_FALLBACKS[truth.outcome],
                True,
            ), view
    # Every fallback in the history is one of the trainings FAL gave no result for, and
    # none was ever replaced (no fallback applied on an ambiguous answer, then undone).
    assert sum(report.fallbacks_by_layer.values()) == sum(EXACT_OUTCOMES.values())
    assert report.fallbacks_by_layer["emergency"] == EXACT_OUTCOMES["never"]
    assert sum(report.upgrades_by_layer.values()) == 0
    assert not report.fallbacks_on_real
    # Only the "never" trainings reached their deadline.
    late = [t.outcome for v, t, _ in report.rows if v and v.completed_at >= v.deadline_at]  # type: ignore[operator]
    assert late == ["never"] * EXACT_OUTCOMES["never"]
    # The faults really happened.
    deliveries = h.sim.deliveries
    bad = [d for d in deliveries if d.signature == "bad"]
    assert bad and not [d for d in bad if d.acked]
    assert any(d.status is None for d in deliveries)  # sent while the daemon was down
    assert report.webhooks is not None and report.webhooks.dropped > 0
    assert len({d.request_id for d in deliveries if d.acked}) < len(
        [d for d in deliveries if d.acked and d.signature == "good"]
    )  # duplicates acknowledged
    assert sum(code in (429, 500, 502, 503, 504) for (_, code) in h.sim.stats.elements()) > 0
    assert h.sim.hangs["status"] + h.sim.hangs["result"] > 0  # calls the daemon timed out on


# -- 2. The JWKS endpoint down longer than the key cache lasts -------------------------------
async def test_jwks_outage_loses_no_webhook(nursery: trio.Nursery, tmp_path: Path) -> None:
    sim_config = SimConfig(
        queue_seconds=0.5,
        run_seconds=1.0,
        seed=5,
        faults=Faults(duplicate_webhook=0.1, bad_signature=0.05, delay_webhook_seconds=1.0),
        webhook_retry_delays=WEBHOOK_RETRIES,
    )
    # A late poller, so that most results have to come through the webhooks.
    layers = {
        "poller": {"first_check_after_seconds": 20.0, "interval_seconds": 5.0},
        "delayed": {"after_seconds": 30.0},
        "emergency": {"deadline_seconds": 120.0},
    }
    tables = {"webhook": {"jwks_cache_seconds": 2.0}}
    async with harness(nursery, tmp_path, sim_config, layers=layers, tables=tables) as h:
        total = 40

        async def outage() -> None:
            await trio.sleep(3.0)
            h.sim.faults.jwks_down = True
            await trio.sleep(2.0)
            await h.crash_and_restart(0.5)  # receipts stored unverified must survive this
            await trio.sleep(6.0)
            h.sim.faults.jwks_down = False

        async with trio.open_nursery() as chaos:
            chaos.start_soon(outage)
            for i in range(total):
                await h.submit(i, "fail" if i % 10 == 9 else "ok")
                await trio.sleep(0.3)
        await h.wait_until_finished(total, timeout=60.0)
        report = await h.stop_and_compare()
    show("JWKS down ~10 s, one SIGKILL", report)

    assert report.problems == [], "\n".join(report.problems)
    assert report.webhooks is not None
    during_outage = [d for d in h.sim.deliveries if d.status == 202]
    assert [d for d in during_outage if d.signature == "good"], "the outage was not exercised"
    assert h.sim.stats[("jwks", 503)] > 0
    # Webhooks held back by the outage were verified once the keys were back and applied
    # (the audit); for trainings that finished after the restart they carried the result.
    assert report.webhooks.deliveries["good signature, HTTP 202 -> verified: result"] > 0


# -- 3. FAL's queue API down, and no webhooks -------------------------------------------------
async def test_fal_outage_recovers_everything_without_fallbacks(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    sim_config = SimConfig(
        queue_seconds=0.5,
        run_seconds=1.0,
        seed=6,
        faults=Faults(drop_webhook=1.0),
        webhook_retry_delays=WEBHOOK_RETRIES,
    )
    layers = {
        "poller": {
            "first_check_after_seconds": 0.5,
            "interval_seconds": 1.0,
            "max_backoff_seconds": 2.0,
        },
        "emergency": {"deadline_seconds": 120.0},
    }
    async with harness(nursery, tmp_path, sim_config, layers=layers) as h:
        total = 30
        for i in range(total):
            await h.submit(i, "ok")
        h.sim.faults.api_down = True
        await trio.sleep(6.0)  # six poll intervals; every training finishes at FAL meanwhile
        h.sim.faults.api_down = False
        await h.wait_until_finished(total, timeout=30.0)
        report = await h.stop_and_compare()
    show("FAL API down 6 s, no webhooks", report)

    assert report.problems == [], "\n".join(report.problems)
    assert sum(report.fallbacks_by_layer.values()) == 0
    # Nothing passed its deadline in this run, and no fallback was applied and replaced.
    assert all(v is not None and v.completed_at < v.deadline_at for v, _, _ in report.rows)  # type: ignore[operator]
    assert sum(report.upgrades_by_layer.values()) == 0
    assert sum(report.results_by_layer.values()) == total
    assert report.results_by_layer["webhook"] == 0
    assert h.sim.stats[("status", 503)] > 0  # the daemon did knock during the outage


# -- the audit itself must catch what it is there to catch ------------------------------------
def test_webhook_audit_flags_lost_unapplied_and_forged_webhooks() -> None:
    def delivery(rid: str, signature: str, status: int | None) -> Delivery:
        return Delivery(rid, signature, f"sig-{rid}-{signature}", f"body-{rid}", status)

    def receipt(rid: str, signature: str, verification: str, processed: bool) -> StoredReceipt:
        outcome = ("rejected" if verification == "rejected" else "result") if processed else None
        return StoredReceipt(
            f"sig-{rid}-{signature}", f"body-{rid}", verification, processed, outcome
        )

    deliveries = [
        delivery("fine", "good", 200),
        delivery("lost", "good", 200),
        delivery("stuck", "good", 202),
        delivery("unanswered", "good", None),
        delivery("forged", "bad", 200),
        delivery("refused", "bad", 401),
        delivery("held", "bad", 202),
    ]
    receipts = [
        receipt("fine", "good", "verified", True),
        receipt("stuck", "good", "unverified", False),
        receipt("forged", "bad", "verified", True),
        receipt("refused", "bad", "rejected", True),
        receipt("held", "bad", "rejected", True),
    ]
    audit = audit_webhooks(deliveries, receipts, [])
    assert sorted(p.split(":")[0] for p in audit.problems) == ["forged", "forged", "lost", "stuck"]
    assert audit.deliveries["good signature, HTTP 200 -> verified: result"] == 1
    assert audit.deliveries["bad signature, HTTP 202 -> rejected: rejected"] == 1
    assert audit.deliveries["good signature, no answer -> not stored"] == 1
