"""Schedules under trio's MockClock: hours of checks in milliseconds.

The layers run against a scripted FAL (no network) and the real store; every schedule is a
time in the database, so a restarted layer carries on where the stored schedule says.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing

from trainguard import fal
from trainguard.clock import Clock
from trainguard.config import Settings
from trainguard.layer import LayerContext
from trainguard.layers.delayed import DelayedLayer
from trainguard.layers.emergency import EmergencyLayer
from trainguard.layers.poller import PollerLayer
from trainguard.layers.startup import StartupLayer
from trainguard.reconcile import Reconciler
from trainguard.store import Store, open_store

LORA = {
    "diffusers_lora_file": {"url": "https://v3.fal.media/x.safetensors"},
    "config_file": {"url": "https://v3.fal.media/c.json"},
}


class ScriptedFal:
    """Answers like FAL for a training that finishes at ``done_at`` (trio time); records calls."""

    def __init__(self, done_at: float = float("inf"), transient_until: float = -1.0) -> None:
        self.done_at = done_at
        self.transient_until = transient_until
        self.calls: list[tuple[str, float]] = []

    def _now(self, op: str) -> float:
        now = trio.current_time()
        self.calls.append((op, now))
        return now

    async def status(self, url: str, *, logs: bool = True) -> fal.Answer:
        now = self._now("status")
        if now < self.transient_until:
            return fal.Answer(op="status", kind=fal.Kind.TRANSIENT, detail="HTTP 503")
        if now >= self.done_at:
            return fal.Answer(op="status", kind=fal.Kind.COMPLETED, status="COMPLETED")
        return fal.Answer(
            op="status", kind=fal.Kind.PENDING, status="IN_PROGRESS", progress=int(now) % 100
        )

    async def result(self, url: str) -> fal.Answer:
        now = self._now("result")
        if now >= self.done_at:
            return fal.Answer(op="result", kind=fal.Kind.SUCCEEDED, output=LORA)
        return fal.Answer(op="result", kind=fal.Kind.PENDING, detail="Request is still in progress")

    def times(self, op: str) -> list[float]:
        return [t for o, t in self.calls if o == op]


@pytest.fixture
def clock(mock_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    mock_clock.autojump_threshold = 0
    return mock_clock


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    # Database calls inline on trio's thread: a thread hand-off would look like idleness and
    # let the autojumping clock leap to the next deadline in the middle of a call.
    async with open_store(settings.database["url"], inline=True) as s:
        yield s


def context(name: str, store: Store, settings: Settings, scripted: ScriptedFal) -> LayerContext:
    shared = Clock()
    return LayerContext(
        name=name,
        settings=settings,
        store=store,
        reconciler=Reconciler(store, settings, clock=shared),
        fal=scripted,  # type: ignore[arg-type]
        metrics=None,
        clock=shared,
        idle_seconds=3600.0,  # only due times and our own registrations wake a layer
    )


async def run_for(seconds: float, layer: Any, ctx: LayerContext) -> None:
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            await nursery.start(layer.run, ctx)


async def register(ctx: LayerContext, rid: str = "r1") -> None:
    await ctx.reconciler.register(
        name="ann", training_type="portrait", request_id=rid, layer="test"
    )


async def test_poller_checks_at_90s_then_every_60s_for_an_hour(
    clock: trio.testing.MockClock, store: Store, settings: Settings
) -> None:
    scripted = ScriptedFal()
    ctx = context("poller", store, settings, scripted)
    start = trio.current_time()
    await register(ctx)
    await run_for(3600, PollerLayer(), ctx)
    times = [t - start for t in scripted.times("status")]
    assert times[0] == pytest.approx(90, abs=1)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(53 < g < 67 for g in gaps), gaps  # 60 s with 10% jitter
    assert 55 <= len(times) <= 62
    view = await store.training("r1")
    assert view is not None and view.status == "IN_PROGRESS" and view.progress > 0


async def test_poller_backs_off_on_transient_errors_and_never_gives_up(
    clock: trio.testing.MockClock, store: Store, settings: Settings
) -> None:
    scripted = ScriptedFal(done_at=3 * 3600, transient_until=2 * 3600)  # a two-hour outage
    ctx = context("poller", store, settings, scripted)
    start = trio.current_time()
    await register(ctx)
    await run_for(4 * 3600, PollerLayer(), ctx)
    outage = [t - start for t in scripted.times("status") if t - start < 2 * 3600]
    gaps = [b - a for a, b in itertools.pairwise(outage)]
    assert gaps[1] > gaps[0] and gaps[2] > gaps[1]  # exponential
    assert max(gaps) <= 900 + 1  # capped at max_backoff_seconds
    assert len(outage) < 20  # an outage does not hammer FAL
    view = await store.training("r1")
    assert view is not None and view.status == "COMPLETED" and not view.is_fallback
    assert view.result_layer == "poller"


async def test_schedule_survives_a_restart(
    clock: trio.testing.MockClock, store: Store, settings: Settings
) -> None:
    scripted = ScriptedFal()
    ctx = context("poller", store, settings, scripted)
    start = trio.current_time()
    await register(ctx)
    await run_for(100, PollerLayer(), ctx)  # one check at 90 s, next due near 150 s
    before = await store.training("r1")
    assert before is not None and before.next_check_at is not None
    await trio.sleep(20)  # "down" for 20 s
    await run_for(100, PollerLayer(), ctx)  # a new layer instance: nothing in memory
    times = [t - start for t in scripted.times("status")]
    assert len(times) >= 2
    assert times[1] == pytest.approx(
        before.next_check_at - (before.last_checked_at or 0) + times[0], abs=1
    )


async def test_delayed_checks_once_after_submit_and_once_after_completion(
    clock: trio.testing.MockClock, store: Store, settings: Settings
) -> None:
    scripted = ScriptedFal(done_at=trio.current_time() + 300)  # FAL is done at 5 min
    ctx = context("delayed", store, settings, scripted)
    start = trio.current_time()
    await register(ctx)
    await run_for(3 * 3600, DelayedLayer(), ctx)
    status_times = [round(t - start) for t in scripted.times("status")]
    result_times = [round(t - start) for t in scripted.times("result")]
    assert status_times == [600]  # once, after_seconds after submit (no poller running)
    assert result_times == [600, 660]  # the result, then the verification after completion
    view = await store.training("r1")
    assert view is not None and view.status == "COMPLETED" and view.result_layer == "delayed"
    assert view.delayed_check_at is None  # nothing more scheduled


async def test_delayed_check_survives_a_restart(
    clock: trio.testing.MockClock, store: Store, settings: Settings
) -> None:
    scripted = ScriptedFal()
    ctx = context("delayed", store, settings, scripted)
    start = trio.current_time()
    await register(ctx)
    await run_for(500, DelayedLayer(), ctx)  # the daemon dies before the 600 s check
    assert scripted.times("status") == []
    await trio.sleep(300)  # down until 800 s: the check is overdue
    await run_for(100, DelayedLayer(), ctx)
    assert [round(t - start) for t in scripted.times("status")] == [800]


async def test_emergency_fallback_at_the_deadline(
    clock: trio.testing.MockClock, store: Store, settings_factory: Callable[..., Settings]
) -> None:
    settings = settings_factory()
    scripted = ScriptedFal()  # FAL never finishes
    ctx = context("emergency", store, settings, scripted)
    start = trio.current_time()
    await register(ctx)
    await run_for(7 * 3600, EmergencyLayer(), ctx)
    assert [round(t - start) for t in scripted.times("status")] == [21600]  # one last chance
    view = await store.training("r1")
    assert view is not None and view.is_fallback and view.fallback_kind == "deadline"
    assert view.completed_at is not None


class RecordingNotifier:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def notify(self, **fields: Any) -> bool:
        self.sent.append(fields)
        return True


class SlowFal(ScriptedFal):
    async def result(self, url: str) -> fal.Answer:
        await trio.sleep(1.0)  # a FAL answering one call a second
        return await super().result(url)


async def test_a_long_startup_sweep_asks_systemd_for_more_time(
    clock: trio.testing.MockClock, store: Store, settings_factory: Callable[..., Settings]
) -> None:
    settings = settings_factory({"layers": {"startup": {"concurrency": 1}}})
    scripted = SlowFal()
    ctx = context("startup", store, settings, scripted)
    ctx.notifier = RecordingNotifier()
    for i in range(20):
        await register(ctx, f"r{i}")
    async with trio.open_nursery() as nursery:
        await nursery.start(StartupLayer().run, ctx)  # returns when the sweep is done
    sent = ctx.notifier.sent
    assert len(sent) in (3, 4)  # every 5 s of a 20 s sweep
    assert all(m["EXTEND_TIMEOUT_USEC"] == 30_000_000 for m in sent)
    assert sent[0]["STATUS"].startswith("startup sweep: ") and sent[-1]["STATUS"].endswith(
        "/20 trainings checked"
    )


async def test_now_follows_a_step_of_the_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (issue 9, item 3): wall time was anchored once, so after NTP corrected a
    clock 10 minutes behind, every genuine webhook looked 10 minutes stale until a restart."""
    import time as real_time
    from types import SimpleNamespace

    from trainguard import clock as clock_mod

    step = {"by": -600.0}
    fake = SimpleNamespace(time=lambda: real_time.time() + step["by"])
    monkeypatch.setattr(clock_mod, "time", fake)
    clock = Clock()
    before = clock.now()
    assert abs(before - (real_time.time() - 600)) < 5
    step["by"] = 0.0  # the clock is corrected
    await trio.sleep(0.01)
    assert abs(clock.now() - real_time.time()) < 5


async def test_emergency_asks_the_result_once_more_before_the_deadline_fallback(
    clock: trio.testing.MockClock, store: Store, settings: Settings
) -> None:
    """Regression (issue 9, item 3): the deadline fallback was applied while FAL held the real
    result (a status call that failed, or a clock that jumped past the deadline); the
    emergency layer now asks the result itself too, and applies a real answer."""
    scripted = ScriptedFal(done_at=0.0, transient_until=float("inf"))  # status never answers
    ctx = context("emergency", store, settings, scripted)
    await register(ctx)
    await run_for(7 * 3600, EmergencyLayer(), ctx)
    assert len(scripted.times("status")) == 1 and len(scripted.times("result")) == 1
    view = await store.training("r1")
    assert view is not None and view.status == "COMPLETED" and not view.is_fallback
    assert view.result_layer == "emergency"
