"""SIGHUP re-reads config.toml: timings, log level, fallback policy and layer switches change
without a restart; an invalid file is refused and the running config is kept."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import trio
from structlog.testing import capture_logs

from tests.conftest import daemon_settings
from trainguard.plugins.manager import build_manager
from trainguard.supervisor import Daemon
from trainguard.testing.simulator import Simulator


def write_config(path: Path, sim: Simulator, db: Path, webhook: str, body: str) -> None:
    path.write_text(
        f'[database]\nurl = "sqlite:///{db}"\n'
        f'[fal]\nqueue_url = "{sim.base_url}"\njwks_url = "{sim.jwks_url}"\n'
        f'[webhook]\nlisten = "{webhook}"\npublic_url = "http://{webhook}/fal/webhook"\n'
        f'[metrics]\nlisten = "127.0.0.1:0"\n{body}',
        encoding="utf-8",
    )


async def start(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, body: str
) -> tuple[Daemon, Path]:
    base = daemon_settings(tmp_path / "db.sqlite", sim)
    path = tmp_path / "config.toml"
    write_config(path, sim, tmp_path / "db.sqlite", base.webhook["listen"], body)
    from trainguard import config

    settings = config.load(str(path), env={"FAL_KEY": "k"})
    daemon = Daemon(
        settings, pm=build_manager(entry_points=False), config_path=str(path), handle_signals=True
    )
    await nursery.start(daemon.run)
    return daemon, path


async def test_reload_applies_timings_policy_and_layer_switches(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    daemon, path = await start(nursery, tmp_path, sim, "[layers.poller]\ninterval_seconds = 60.0\n")
    assert daemon.layers["poller"].running
    write_config(
        path,
        sim,
        tmp_path / "db.sqlite",
        daemon.settings.webhook["listen"],
        "[layers.poller]\nenabled = false\n[layers.delayed]\nafter_seconds = 5.0\n"
        "[fallback]\nmode = 'fail'\n[log]\nlevel = 'debug'\n"
        "[fallback.url_templates]\nemergency = 'https://house.example.org/{name}.safetensors'\n",
    )
    assert await daemon.reload()
    assert not daemon.layers["poller"].running and daemon.layers["webhook"].running
    assert daemon.settings.layer("delayed")["after_seconds"] == 5.0
    assert daemon.reconciler is not None and daemon.reconciler.settings.fallback["mode"] == "fail"
    assert daemon.layers["delayed"].ctx.settings is daemon.settings  # layers see the new values
    assert daemon.settings.fallback_url("emergency", name="a", request_id="r").startswith(
        "https://house."
    )
    # and back on
    write_config(path, sim, tmp_path / "db.sqlite", daemon.settings.webhook["listen"], "")
    assert await daemon.reload()
    assert daemon.layers["poller"].running


async def test_invalid_reload_is_refused_and_the_running_config_kept(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    daemon, path = await start(nursery, tmp_path, sim, "[layers.poller]\ninterval_seconds = 7.0\n")
    before = daemon.settings
    for broken in (
        "[layers.poller]\ninterval_seconds = -1\n",
        "[[nonsense",
        "[layers.nosuch]\nenabled = true\n",
    ):
        path.write_text(path.read_text(encoding="utf-8") + broken, encoding="utf-8")
        assert not await daemon.reload()
        assert daemon.settings is before
        write_config(path, sim, tmp_path / "db.sqlite", before.webhook["listen"], "")
    assert all(r.running for name, r in daemon.layers.items() if name != "startup")


async def test_a_reload_with_bad_plugin_options_is_refused(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    """issue 9 item 12: `[layers.artifacts] concurrency = 0` was accepted by SIGHUP and the
    layer crash-looped on it; plugin options are checked on reload as at start."""
    daemon, path = await start(nursery, tmp_path, sim, "")
    assert daemon.layers["artifacts"].running
    before = daemon.settings
    restarts = daemon.metrics.registry.get_sample_value(
        "trainguard_layer_restarts_total", {"layer": "artifacts"}
    )
    for broken in ("concurrency = 0", "batch = -3", "retry_max_seconds = inf", "nope = 1"):
        path.write_text(
            path.read_text(encoding="utf-8") + f"[layers.artifacts]\n{broken}\n",
            encoding="utf-8",
        )
        with capture_logs() as lines:
            assert not await daemon.reload(), broken
        assert daemon.settings is before
        refused = [
            line
            for line in lines
            if line["event"].endswith("reload refused: the running config is kept")
        ]
        assert refused and refused[0]["error"].startswith("layers.artifacts."), lines
        write_config(path, sim, tmp_path / "db.sqlite", before.webhook["listen"], "")
    await trio.sleep(0.2)  # a crash loop would have shown by now
    assert daemon.layers["artifacts"].running
    assert (
        daemon.metrics.registry.get_sample_value(
            "trainguard_layer_restarts_total", {"layer": "artifacts"}
        )
        == restarts
    )
    path.write_text(
        path.read_text(encoding="utf-8") + "[layers.artifacts]\nconcurrency = 3\n",
        encoding="utf-8",
    )
    assert await daemon.reload()
    assert daemon.settings.layer("artifacts").options == {"concurrency": 3}


async def test_restart_only_settings_keep_their_running_value(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    daemon, path = await start(nursery, tmp_path, sim, "")
    url = daemon.settings.database["url"]
    text = path.read_text(encoding="utf-8").replace(url, "sqlite:///elsewhere.db")
    path.write_text(text + "[layers.poller]\ninterval_seconds = 3.0\n", encoding="utf-8")
    assert await daemon.reload()
    assert daemon.settings.database["url"] == url  # needs a restart: kept
    assert daemon.settings.layer("poller")["interval_seconds"] == 3.0  # applied


async def test_sighup_reloads(nursery: trio.Nursery, tmp_path: Path, sim: Simulator) -> None:
    daemon, path = await start(nursery, tmp_path, sim, "")
    write_config(
        path,
        sim,
        tmp_path / "db.sqlite",
        daemon.settings.webhook["listen"],
        "[layers.emergency]\nenabled = false\n",
    )
    os.kill(os.getpid(), signal.SIGHUP)
    with trio.fail_after(5):
        while daemon.layers["emergency"].running:
            await trio.sleep(0.02)
    assert daemon.settings.layer("emergency").enabled is False
