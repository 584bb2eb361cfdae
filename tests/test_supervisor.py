"""The supervisor: READY only once started, the watchdog, clean stops, restarts, start errors,
and the metrics listener, against a real ``$NOTIFY_SOCKET`` and real loopback ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import daemon_settings
from trainguard import actions, config, supervisor
from trainguard.config import BUILTIN_LAYERS, Settings
from trainguard.layer import LayerContext
from trainguard.plugins.hookspecs import hookimpl
from trainguard.plugins.manager import build_manager
from trainguard.reconcile import Reconciler
from trainguard.store import open_store
from trainguard.supervisor import Daemon, LayerStartError, StartError
from trainguard.testing.demo import DEMO_KEY, DaemonProcess, demo_config, free_port
from trainguard.testing.simulator import SimConfig, Simulator

#: Every series the daemon exports per layer (the dashboards' contract).
PER_LAYER_SERIES = (
    "trainguard_layer_passes_total",
    "trainguard_layer_errors_total",
    "trainguard_layer_restarts_total",
    "trainguard_results_recovered_total",
    "trainguard_fallbacks_applied_total",
    "trainguard_fallbacks_upgraded_total",
    "trainguard_layer_last_success_timestamp_seconds",
    "trainguard_layer_up",
)
#: The guard layers in their start order (by their ``order``).
START_ORDER = ("webhook", "startup", "poller", "delayed", "emergency", "completeness")
#: The built-in layers that keep running after READY (startup does one sweep and is done).
CONTINUOUS_LAYERS = tuple(name for name in START_ORDER if name != "startup")


# -- a stand-in for systemd ------------------------------------------------------------------
@dataclass(frozen=True)
class Datagram:
    at: float
    lines: tuple[str, ...]
    snapshot: Any  # what ``FakeSystemd.snapshot`` returned the moment it arrived


class FakeSystemd:
    """A ``$NOTIFY_SOCKET``: a real AF_UNIX datagram socket recording what it receives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received: list[Datagram] = []
        self.snapshot: Callable[[], Any] = lambda: None
        self._arrived = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            await sock.bind(str(self.path))
            task_status.started()
            while True:
                data = await sock.recv(65536)
                lines = tuple(data.decode().splitlines())
                self.received.append(Datagram(trio.current_time(), lines, self.snapshot()))
                self._arrived.set()
                self._arrived = trio.Event()

    @property
    def lines(self) -> list[str]:
        return [line for d in self.received for line in d.lines]

    def count(self, line: str) -> int:
        return self.lines.count(line)

    async def wait_for(self, line: str, timeout: float = 10.0) -> Datagram:
        with trio.fail_after(timeout):
            while True:
                arrived = self._arrived
                for datagram in self.received:
                    if line in datagram.lines:
                        return datagram
                await arrived.wait()


@pytest.fixture
async def systemd(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> FakeSystemd:
    """systemd asking this process for notifications and a 0.2 s watchdog (pings every 0.1 s)."""
    fake = FakeSystemd(tmp_path / "notify")
    await nursery.start(fake.serve)
    monkeypatch.setenv("NOTIFY_SOCKET", str(fake.path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    return fake


# -- test plugin layers ----------------------------------------------------------------------
class LayerPlugin:
    """A third-party plugin offering ``layers`` through the same hook as the built-ins."""

    def __init__(self, *layers: object) -> None:
        self.layers = list(layers)

    @hookimpl
    def trainguard_layers(self) -> list[object]:
        return self.layers


class BeatingLayer:
    """Beats every 50 ms until ``stop_beating`` is set, then hangs without beating."""

    name = "beater"
    order = 90

    def __init__(self) -> None:
        self.stop_beating = trio.Event()

    def heartbeat_timeout(self, options: Mapping[str, Any]) -> float:
        return 0.3

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        while not self.stop_beating.is_set():
            ctx.heartbeat()
            await trio.sleep(0.05)
        await trio.sleep_forever()


class CrashingLayer:
    """Starts, then crashes 10 ms later, every time; records when each run started."""

    name = "crasher"
    order = 90

    def __init__(self) -> None:
        self.starts: list[float] = []

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        self.starts.append(trio.current_time())
        await trio.sleep(0.01)
        raise RuntimeError("the crasher crashed")


class BrokenLayer:
    """Fails before it has started."""

    name = "broken"
    order = 90

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        raise RuntimeError("cannot reach its backend")


class GatedLayer:
    """Starts first (order 0) and only once ``release`` is set: a slow start, held open."""

    name = "gated"
    order = 0

    def __init__(self) -> None:
        self.release = trio.Event()

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        await self.release.wait()
        task_status.started()
        await trio.sleep_forever()


# -- helpers -----------------------------------------------------------------------------------
def make_daemon(settings: Settings, *layers: object) -> Daemon:
    return Daemon(settings, pm=build_manager(entry_points=False, extra=[LayerPlugin(*layers)]))


def sample(daemon: Daemon, name: str, layer: str) -> float | None:
    return daemon.metrics.registry.get_sample_value(name, {"layer": layer})


async def submit(settings: Settings, fal: Any, reconciler: Reconciler, name: str) -> str:
    arguments = actions.training_arguments(
        settings, "portrait", f"https://example.invalid/{name}.zip", f"{name} person"
    )
    view = await actions.submit(
        settings,
        fal,
        reconciler,
        training_type="portrait",
        name=name,
        arguments=arguments,
        trigger=f"{name} person",
    )
    return view.request_id


@contextmanager
def port_in_use() -> Iterator[int]:
    """A loopback port another process-like owner is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# -- READY, STATUS and the watchdog ------------------------------------------------------------
async def test_ready_only_after_the_startup_sweep(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, systemd: FakeSystemd
) -> None:
    sim.faults.drop_webhook = 1.0  # only the startup sweep can learn how they ended
    settings = daemon_settings(tmp_path / "db.sqlite", sim)
    async with actions.fal_client(settings) as fal, open_store(settings.database["url"]) as store:
        reconciler = Reconciler(store, settings)
        ids = [await submit(settings, fal, reconciler, f"u{i}") for i in range(3)]
    await trio.sleep(1.0)  # they finish at FAL while no daemon runs
    # Every FAL call now takes 0.3 s: the sweep (status, then result) lasts >= 0.6 s.
    sim.faults.api_timeout_rate = 1.0
    sim.faults.api_timeout_seconds = 0.3

    daemon = make_daemon(settings)
    systemd.snapshot = lambda: sample(daemon, "trainguard_results_recovered_total", "startup")
    await nursery.start(daemon.run)
    ready = await systemd.wait_for("READY=1")

    assert ready.snapshot == 3.0  # all three recovered by the sweep before READY=1 was sent
    running = [name for name, layer in daemon.layers.items() if layer.running]
    assert "startup" not in running  # its one sweep is done
    assert ready.lines == ("READY=1", f"STATUS=ready: {len(running)} layers running")
    before = systemd.lines[: systemd.lines.index("READY=1")]
    assert before[0] == "STATUS=starting"
    starting = [line.removeprefix("STATUS=starting layer ") for line in before[1:]]
    assert sorted(starting) == sorted(daemon.layers)  # each layer once, all before READY
    assert [name for name in starting if name in START_ORDER] == list(START_ORDER)
    assert daemon.store is not None
    for rid in ids:
        view = await daemon.store.training(rid)
        assert view is not None
        assert (view.status, view.result_layer, view.is_fallback) == ("COMPLETED", "startup", False)


async def test_watchdog_is_fed_only_while_every_heartbeat_is_fresh(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, systemd: FakeSystemd
) -> None:
    beater = BeatingLayer()
    daemon = make_daemon(daemon_settings(tmp_path / "db.sqlite", sim), beater)
    await nursery.start(daemon.run)
    await systemd.wait_for("READY=1")
    assert "WATCHDOG=1" not in systemd.lines[: systemd.lines.index("READY=1")]

    await trio.sleep(0.6)
    assert systemd.count("WATCHDOG=1") >= 3  # every 0.1 s while all layers beat
    assert daemon.stale_layers() == []

    beater.stop_beating.set()  # hung: alive, but its heartbeat goes stale after 0.3 s
    await systemd.wait_for("STATUS=stale layers: beater", timeout=2.0)
    pings = systemd.count("WATCHDOG=1")
    await trio.sleep(0.5)
    assert systemd.count("WATCHDOG=1") == pings
    assert daemon.stale_layers() == ["beater"]


# -- SIGTERM on a real `trainguard run` ---------------------------------------------------------
async def test_sigterm_stops_a_real_daemon_cleanly_mid_flight(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    sim = Simulator(SimConfig(queue_seconds=0.2, run_seconds=60.0, seed=2))
    await nursery.start(sim.serve)
    fake = FakeSystemd(tmp_path / "notify")
    await nursery.start(fake.serve)
    metrics_port = free_port()
    path = demo_config(
        tmp_path,
        sim,
        webhook_port=free_port(),
        metrics_port=metrics_port,
        layers={"poller": {"first_check_after_seconds": 0.2, "interval_seconds": 0.3}},
    )
    settings = config.load(path, env={"FAL_KEY": DEMO_KEY})
    daemon = DaemonProcess(
        path, metrics_port, tmp_path / "daemon.log", env={"NOTIFY_SOCKET": str(fake.path)}
    )
    await daemon.start()
    await fake.wait_for("READY=1")

    async with actions.fal_client(settings) as fal, open_store(settings.database["url"]) as store:
        rid = await submit(settings, fal, Reconciler(store, settings), "midflight")
        with trio.fail_after(10):  # the daemon's poller has seen it running
            while (view := await store.training(rid)) is None or view.status != "IN_PROGRESS":
                await trio.sleep(0.1)
    sim.faults.api_timeout_rate = 1.0  # the next poll hangs: a FAL call is in flight
    sim.faults.api_timeout_seconds = 2.0
    await trio.sleep(0.5)

    started = trio.current_time()
    status = await daemon.stop(timeout=15.0)
    assert trio.current_time() - started < 10.0
    assert status == 0
    assert "STOPPING=1" in fake.lines
    log = daemon.log_path.read_text(encoding="utf-8")
    assert '"signal": "SIGTERM"' in log
    assert "Traceback" not in log

    db = tmp_path / "trainguard.db"
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    check = await trio.run_process(
        [sys.executable, "-m", "trainguard", "check", "--json", "--config", path],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    rows = {r["request_id"]: r for r in json.loads(check.stdout)}
    assert (rows[rid]["name"], rows[rid]["status"]) == ("midflight", "IN_PROGRESS")


async def test_sigterm_during_the_startup_sweep_is_a_clean_stop(
    nursery: trio.Nursery, sim: Simulator, tmp_path: Path
) -> None:
    fake = FakeSystemd(tmp_path / "notify")
    await nursery.start(fake.serve)
    path = demo_config(tmp_path, sim, webhook_port=free_port(), metrics_port=free_port())
    settings = config.load(path, env={"FAL_KEY": DEMO_KEY})
    async with actions.fal_client(settings) as fal, open_store(settings.database["url"]) as store:
        await submit(settings, fal, Reconciler(store, settings), "waiting")
    sim.faults.api_timeout_rate = 1.0  # the sweep's FAL calls hang: it cannot finish soon
    sim.faults.api_timeout_seconds = 5.0

    env = {**os.environ, "FAL_KEY": DEMO_KEY, "NOTIFY_SOCKET": str(fake.path)}
    with (tmp_path / "daemon.log").open("wb") as log:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trainguard", "run", "--config", path],
            stdout=log,
            stderr=log,
            env=env,
        )
    try:
        await fake.wait_for("STATUS=starting layer startup")
        await trio.sleep(0.3)  # inside the sweep, waiting on FAL
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            status = await process.wait()
    finally:
        process.kill()
        await process.wait()
    assert status == 0
    assert "STOPPING=1" in fake.lines
    assert "READY=1" not in fake.lines
    assert "Traceback" not in (tmp_path / "daemon.log").read_text(encoding="utf-8")


# -- crashes and start errors -----------------------------------------------------------------
async def test_a_crashing_layer_is_restarted_alone_with_backoff(
    nursery: trio.Nursery,
    tmp_path: Path,
    sim: Simulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor, "RESTART_BACKOFF_FIRST", 0.05)
    crasher = CrashingLayer()
    settings = daemon_settings(tmp_path / "db.sqlite", sim)
    daemon = make_daemon(settings, crasher)
    await nursery.start(daemon.run)
    assert daemon.fal is not None and daemon.reconciler is not None and daemon.store is not None
    rid = await submit(settings, daemon.fal, daemon.reconciler, "bystander")

    with trio.fail_after(8):  # the first start and five restarts
        while len(crasher.starts) < 6:
            await trio.sleep(0.02)
    gaps = [b - a for a, b in zip(crasher.starts, crasher.starts[1:], strict=False)]
    # Delays of 0.025-0.05, 0.05-0.1, ... 0.4-0.8 s: the fifth gap is far above the first.
    assert gaps[4] > 3 * gaps[0], gaps
    assert sum(gaps[:5]) >= 0.75
    restarts = sample(daemon, "trainguard_layer_restarts_total", "crasher")
    assert restarts in (5.0, 6.0)  # 6: the sixth run crashed already, its restart is pending
    assert sample(daemon, "trainguard_layer_errors_total", "crasher") == restarts

    with trio.fail_after(10):  # the other layers kept working meanwhile
        while (view := await daemon.store.training(rid)) is None or view.status != "COMPLETED":
            await trio.sleep(0.05)
    assert not view.is_fallback
    for name in CONTINUOUS_LAYERS:
        assert sample(daemon, "trainguard_layer_restarts_total", name) == 0.0
        assert sample(daemon, "trainguard_layer_up", name) == 1.0


async def test_a_layer_failing_before_it_started_stops_the_daemon(
    tmp_path: Path, sim: Simulator
) -> None:
    daemon = make_daemon(daemon_settings(tmp_path / "db.sqlite", sim), BrokenLayer())
    with pytest.raises(LayerStartError, match=r"layer broken failed to start: .*backend"):
        await daemon.run()
    assert not daemon.ready
    assert daemon.layers["webhook"].running is False  # what had started was stopped


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("metrics", "metrics listener failed to start"),
        ("webhook", "layer webhook failed to start"),
    ],
)
async def test_a_port_in_use_is_a_clear_start_error(
    tmp_path: Path, sim: Simulator, table: str, expected: str
) -> None:
    with port_in_use() as port:
        listen = f"127.0.0.1:{port}"
        settings = daemon_settings(tmp_path / "db.sqlite", sim, extra={table: {"listen": listen}})
        daemon = make_daemon(settings)
        with pytest.raises(StartError, match=f"{expected}.*cannot listen on {listen}") as info:
            await daemon.run()
    assert isinstance(info.value, LayerStartError) == (table == "webhook")


def run_config(tmp_path: Path, *, metrics: str, webhook: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "db.sqlite"}"\n'
        '[fal]\nqueue_url = "http://127.0.0.1:9"\n'
        f'[webhook]\nlisten = "{webhook}"\npublic_url = "http://{webhook}/fal/webhook"\n'
        f'[metrics]\nlisten = "{metrics}"\n',
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize("table", ["metrics", "webhook"])
def test_run_with_a_port_in_use_exits_with_one_clear_line(tmp_path: Path, table: str) -> None:
    with port_in_use() as port:
        taken, free = f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"
        path = run_config(
            tmp_path,
            metrics=taken if table == "metrics" else free,
            webhook=taken if table == "webhook" else free,
        )
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "FAL_KEY")}
        done = subprocess.run(
            [sys.executable, "-m", "trainguard", "run", "--config", str(path)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=30,
            check=False,
        )
    assert done.returncode == 1
    errors = done.stderr.splitlines()
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("trainguard: cannot start: ")
    assert f"cannot listen on {taken}" in errors[0]
    assert "Traceback" not in done.stdout + done.stderr


# -- the metrics listener -----------------------------------------------------------------------
def layer_samples(text: str) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels["layer"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "layer" in s.labels
    }


async def test_health_readiness_and_every_layer_series_from_the_start(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    gated = GatedLayer()
    daemon = make_daemon(daemon_settings(tmp_path / "db.sqlite", sim), gated)
    nursery.start_soon(daemon.run)
    with trio.fail_after(10):
        while daemon.ops_address is None:
            await trio.sleep(0.01)
    host, port = daemon.ops_address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=5) as client:
        # The listener is up while the first layer is still starting.
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503
        series = layer_samples((await client.get("/metrics")).text)
        for name in PER_LAYER_SERIES:
            for layer in (*BUILTIN_LAYERS, "gated"):
                assert series[(name, layer)] == 0.0, (name, layer)

        gated.release.set()
        with trio.fail_after(10):
            while (await client.get("/readyz")).status_code != 200:
                await trio.sleep(0.02)
        assert (await client.get("/healthz")).status_code == 200
        series = layer_samples((await client.get("/metrics")).text)
    for layer in (*CONTINUOUS_LAYERS, "gated"):
        assert series[("trainguard_layer_up", layer)] == 1.0, layer
    assert series[("trainguard_layer_up", "startup")] == 0.0  # its one sweep is done
    assert series[("trainguard_layer_passes_total", "startup")] == 1.0
    for layer in (*BUILTIN_LAYERS, "gated"):
        assert series[("trainguard_layer_restarts_total", layer)] == 0.0
        assert series[("trainguard_layer_errors_total", layer)] == 0.0
