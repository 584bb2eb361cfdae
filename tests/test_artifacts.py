"""The artifact store (plugins/artifacts.py): the files of real results end up on our disk.

Each test runs an in-process daemon with the webhook and artifacts layers against the FAL
simulator, or against ``MediaServer`` below when the media host has to fail, stall or serve a
file too large for the simulator (which builds every reply in memory).
"""

from __future__ import annotations

import gc
import hashlib
import math
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from structlog.testing import capture_logs

from tests.conftest import daemon_settings
from tests.test_layers import submit, wait_for
from trainguard import http
from trainguard.config import ConfigError, Settings
from trainguard.logs import WARN
from trainguard.plugins.artifacts import Options, request_dir, safe_name
from trainguard.plugins.manager import build_manager
from trainguard.reconcile import Kind, Observation
from trainguard.store import Artifact
from trainguard.supervisor import Daemon
from trainguard.testing import simulator
from trainguard.testing.simulator import Simulator

FAST = {
    "interval_seconds": 0.2,
    "retry_first_seconds": 0.05,
    "retry_max_seconds": 0.2,
    "max_attempts": 3,
}
MiB = 1024 * 1024


# -- helpers --------------------------------------------------------------------------------
def make_settings(
    tmp_path: Path, sim: Simulator, *, artifacts: dict[str, Any] | None = None, **options: Any
) -> Settings:
    return daemon_settings(
        tmp_path / "db.sqlite",
        sim,
        only=("webhook", "artifacts"),
        layers={"artifacts": {**FAST, **options}},
        extra={"artifacts": {"dir": str(tmp_path / "artifacts"), **(artifacts or {})}},
    )


async def start(nursery: trio.Nursery, settings: Settings) -> Daemon:
    daemon = Daemon(settings, pm=build_manager(entry_points=False))
    await nursery.start(daemon.run)
    return daemon


async def artifacts(daemon: Daemon, request_id: str) -> dict[str, dict[str, Any]]:
    """The artifact rows of a training, by kind."""
    assert daemon.store is not None

    def get(conn: Any) -> dict[str, dict[str, Any]]:
        query = Artifact.select().where(Artifact.request_id == request_id).dicts()
        return {row["kind"]: row for row in query}

    return await daemon.store.read(get)


def stored(daemon: Daemon, *ids: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        for rid in ids:
            rows = await artifacts(daemon, rid)
            if len(rows) != 2 or any(r["stored_at"] is None for r in rows.values()):
                return False
        return True

    return check


def sample(daemon: Daemon, name: str, **labels: str) -> float:
    return daemon.metrics.registry.get_sample_value(name, labels) or 0.0


def failures(daemon: Daemon) -> float:
    return sample(daemon, "trainguard_artifact_downloads_failed_total")


async def passes_after(daemon: Daemon, n: int) -> None:
    """Wait for ``n`` more complete passes of the artifacts layer."""
    name = "trainguard_layer_passes_total"
    target = sample(daemon, name, layer="artifacts") + n

    async def done() -> bool:
        return sample(daemon, name, layer="artifacts") >= target

    await wait_for(done)


def leftovers(root: Path) -> list[Path]:
    """Temporary files left in the artifact store."""
    return [p for p in root.rglob("*") if p.name.startswith(".")]


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class MediaServer:
    """A loopback media host whose files are streamed in chunks; it can fail or stall."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[int, Callable[[], Iterable[bytes]]]] = {}
        self.status: int | None = None
        """When set, every request gets this status and no body."""
        self.stall: trio.Event | None = None
        """When set, a body stops after its first chunk until this event is set."""
        self.base_url = ""

    def add(self, path: str, data: bytes) -> str:
        self.files[path] = (
            len(data),
            lambda: [data[i : i + 65536] for i in range(0, len(data), 65536)],
        )
        return self.base_url + path

    async def serve(self, nursery: trio.Nursery) -> None:
        host, port = await nursery.start(http.serve_asgi, self.app, "127.0.0.1:0")
        self.base_url = f"http://{host}:{port}"

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": f"{message['type']}.complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        size, chunks = self.files.get(scope["path"], (0, None))
        status = self.status or (200 if chunks else 404)
        length = size if status == 200 else 0
        headers = [(b"content-length", str(length).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if status == 200 and chunks is not None:
            for i, chunk in enumerate(chunks()):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if i == 0 and self.stall is not None:
                    await self.stall.wait()
        await send({"type": "http.response.body", "body": b""})


def file_output(lora_url: str, lora_size: int, config_url: str, config_size: int) -> dict[str, Any]:
    """A portrait trainer's output (FAL ``File`` objects) for files on ``MediaServer``."""
    return {
        "diffusers_lora_file": {
            "url": lora_url,
            "content_type": "application/octet-stream",
            "file_name": "pytorch_lora_weights.safetensors",
            "file_size": lora_size,
        },
        "config_file": {
            "url": config_url,
            "content_type": "application/json",
            "file_name": "config.json",
            "file_size": config_size,
        },
    }


async def finish_with(daemon: Daemon, request_id: str, output: dict[str, Any]) -> None:
    """Register a training and hand reconcile its real result, as the webhook layer does."""
    assert daemon.reconciler is not None
    await daemon.reconciler.register(
        name="ann", training_type="portrait", request_id=request_id, layer="test"
    )
    change = await daemon.reconciler.observe(
        Observation(request_id, "webhook", Kind.SUCCEEDED, output=output)
    )
    assert change.kind == "result"


def hosted(server: MediaServer, request_id: str, lora: bytes) -> dict[str, Any]:
    config = b'{"steps": 2500}'
    return file_output(
        server.add(f"/m/{request_id}/lora", lora),
        len(lora),
        server.add(f"/m/{request_id}/config", config),
        len(config),
    )


# -- names ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.safetensors"),
        ("../../etc/passwd", "passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("..", "default"),
        (".hidden", "hidden"),
        ("a b/c d?.json", "c_d_.json"),
        ("", "default"),
    ],
)
def test_safe_name_keeps_names_inside(raw: str, expected: str) -> None:
    assert safe_name(raw, "default") == expected


def test_request_dir_never_merges_two_ids() -> None:
    assert request_dir("0f1e2d3c-aaaa") == "0f1e2d3c-aaaa"
    assert request_dir("../x") != request_dir("/x")
    assert "/" not in request_dir("../x") and not request_dir("..").startswith(".")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, r"layers\.artifacts\.concurrency: must be an integer greater than 0"),
        ({"max_attempts": 2.5}, r"layers\.artifacts\.max_attempts: must be an integer"),
        ({"interval_seconds": True}, r"layers\.artifacts\.interval_seconds: must be a finite"),
        ({"nope": 1}, r"layers\.artifacts\.nope: unknown key"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Options.parse(options)


# -- against the simulator ------------------------------------------------------------------
async def test_real_results_are_stored_with_size_and_sha256(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    settings = make_settings(tmp_path, sim)
    daemon = await start(nursery, settings)
    assert daemon.fal is not None and daemon.reconciler is not None
    ids = await submit(settings, daemon.fal, daemon.reconciler, n=2)
    await wait_for(stored(daemon, *ids))

    total = 0
    async with httpx.AsyncClient() as client:
        for rid in ids:
            output = sim.truth[rid].output
            assert output is not None
            rows = await artifacts(daemon, rid)
            for kind, key in (("lora", "diffusers_lora_file"), ("config", "config_file")):
                served = (await client.get(output[key]["url"])).content
                row = rows[kind]
                assert Path(row["path"]) == tmp_path / "artifacts" / rid / output[key]["file_name"]
                assert await trio.Path(row["path"]).read_bytes() == served
                assert row["size"] == row["expected_size"] == len(served)
                assert row["sha256"] == hashlib.sha256(served).hexdigest()
                assert (row["attempts"], row["last_error"]) == (1, None)
                total += len(served)
    assert leftovers(tmp_path / "artifacts") == []
    assert sample(daemon, "trainguard_artifact_bytes_downloaded_total") == total
    assert failures(daemon) == 0


async def test_fallbacks_and_style_results_get_no_artifact(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    settings = make_settings(tmp_path, sim)
    daemon = await start(nursery, settings)
    assert daemon.fal is not None and daemon.reconciler is not None
    (failed,) = await submit(settings, daemon.fal, daemon.reconciler, 1, outcome="fail")
    # A result without its LoRA: a fallback, although FAL gave a real config file.
    (no_lora,) = await submit(settings, daemon.fal, daemon.reconciler, 1, outcome="no_lora")
    (style,) = await submit(settings, daemon.fal, daemon.reconciler, 1, ttype="style")
    (real,) = await submit(settings, daemon.fal, daemon.reconciler, 1)
    await wait_for(stored(daemon, real))

    async def all_finished() -> bool:
        views = [await daemon.store.training(rid) for rid in (failed, no_lora, style)]  # type: ignore[union-attr]
        return all(v is not None and v.finished for v in views)

    await wait_for(all_finished)
    await passes_after(daemon, 2)  # at least one whole pass after they all finished
    assert daemon.store is not None
    for rid in (failed, no_lora):
        view = await daemon.store.training(rid)
        assert view is not None and view.is_fallback
    view = await daemon.store.training(style)
    assert view is not None and view.finetune_id and not view.is_fallback
    for rid in (failed, no_lora, style):
        assert await artifacts(daemon, rid) == {}
        assert not (tmp_path / "artifacts" / rid).exists()


async def test_an_upgraded_fallback_gets_its_files(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    # payload_error spoils only the webhook: a fallback first, then completeness finds the
    # real result at FAL and upgrades it; the upgrade is what brings the files.
    settings = daemon_settings(
        tmp_path / "db.sqlite",
        sim,
        only=("webhook", "completeness", "artifacts"),
        layers={"artifacts": FAST},
        extra={"artifacts": {"dir": str(tmp_path / "artifacts")}},
    )
    daemon = await start(nursery, settings)
    assert daemon.fal is not None and daemon.reconciler is not None and daemon.store is not None
    (rid,) = await submit(settings, daemon.fal, daemon.reconciler, 1, outcome="payload_error")
    await wait_for(stored(daemon, rid))
    view = await daemon.store.training(rid)
    assert view is not None and not view.is_fallback and view.result_layer == "completeness"
    kinds = [e["kind"] for e in await daemon.store.events(rid)]
    assert kinds[-2:] == ["fallback", "upgrade"]


async def test_a_backlog_is_worked_through_batch_by_batch(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    # One training and one file per pass, and a long interval: the rows left due after a
    # full batch must bring the next pass at once, not after interval_seconds.
    settings = make_settings(tmp_path, sim, batch=1, interval_seconds=60.0)
    daemon = await start(nursery, settings)
    assert daemon.fal is not None and daemon.reconciler is not None
    ids = await submit(settings, daemon.fal, daemon.reconciler, n=3)
    await wait_for(stored(daemon, *ids))


@pytest.mark.parametrize("change", [-100, +100])
async def test_a_size_mismatch_is_retried_then_given_up(
    nursery: trio.Nursery,
    tmp_path: Path,
    sim: Simulator,
    monkeypatch: pytest.MonkeyPatch,
    change: int,
) -> None:
    real_bytes = simulator._lora_bytes

    def wrong_size(request_id: str) -> bytes:
        data = real_bytes(request_id)
        return data[:change] if change < 0 else data + b"\0" * change

    monkeypatch.setattr(simulator, "_lora_bytes", wrong_size)
    settings = make_settings(tmp_path, sim)  # max_attempts = 3
    daemon = await start(nursery, settings)
    assert daemon.fal is not None and daemon.reconciler is not None
    (rid,) = await submit(settings, daemon.fal, daemon.reconciler, 1)

    async def given_up() -> bool:
        row = (await artifacts(daemon, rid)).get("lora")
        return row is not None and row["next_attempt_at"] == math.inf

    await wait_for(given_up)
    await passes_after(daemon, 2)
    rows = await artifacts(daemon, rid)
    lora, config = rows["lora"], rows["config"]
    assert (lora["attempts"], lora["stored_at"], lora["sha256"]) == (3, None, None)
    assert "file_size" in lora["last_error"]
    assert config["stored_at"] is not None  # the other file of the same result is kept
    assert failures(daemon) == 3
    assert not await trio.Path(lora["path"]).exists()
    assert leftovers(tmp_path / "artifacts") == []


async def test_expired_media_fail_for_good_at_once(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    sim.faults.result_expiry_seconds = 0.0  # the files answer 404 from completion on
    settings = make_settings(tmp_path, sim, max_attempts=50)
    with capture_logs() as logs:
        daemon = await start(nursery, settings)
        assert daemon.fal is not None and daemon.reconciler is not None
        (rid,) = await submit(settings, daemon.fal, daemon.reconciler, 1)

        async def both_given_up() -> bool:
            rows = await artifacts(daemon, rid)
            return len(rows) == 2 and all(r["next_attempt_at"] == math.inf for r in rows.values())

        await wait_for(both_given_up)
        await passes_after(daemon, 3)
    view = await daemon.store.training(rid)  # type: ignore[union-attr]
    assert view is not None and view.status == "COMPLETED" and not view.is_fallback
    for row in (await artifacts(daemon, rid)).values():
        assert (row["attempts"], row["stored_at"]) == (1, None)
        assert row["last_error"].startswith("GiveUp: HTTP 404")
    assert failures(daemon) == 2
    warnings = [e for e in logs if e.get("layer") == "artifacts" and e["event"].startswith(WARN)]
    assert sorted(w["kind"] for w in warnings) == ["config", "lora"]


async def test_store_off_downloads_nothing(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    settings = make_settings(tmp_path, sim, artifacts={"enabled": False})
    daemon = await start(nursery, settings)
    assert daemon.fal is not None and daemon.reconciler is not None
    (rid,) = await submit(settings, daemon.fal, daemon.reconciler, 1)

    async def done() -> bool:
        view = await daemon.store.training(rid)  # type: ignore[union-attr]
        return view is not None and view.finished

    await wait_for(done)
    assert not daemon.layers["artifacts"].running  # it said so at start, and ended
    assert await artifacts(daemon, rid) == {}
    assert not (tmp_path / "artifacts").exists()


# -- against a media host of our own --------------------------------------------------------
async def test_media_host_down_then_up(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    server = MediaServer()
    await server.serve(nursery)
    server.status = 503
    daemon = await start(nursery, make_settings(tmp_path, sim, max_attempts=100))
    lora = b"L" * 300_000
    output = hosted(server, "req-1", lora)
    output["diffusers_lora_file"]["file_name"] = "../../escape.safetensors"
    await finish_with(daemon, "req-1", output)

    async def failing() -> bool:
        rows = await artifacts(daemon, "req-1")
        return len(rows) == 2 and all(r["attempts"] >= 2 for r in rows.values())

    await wait_for(failing)
    rows = await artifacts(daemon, "req-1")
    assert rows["lora"]["last_error"] == "DownloadError: HTTP 503"
    assert rows["lora"]["next_attempt_at"] < math.inf
    assert failures(daemon) >= 4
    server.status = None
    await wait_for(stored(daemon, "req-1"))
    row = (await artifacts(daemon, "req-1"))["lora"]
    assert Path(row["path"]) == tmp_path / "artifacts" / "req-1" / "escape.safetensors"
    assert await trio.Path(row["path"]).read_bytes() == lora
    assert row["sha256"] == hashlib.sha256(lora).hexdigest()
    assert leftovers(tmp_path / "artifacts") == []


async def test_a_restart_in_the_middle_of_a_download(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    server = MediaServer()
    await server.serve(nursery)
    server.stall = trio.Event()  # the body stops after its first chunk
    settings = make_settings(tmp_path, sim)
    lora = bytes(range(256)) * 2048  # 512 KiB: several chunks

    async with trio.open_nursery() as first:
        daemon = await start(first, settings)
        await finish_with(daemon, "req-2", hosted(server, "req-2", lora))

        async def half_written() -> bool:
            return any(leftovers(tmp_path / "artifacts"))

        await wait_for(half_written)  # rows created, the LoRA is being written
        first.cancel_scope.cancel()  # the daemon stops in the middle

    root = tmp_path / "artifacts"
    assert leftovers(root) == []  # the partial file went with the cancelled download
    assert not (root / "req-2" / "pytorch_lora_weights.safetensors").exists()
    # What a SIGKILL would leave behind instead; the next download of that file removes it.
    await trio.Path(root / "req-2" / ".pytorch_lora_weights.safetensors.dead.part").write_bytes(
        b"partial"
    )
    server.stall.set()
    daemon = await start(nursery, settings)
    await wait_for(stored(daemon, "req-2"))
    row = (await artifacts(daemon, "req-2"))["lora"]
    assert await trio.Path(row["path"]).read_bytes() == lora
    assert row["sha256"] == hashlib.sha256(lora).hexdigest()
    assert leftovers(root) == []


async def test_a_large_file_is_streamed_not_held_in_memory(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    def big() -> Iterator[bytes]:  # 50 MiB, made on the fly, 64 KiB at a time
        for i in range(800):
            yield hashlib.sha256(i.to_bytes(4, "big")).digest() * 2048

    expected = hashlib.sha256()
    for chunk in big():
        expected.update(chunk)
    server = MediaServer()
    await server.serve(nursery)
    server.files["/m/big/lora"] = (50 * MiB, big)
    config = b"{}"
    output = file_output(
        f"{server.base_url}/m/big/lora", 50 * MiB, server.add("/m/big/config", config), len(config)
    )
    daemon = await start(nursery, make_settings(tmp_path, sim))
    gc.collect()
    before = peak = rss()

    async def sample_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss())
            await trio.sleep(0.005)

    async with trio.open_nursery() as sampler:
        sampler.start_soon(sample_rss)
        await finish_with(daemon, "big", output)
        await wait_for(stored(daemon, "big"), timeout=20)
        sampler.cancel_scope.cancel()
    row = (await artifacts(daemon, "big"))["lora"]
    assert row["size"] == 50 * MiB == (await trio.Path(row["path"]).stat()).st_size
    assert row["sha256"] == expected.hexdigest()
    assert peak - before < 25 * MiB, f"RSS grew by {(peak - before) / MiB:.1f} MiB"


@pytest.mark.parametrize("bad_size", [2**64, 2**63, 5000])
async def test_a_file_size_beyond_max_bytes_is_refused_for_that_file_alone(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, bad_size: int
) -> None:
    """Regression (issue 9, item 1): a ``file_size`` above 2^63 made every pass's batch insert
    raise (a crash loop), so no later result got its files. Now the size is judged where it
    enters: over ``max_bytes`` refuses that file alone, recorded and visible in ``check``."""
    from trainguard.store import artifacts_by_request

    server = MediaServer()
    await server.serve(nursery)
    daemon = await start(nursery, make_settings(tmp_path, sim, artifacts={"max_bytes": 4096}))
    bad = hosted(server, "bad", b"L" * 100)
    bad["diffusers_lora_file"]["file_size"] = bad_size
    await finish_with(daemon, "bad", bad)
    await finish_with(daemon, "good", hosted(server, "good", b"G" * 100))
    await wait_for(stored(daemon, "good"))

    async def config_stored() -> bool:
        row = (await artifacts(daemon, "bad")).get("config")
        return row is not None and row["stored_at"] is not None

    await wait_for(config_stored)
    await passes_after(daemon, 2)
    lora = (await artifacts(daemon, "bad"))["lora"]
    assert (lora["stored_at"], lora["expected_size"], lora["attempts"]) == (None, None, 0)
    assert lora["next_attempt_at"] == math.inf
    assert "file_size" in lora["last_error"] and "max_bytes" in lora["last_error"]
    assert daemon.store is not None
    shown = {f["kind"]: f for f in (await daemon.store.read(artifacts_by_request))["bad"]}
    assert shown["lora"]["given_up"] and "max_bytes" in shown["lora"]["last_error"]
    assert sample(daemon, "trainguard_layer_errors_total", layer="artifacts") == 0
    assert sample(daemon, "trainguard_layer_up", layer="artifacts") == 1
    assert not await trio.Path(lora["path"]).exists()


async def test_one_row_the_database_refuses_never_stops_the_batch(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever makes one planned row unstorable, the other rows of the batch are queued."""
    from trainguard.plugins import artifacts as plugin

    real = plugin.planned_files

    def poisoned(settings: Settings, view: Any, root: Path) -> list[dict[str, Any]]:
        rows = real(settings, view, root)
        if view.request_id == "bad":
            rows[0]["expected_size"] = 2**64  # SQLite cannot hold it: the insert raises
        return rows

    monkeypatch.setattr(plugin, "planned_files", poisoned)
    server = MediaServer()
    await server.serve(nursery)
    daemon = await start(nursery, make_settings(tmp_path, sim))
    await finish_with(daemon, "bad", hosted(server, "bad", b"L" * 100))
    await finish_with(daemon, "good", hosted(server, "good", b"G" * 100))
    await wait_for(stored(daemon, "good"))
    rows = await artifacts(daemon, "bad")
    assert rows["lora"]["next_attempt_at"] == math.inf
    assert rows["lora"]["last_error"].startswith("not queued: ")
    assert sample(daemon, "trainguard_layer_errors_total", layer="artifacts") == 0


async def test_two_instances_download_each_file_once(
    nursery: trio.Nursery, tmp_path: Path, sim: Simulator, database_url: str
) -> None:
    """Issue 11: two daemons on one database, both keeping artifacts: each file is claimed,
    and so downloaded, by one of them."""
    server = MediaServer()
    requests: dict[str, int] = {}
    app = server.app

    async def counting(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            requests[scope["path"]] = requests.get(scope["path"], 0) + 1
        await app(scope, receive, send)

    server.app = counting  # type: ignore[method-assign]
    await server.serve(nursery)
    settings = daemon_settings(
        tmp_path / "db.sqlite",
        sim,
        only=("artifacts",),
        layers={"artifacts": FAST},
        extra={"artifacts": {"dir": str(tmp_path / "artifacts")}},
        url=database_url,
    )
    a, b = await start(nursery, settings), await start(nursery, settings)
    rids = [f"req-{i}" for i in range(8)]
    for i, rid in enumerate(rids):
        await finish_with((a, b)[i % 2], rid, hosted(server, rid, bytes([i]) * 100_000))
    await wait_for(stored(a, *rids))
    assert len(requests) == 16 and set(requests.values()) == {1}, requests

    async def released() -> bool:  # every claim is given back after its pass
        rows = [r for rid in rids for r in (await artifacts(a, rid)).values()]
        return all(r["claimed_by"] is None for r in rows)

    await wait_for(released)
