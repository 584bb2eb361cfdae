"""The plugin API (issue 10 item 3): hooks through pluggy, contexts and stashes, declared
options, one registry of layer names."""

from __future__ import annotations

import ast
from collections.abc import Generator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import trainguard_stale_alert
import trio
from structlog.testing import capture_logs

from tests.conftest import daemon_settings
from trainguard import api, config, logs, metrics, names
from trainguard.api import ConfigError, LayerContext, Option, PluginContext, StashKey, hookimpl
from trainguard.metrics import Metrics
from trainguard.plugins import delivery
from trainguard.plugins.manager import (
    BUILTIN_MODULES,
    HookRunner,
    build_manager,
    collect_layers,
    current_context,
    outbox_collector,
)
from trainguard.supervisor import Daemon, LayerStartError
from trainguard.testing.simulator import Simulator

FAILED = SimpleNamespace(
    request_id="r1", status="FAILED", is_fallback=False, lora_url=None, config_url=None
)


class Answers:
    """A plain plugin: answers every training hook, remembering its context."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.contexts: list[PluginContext] = []

    @hookimpl
    def trainguard_training_finished(self, context: PluginContext) -> Any:
        assert current_context() is context
        self.contexts.append(context)
        return self.answer

    @hookimpl
    def trainguard_outbox(self, event: str, context: PluginContext) -> Any:
        return [{"consumer": "answers", "payload": {"event": event, "by": context.plugin}}]


class Raises:
    @hookimpl
    def trainguard_training_finished(self) -> None:
        raise RuntimeError("broken plugin")

    @hookimpl
    def trainguard_outbox(self) -> Any:
        return ["garbage"]


class Wraps:
    """A hookwrapper: sees every plugin's call of a training hook, and its result."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, Any]] = []

    @hookimpl(wrapper=True)
    def trainguard_training_finished(
        self, training: Any, context: PluginContext
    ) -> Generator[None, Any, Any]:
        self.seen.append(("before", context.plugin, training.request_id))
        try:
            result = yield
        except RuntimeError as exc:
            self.seen.append(("raised", context.plugin, str(exc)))
            raise
        self.seen.append(("after", context.plugin, result))
        return result

    @hookimpl(wrapper=True)
    def trainguard_outbox(self, context: PluginContext) -> Generator[None, Any, Any]:
        result = yield
        self.seen.append(("outbox", context.plugin, result))
        return result


def manager(*plugins: object) -> Any:
    pm = build_manager(entry_points=False, extra=plugins)
    for plugin in plugins:  # extra plugins get pluggy's generated names: give them ours
        pm.unregister(plugin)
        pm.register(plugin, name=type(plugin).__name__.lower())
    return pm


async def test_a_hookwrapper_sees_each_plugins_call_and_its_result() -> None:
    answers, wraps = Answers("done"), Wraps()
    pm = manager(answers, wraps)
    await HookRunner(pm)("trainguard_training_finished", training=FAILED, layer="webhook")
    assert ("before", "answers", "r1") in wraps.seen
    assert ("after", "answers", ["done"]) in wraps.seen
    # The built-in plugins are called through it too, each with its own context.
    assert ("after", "builtin:trainguard.plugins.artifacts", []) in wraps.seen
    assert answers.contexts == [pm.context("answers")]


async def test_hookcall_monitoring_traces_training_hooks() -> None:
    traced: list[tuple[str, list[str]]] = []
    pm = manager(Answers(None))

    def before(hook_name: str, impls: list[Any], kwargs: dict[str, Any]) -> None:
        traced.append((hook_name, [i.plugin_name for i in impls]))

    undo = pm.add_hookcall_monitoring(before, lambda *_: None)
    await HookRunner(pm)("trainguard_training_finished", training=FAILED, layer="completeness")
    outbox_collector(pm)(FAILED, "training.upgraded", "completeness")
    undo()
    assert ("trainguard_training_finished", ["answers"]) in traced
    assert ("trainguard_outbox", ["answers"]) in traced


async def test_isolation_holds_with_a_wrapper_around_every_plugin() -> None:
    answers, wraps = Answers("done"), Wraps()
    pm = manager(answers, Raises(), wraps)
    runner = HookRunner(pm, Metrics())
    with capture_logs() as lines:
        await runner("trainguard_training_finished", training=FAILED, layer="webhook")
    assert ("raised", "raises", "broken plugin") in wraps.seen
    assert ("after", "answers", ["done"]) in wraps.seen
    (line,) = [e for e in lines if e["event"] == "plugin hook failed"]
    assert (line["plugin"], line["error"]) == ("raises", "RuntimeError: broken plugin")
    assert runner.metrics is not None
    assert b'trainguard_hook_errors_total{hook="trainguard_training_finished"} 1.0' in (
        runner.metrics.render()
    )
    with capture_logs() as lines:
        entries = outbox_collector(pm)(FAILED, "training.fallback", "emergency")
    assert entries == [
        {"consumer": "answers", "payload": {"event": "training.fallback", "by": "answers"}}
    ]
    assert [e["plugin"] for e in lines if e["event"] == "plugin outbox hook failed"] == ["raises"]
    assert ("outbox", "raises", [["garbage"]]) in wraps.seen  # the wrapper saw the garbage


def test_each_manager_keeps_its_plugins_state_in_their_stash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "payload", lambda training, event: {"type": event})
    on = config.parse(
        {
            "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
            "delivery": {"enabled": True, "url": "http://127.0.0.1:9/bot"},
        },
        env={},
    )
    off = config.parse({"database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"}}, env={})
    pm_on, pm_off = build_manager(entry_points=False), build_manager(entry_points=False)
    collect_layers(pm_on, on)
    collect_layers(pm_off, off)
    name = "builtin:trainguard.plugins.delivery"
    sender = pm_on.context(name).stash[delivery.SENDER]
    assert sender.name == "delivery" and delivery.SENDER not in pm_off.context(name).stash
    with pm_on.calling(name):
        assert delivery.trainguard_outbox(FAILED, "training.failed") == [  # type: ignore[arg-type]
            {"consumer": "delivery", "payload": {"type": "training.failed"}}
        ]
    with pm_off.calling(name):
        assert delivery.trainguard_outbox(FAILED, "training.failed") is None  # type: ignore[arg-type]


def test_a_stash_is_typed_by_its_keys() -> None:
    count: StashKey[int] = StashKey()
    other: StashKey[int] = StashKey()
    stash = PluginContext("p").stash
    assert stash.get(count, 0) == 0 and count not in stash
    stash[count] = stash.setdefault(count, 0) + 1
    assert (stash[count], len(stash), other in stash) == (1, 1, False)
    del stash[count]
    with pytest.raises(KeyError):
        stash[count]


# -- declared options -----------------------------------------------------------------------
class Counted:
    """A plugin layer declaring its options; it records what it was handed."""

    name = "counted"
    options: ClassVar = {"every": Option(int, 3, above=0), "ratio": Option(float, 0.5, maximum=1)}

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        self.got.append(dict(ctx.options))
        task_status.started()
        await trio.sleep_forever()

    @hookimpl
    def trainguard_layers(self) -> list[Counted]:
        return [self]


def test_declared_options_read_like_core_config_errors() -> None:
    with pytest.raises(ConfigError) as core:
        config.parse({"fal": {"retries": "x"}}, env={})
    with pytest.raises(ConfigError) as plugin:
        api.validate_options("counted", Counted.options, {"every": "x"})
    assert str(core.value) == "fal.retries: must be an integer, got 'x'"
    assert str(plugin.value) == "layers.counted.every: must be an integer greater than 0, got 'x'"
    with pytest.raises(ConfigError, match=r"^layers\.counted\.ratio: must be a finite number "):
        api.validate_options("counted", Counted.options, {"ratio": float("inf")})
    with pytest.raises(ConfigError, match=r"^layers\.counted\.nope: unknown key \(known keys: "):
        api.validate_options("counted", Counted.options, {"nope": 1})


async def test_a_layer_gets_its_checked_options_and_a_bad_table_stops_the_start(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    layer = Counted()
    good = daemon_settings(tmp_path / "a.sqlite", sim, only=(), layers={"counted": {"ratio": 1}})
    daemon = Daemon(good, pm=build_manager(entry_points=False, extra=[layer]))
    await nursery.start(daemon.run)
    assert layer.got == [{"every": 3, "ratio": 1.0}]
    assert daemon.settings.layer("counted").options == {"ratio": 1}  # the raw table stays
    bad = daemon_settings(tmp_path / "b.sqlite", sim, only=(), layers={"counted": {"every": 0}})
    stopped = Daemon(bad, pm=build_manager(entry_points=False, extra=[Counted()]))
    with pytest.raises(LayerStartError) as info:
        await stopped.run()
    assert str(info.value) == (
        "layer counted failed to start: ConfigError: "
        "layers.counted.every: must be an integer greater than 0, got 0"
    )
    assert not stopped.ready and stopped.store is None  # refused before anything opened


# -- the registry and the public module ------------------------------------------------------
def test_every_list_of_layer_names_comes_from_the_registry() -> None:
    assert config.BUILTIN_LAYERS is metrics.BUILTIN_LAYERS is names.BUILTIN_LAYERS
    assert logs.LAYER_TAGS is names.LAYER_TAGS
    assert set(config.LAYER_SCHEMA) == set(names.BUILTIN_LAYERS)
    assert BUILTIN_MODULES is names.BUILTIN_MODULES
    assert {f"trainguard.layers.{n}" for n in names.BUILTIN_LAYERS} < set(BUILTIN_MODULES)


def test_the_example_plugin_imports_only_the_public_api() -> None:
    tree = ast.parse(Path(trainguard_stale_alert.__file__).read_text(encoding="utf-8"))
    ours = {
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trainguard")
        for alias in node.names
    }
    assert {m for m, _ in ours} == {"trainguard.api"}
    assert {name for m, name in ours if m == "trainguard.api"} <= set(api.__all__)
