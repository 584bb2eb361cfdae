"""The plugin system end to end.

Covers: entry-point discovery of the example distribution, the example layer in a real
daemon, turning layers off, conflicts, isolation of hook calls, and how the supervisor
treats a plugin layer that crashes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import trainguard_stale_alert
import trio
from structlog.testing import capture_logs

from tests.conftest import daemon_settings
from tests.test_layers import finished, submit, wait_for
from trainguard import supervisor
from trainguard.config import ConfigError, Settings
from trainguard.layer import LayerContext
from trainguard.logs import WARN
from trainguard.metrics import Metrics
from trainguard.plugins.hookspecs import hookimpl
from trainguard.plugins.manager import (
    HookRunner,
    PluginError,
    build_manager,
    collect_layers,
)
from trainguard.supervisor import Daemon, LayerStartError
from trainguard.testing.simulator import SimConfig, Simulator

#: The layers the built-in modules offer with the default configuration, in registration
#: order (plugins.delivery offers its layer only when [delivery] enabled = true).
DEFAULT_BUILTINS = (
    "webhook",
    "startup",
    "poller",
    "delayed",
    "completeness",
    "emergency",
    "artifacts",
)
DIST = "trainguard-example-stale-alert"
SOURCE = f"{DIST} {version(DIST)}"
NAME = trainguard_stale_alert.NAME


# -- small plugins written the way a third party would ----------------------------------
class Offers:
    """A plugin object offering the given layers through the same hook as the built-ins."""

    def __init__(self, *layers: object) -> None:
        self.layers = list(layers)

    @hookimpl
    def trainguard_layers(self) -> list[object]:
        return self.layers


class Idle:
    """A layer that starts, then beats until cancelled."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        while True:
            ctx.passed()
            await trio.sleep(0.05)


class Flaky(Idle):
    """Crashes ``crashes`` times shortly after it started, then stays up."""

    def __init__(self, name: str, crashes: int) -> None:
        super().__init__(name)
        self.crashes = crashes
        self.runs = 0

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        self.runs += 1
        if self.runs > self.crashes:
            return await super().run(ctx, task_status=task_status)
        task_status.started()
        await trio.sleep(0.05)
        raise RuntimeError("flaky plugin crashed")


class NeverStarts:
    name = "unlicensed"

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        raise RuntimeError("no licence key")


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


async def start(nursery: trio.Nursery, settings: Settings, **manager: Any) -> Daemon:
    daemon = Daemon(settings, pm=build_manager(**manager))
    await nursery.start(daemon.run)
    return daemon


# -- discovery --------------------------------------------------------------------------
def test_the_example_is_found_through_its_entry_point(settings: Settings) -> None:
    entries = {e.layer.name: e for e in collect_layers(build_manager(), settings)}
    assert entries["stale_alert"].source == SOURCE
    assert entries["stale_alert"].plugin == "stale_alert"  # the entry point's name
    assert {name for name, e in entries.items() if e.source == "built-in"} == set(DEFAULT_BUILTINS)
    without = collect_layers(build_manager(entry_points=False), settings)
    assert "stale_alert" not in {e.layer.name for e in without}


def test_cli_plugins_lists_builtins_and_the_example(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRAINGUARD_CONFIG"}
    done = subprocess.run(
        [sys.executable, "-m", "trainguard", "plugins", "--json"],
        cwd=tmp_path,  # no config.toml: the embedded defaults
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = json.loads(done.stdout)
    assert {r["layer"]: r["source"] for r in rows} == {
        **dict.fromkeys(DEFAULT_BUILTINS, "built-in"),
        "stale_alert": SOURCE,
    }
    assert all(r["enabled"] for r in rows)
    # Listed in registration order: the built-ins, then entry-point plugins.
    assert [r["layer"] for r in rows] == [*DEFAULT_BUILTINS, "stale_alert"]


# -- the example layer ------------------------------------------------------------------
async def test_stale_alert_warns_about_a_training_stuck_in_queue(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    sim = Simulator(SimConfig(queue_seconds=3600, run_seconds=1, seed=1))
    await nursery.start(sim.serve)
    settings = daemon_settings(
        tmp_path / "db.sqlite",
        sim,
        only=("poller",),  # the poller is what learns from FAL that a training is IN_QUEUE
        layers={"stale_alert": {"interval_seconds": 0.1, "queue_warning_seconds": 0.5}},
    )
    with capture_logs() as logs:
        daemon = await start(nursery, settings)
        assert set(daemon.layers) == {"poller", "stale_alert"}
        assert b"trainguard_stale_alert_stale_trainings 0.0" in daemon.metrics.render()
        assert daemon.fal is not None and daemon.reconciler is not None
        (rid,) = await submit(settings, daemon.fal, daemon.reconciler, n=1)

        def warnings() -> list[dict[str, Any]]:
            return [e for e in logs if e.get("layer") == NAME and e["event"].startswith(WARN)]

        async def warned() -> bool:
            return bool(warnings())

        await wait_for(warned, timeout=10)
    (line, *_) = warnings()
    assert (line["log_level"], line["request_id"], line["name"]) == ("warning", rid, "u0")
    assert line["waiting_seconds"] >= 0
    assert b"trainguard_stale_alert_stale_trainings 1.0" in daemon.metrics.render()
    assert daemon.store is not None
    view = await daemon.store.training(rid)
    assert view is not None and view.status == "IN_QUEUE"
    # It only reads: every event of the training comes from another layer.
    assert "stale_alert" not in {e["layer"] for e in await daemon.store.events(rid)}


async def test_stale_alert_hears_fallbacks_through_its_hook(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    heard = trainguard_stale_alert.plugin.fallbacks_heard
    settings = daemon_settings(tmp_path / "db.sqlite", sim, only=("webhook",))
    daemon = await start(nursery, settings)
    assert daemon.fal is not None and daemon.reconciler is not None
    with capture_logs() as logs:
        (rid,) = await submit(settings, daemon.fal, daemon.reconciler, n=1, outcome="fail")

        async def heard_it() -> bool:
            return trainguard_stale_alert.plugin.fallbacks_heard == heard + 1

        await wait_for(heard_it)
    (line,) = [e for e in logs if e["event"] == "fallback heard"]
    assert (line["request_id"], line["by_layer"]) == (rid, "webhook")


async def test_stale_alert_survives_a_restart(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "RESTART_BACKOFF_FIRST", 0.01)
    settings = daemon_settings(
        tmp_path / "db.sqlite", sim, only=(), layers={"stale_alert": {"interval_seconds": 0.05}}
    )
    daemon = await start(nursery, settings)
    assert daemon.store is not None
    store, read = daemon.store, daemon.store.trainings
    registry = daemon.metrics.registry

    async def fails_once(*where: Any, **kw: Any) -> list[Any]:
        monkeypatch.setattr(store, "trainings", read)
        raise RuntimeError("database hiccup")

    monkeypatch.setattr(store, "trainings", fails_once)

    def passes() -> float:
        return registry.get_sample_value("trainguard_layer_passes_total", {"layer": NAME}) or 0

    async def restarted_and_passing() -> bool:
        restarts = registry.get_sample_value("trainguard_layer_restarts_total", {"layer": NAME})
        return restarts == 1 and daemon.layers[NAME].running and passes() >= before + 2

    before = passes()
    await wait_for(restarted_and_passing, timeout=5)
    # run() ran again on the same registry, and its gauge is still exported once.
    assert registry.get_sample_value(f"trainguard_{NAME}_stale_trainings") == 0


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"interval_seconds": 0}, "interval_seconds"),
        ({"interval_seconds": -1}, "interval_seconds"),
        ({"queue_warning_seconds": "15m"}, "queue_warning_seconds"),
        ({"queue_warning_seconds": True}, "queue_warning_seconds"),
        ({"interval_seconds": float("nan")}, "interval_seconds"),
        ({"intervall_seconds": 5}, "intervall_seconds"),
    ],
)
def test_stale_alert_rejects_bad_options(options: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^layers\.stale_alert\.{key}: "):
        trainguard_stale_alert.parse_options(options)


def test_stale_alert_options_default() -> None:
    assert trainguard_stale_alert.parse_options({}) == trainguard_stale_alert.DEFAULTS
    assert trainguard_stale_alert.parse_options({"interval_seconds": 5})["interval_seconds"] == 5.0


async def test_a_bad_stale_alert_option_stops_the_daemon_at_start(
    tmp_path: Path, sim: Simulator
) -> None:
    settings = daemon_settings(
        tmp_path / "db.sqlite", sim, only=(), layers={"stale_alert": {"interval_seconds": 0}}
    )
    daemon = Daemon(settings, pm=build_manager())
    # The option is checked before the layer starts; how the error is wrapped is the
    # supervisor's business, so look for it among the leaves.
    with pytest.raises(BaseException) as info:
        await daemon.run()
    messages = [str(e) for e in leaves(info.value)]
    assert any("layers.stale_alert.interval_seconds: must be" in m for m in messages), messages
    assert not daemon.ready


# -- choosing layers --------------------------------------------------------------------
@pytest.mark.parametrize("off", ["stale_alert", "poller"])
async def test_enabled_false_turns_a_layer_off(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, off: str
) -> None:
    settings = daemon_settings(tmp_path / "db.sqlite", sim, layers={off: {"enabled": False}})
    daemon = await start(nursery, settings)
    assert set(daemon.layers) == {*DEFAULT_BUILTINS, "stale_alert"} - {off}
    assert f'trainguard_layer_up{{layer="{off}"}} 0.0'.encode() in daemon.metrics.render()


def test_a_layer_nothing_offers_is_a_config_error(
    settings_factory: Callable[..., Settings],
) -> None:
    with pytest.raises(ConfigError, match=r"layers\.nosuch: no installed plugin offers"):
        Daemon(settings_factory({"layers": {"nosuch": {}}}), pm=build_manager())
    # The same when the config names the example but its distribution is not loaded.
    example = settings_factory({"layers": {"stale_alert": {"interval_seconds": 5}}})
    with pytest.raises(ConfigError, match=r"layers\.stale_alert: no installed plugin offers"):
        Daemon(example, pm=build_manager(entry_points=False))


def test_two_plugins_offering_one_layer_name_is_a_plugin_error(settings: Settings) -> None:
    with pytest.raises(
        PluginError, match=r"'poller' is offered by both builtin:trainguard\.layers\.poller"
    ):
        Daemon(settings, pm=build_manager(entry_points=False, extra=[Offers(Idle("poller"))]))
    with pytest.raises(PluginError, match=r"'stale_alert' is offered by both stale_alert and"):
        collect_layers(build_manager(extra=[Offers(Idle("stale_alert"))]), settings)


# -- training hooks ---------------------------------------------------------------------
async def test_a_failing_hook_is_logged_counted_and_breaks_nothing(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    calls: list[tuple[str, str, str]] = []

    class Broken:
        @hookimpl
        def trainguard_training_finished(self, training: Any, layer: str) -> None:
            calls.append(("broken", training.request_id, training.status))
            raise RuntimeError("broken plugin")

    class Healthy:
        @hookimpl
        async def trainguard_training_finished(self, training: Any, layer: str) -> None:
            await trio.sleep(0.01)  # only an awaited coroutine gets past this line
            calls.append(("healthy", training.request_id, training.status))

    settings = daemon_settings(tmp_path / "db.sqlite", sim, only=("webhook",))
    # pluggy's call order: the plugin registered last is called first, so Broken goes first.
    with capture_logs() as logs:
        daemon = await start(nursery, settings, entry_points=False, extra=[Healthy(), Broken()])
        assert daemon.fal is not None and daemon.reconciler is not None
        (rid,) = await submit(settings, daemon.fal, daemon.reconciler, n=1)

        async def both_called() -> bool:
            return len(calls) == 2

        await wait_for(both_called)
    assert calls == [("broken", rid, "COMPLETED"), ("healthy", rid, "COMPLETED")]
    (view,) = await finished(daemon, [rid])
    assert (view.status, view.result_layer, view.is_fallback) == ("COMPLETED", "webhook", False)
    text = daemon.metrics.render()
    assert b'trainguard_hook_errors_total{hook="trainguard_training_finished"} 1.0' in text
    assert b'trainguard_hook_errors_total{hook="trainguard_fallback_applied"} 0.0' in text
    (line,) = [e for e in logs if e["event"] == "plugin hook failed"]
    assert line["hook"] == "trainguard_training_finished"
    assert line["error"] == "RuntimeError: broken plugin"


async def test_a_hanging_hook_is_cut_off_by_the_timeout(autojump_clock: trio.abc.Clock) -> None:
    calls: list[str] = []

    class Hangs:
        @hookimpl
        async def trainguard_fallback_applied(self, training: Any, layer: str, reason: str) -> None:
            calls.append("hangs")
            await trio.sleep_forever()

    class Last:
        @hookimpl(trylast=True)  # registered last, yet called last: trylast is honoured
        def trainguard_fallback_applied(self, reason: str) -> None:
            calls.append(reason)

    metrics = Metrics()
    runner = HookRunner(
        build_manager(entry_points=False, extra=[Hangs(), Last()]), metrics, timeout=0.2
    )
    began = trio.current_time()
    with capture_logs() as logs:
        await runner("trainguard_fallback_applied", training=None, layer="emergency", reason="late")
    assert trio.current_time() - began == pytest.approx(0.2)
    assert calls == ["hangs", "late"]
    (line,) = [e for e in logs if e["event"] == "plugin hook failed"]
    assert line["error"] == "no answer within 0.2 s"
    assert b'trainguard_hook_errors_total{hook="trainguard_fallback_applied"} 1.0' in (
        metrics.render()
    )


# -- the supervisor and plugin layers ---------------------------------------------------
async def test_a_plugin_layer_that_crashes_is_restarted_alone(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "RESTART_BACKOFF_FIRST", 0.01)
    flaky = Flaky("flaky", crashes=2)
    settings = daemon_settings(tmp_path / "db.sqlite", sim, only=("webhook",))
    daemon = await start(nursery, settings, entry_points=False, extra=[Offers(flaky)])
    assert daemon.fal is not None and daemon.reconciler is not None
    ids = await submit(settings, daemon.fal, daemon.reconciler, n=2)

    async def settled() -> bool:
        return flaky.runs == 3 and len(await finished(daemon, ids)) == 2

    await wait_for(settled)
    assert daemon.layers["flaky"].running and daemon.layers["webhook"].running
    text = daemon.metrics.render()
    assert b'trainguard_layer_restarts_total{layer="flaky"} 2.0' in text
    assert b'trainguard_layer_restarts_total{layer="webhook"} 0.0' in text
    views = await finished(daemon, ids)
    assert {(v.status, v.result_layer) for v in views} == {("COMPLETED", "webhook")}


async def test_a_plugin_layer_that_fails_before_started_stops_the_daemon(
    tmp_path: Path, sim: Simulator
) -> None:
    settings = daemon_settings(tmp_path / "db.sqlite", sim, only=("webhook",))
    daemon = Daemon(settings, pm=build_manager(entry_points=False, extra=[Offers(NeverStarts())]))
    with pytest.raises(
        LayerStartError, match=r"^layer unlicensed failed to start: RuntimeError: no licence key$"
    ):
        await daemon.run()
    assert not daemon.ready
