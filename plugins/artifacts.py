"""artifacts: keeps the files of every real result on our own disk.

FAL deletes its media (the LoRA ``.safetensors``, the config JSON) about a week after a
training, so a URL is not a kept result. Each pass of this layer:

1. finds COMPLETED real results (never a fallback) with a LoRA or config URL that have no
   ``artifacts`` row yet, and creates one row per file, due at once;
2. claims the rows that are due (``next_attempt_at <= now``, not stored, not given up, not
   held by another instance), ``concurrency`` of them, so each file is downloaded by one
   instance, and downloads them at once: streamed in chunks, held to FAL's ``file_size`` and to
   ``[artifacts] max_bytes``, hashed (sha256) while streaming, written under a temporary name
   in the final directory, fsynced, and renamed into place only when whole.

Files go to ``<[artifacts] dir>/<request_id>/<file_name>``, both names sanitised so that no
name can leave the directory. A failed download is retried with exponential backoff and
jitter (the row's ``next_attempt_at``). A 404/410 (FAL deleted the media), a file over
``max_bytes``, a URL that cannot be fetched at all, or ``max_attempts`` failures give up for
good: ``next_attempt_at`` becomes +inf, the reason stays in ``last_error``, one ⚠️ line is
logged.

The database is the schedule: the ``trainguard_training_finished`` hook only wakes the layer
early, so a restart loses nothing. ``[layers.artifacts] enabled = false`` keeps the layer from
starting, like any layer; ``[artifacts] enabled = false`` lets it start, say so, and end at
once: either switch turns the artifact store off. The options of ``[layers.artifacts]`` (see
:class:`Options`) are read every pass, so a reload applies them.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import secrets
from collections.abc import Mapping
from contextlib import aclosing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import httpx
import trio

from trainguard.api import Option, PluginContext, StashKey, validate_options
from trainguard.errors import DownloadError, GiveUp
from trainguard.logs import WARN
from trainguard.plugins.hookspecs import hookimpl

if TYPE_CHECKING:
    from trainguard.config import Settings
    from trainguard.layer import LayerContext
    from trainguard.store import ArtifactRow, TrainingView

NAME = "artifacts"
CHUNK_BYTES = 1024 * 1024
GONE = (404, 410)
DEFAULT_NAMES = {"lora": "lora.safetensors", "config": "config.json"}
MAX_NAME = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

#: The plugin's layer, in its stash (``trainguard_layers``); the hook wakes it.
LAYER: StashKey[ArtifactsLayer] = StashKey()


@dataclass(frozen=True)
class Options:
    """``[layers.artifacts]`` (``enabled`` is trainguard's; the store itself is ``[artifacts]``)."""

    concurrency: int = 2
    """Downloads at the same time."""
    batch: int = 100
    """Trainings looked at, and files downloaded, per pass at most."""
    max_attempts: int = 24
    """Failed downloads of one file before it is given up (about a day with the defaults)."""
    interval_seconds: float = 30.0
    """Longest wait between passes when nothing wakes the layer."""
    retry_first_seconds: float = 30.0
    """Wait after the first failure; doubled after each next one, with jitter."""
    retry_max_seconds: float = 3600.0
    """Longest wait between two attempts."""

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Options:
        """Check a raw ``[layers.artifacts]`` table against :data:`OPTIONS`, as the daemon does."""
        return cls(**validate_options(NAME, OPTIONS, raw))

    def backoff(self, attempts: int, rng: random.Random) -> float:
        """Seconds until the next attempt after ``attempts`` failures (jitter: 50-100 %)."""
        delay = min(self.retry_max_seconds, self.retry_first_seconds * 2 ** min(attempts - 1, 40))
        return delay * rng.uniform(0.5, 1.0)


#: ``[layers.artifacts]`` as the layer declares it: each field of :class:`Options`, a number
#: greater than 0 of the field's type, the field's default.
OPTIONS = {f.name: Option(type(f.default), f.default, above=0) for f in fields(Options)}


# -- names and paths ------------------------------------------------------------------------
def safe_name(raw: str, default: str) -> str:
    """The last path segment of ``raw`` as a harmless file name.

    Only ``[A-Za-z0-9._-]``, no leading dot (so never ``.``, ``..``, a hidden name or one of
    our temporary names), at most ``MAX_NAME`` characters (the tail, to keep the extension);
    ``default`` when nothing is left.
    """
    last = raw.replace("\\", "/").rsplit("/", 1)[-1]
    return _UNSAFE.sub("_", last)[-MAX_NAME:].lstrip(".") or default


def request_dir(request_id: str) -> str:
    """The directory name of a request: its id, or a sanitised id plus a hash when the id
    had to be changed (so two ids never share a directory)."""
    name = safe_name(request_id, "request")
    if name == request_id:
        return name
    return f"{name}-{hashlib.sha256(request_id.encode()).hexdigest()[:12]}"


def planned_files(settings: Settings, view: TrainingView, root: Path) -> list[dict[str, Any]]:
    """The artifact rows a real result asks for, one per file (kind ``lora``, ``config``).

    The name and expected size come from FAL's ``File`` in the raw result when its ``url`` is
    the stored one; the name falls back to the URL's last segment. A ``file_size`` that is not
    a whole number of bytes is ignored (the download is still held to ``max_bytes``); one over
    ``[artifacts] max_bytes`` makes the row given up at once, with the reason.
    """
    max_bytes = int(settings.artifacts["max_bytes"])
    result = view.result or {}
    ttype = settings.training_types.get(view.training_type)
    keys = {"lora": ttype.result_field if ttype else "diffusers_lora_file", "config": "config_file"}
    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    for kind, url in (("lora", view.lora_url), ("config", view.config_url)):
        if not url:
            continue
        meta = result.get(keys[kind])
        if not isinstance(meta, dict) or meta.get("url") != url:
            meta = {}
        raw_name = meta.get("file_name") or unquote(urlsplit(url).path)
        name = safe_name(str(raw_name), DEFAULT_NAMES[kind])
        if name in used:
            name = f"{kind}-{name}"
        used.add(name)
        row = {
            "request_id": view.request_id,
            "kind": kind,
            "url": url,
            "path": str(root / request_dir(view.request_id) / name),
            "expected_size": None,
        }
        size = meta.get("file_size")
        if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
            if size <= max_bytes:
                row["expected_size"] = size
            else:  # refused here, for this file alone: never downloaded, never retried
                shown = str(size) if size < 10**30 else f"{str(size)[:12]}... (a huge number)"
                row["last_error"] = f"GiveUp: file_size {shown} is over max_bytes ({max_bytes})"
                row["next_attempt_at"] = math.inf
        rows.append(row)
    return rows


# -- one download ---------------------------------------------------------------------------
class _PartFile:
    """A file being downloaded: written under a temporary name beside its final path, hashed
    as it is written, renamed into place only once whole and on disk. Blocking: run its
    methods in a worker thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.part"):  # left by a killed process
            stale.unlink(missing_ok=True)
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        self.file = open(self.tmp, "xb")  # noqa: SIM115  (closed by commit or discard)
        self.hash = hashlib.sha256()
        self.size = 0
        self.committed = False

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.hash.update(chunk)
        self.size += len(chunk)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        self.committed = True
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:  # the rename itself is durable only once the directory is synced
            os.fsync(directory)
        finally:
            os.close(directory)

    def discard(self) -> None:
        if not self.committed:
            self.file.close()
            self.tmp.unlink(missing_ok=True)


async def download(
    client: httpx.AsyncClient,
    url: str,
    path: Path,
    *,
    expected_size: int | None,
    max_bytes: int,
) -> tuple[int, str]:
    """Stream ``url`` into ``path`` atomically; return its size and sha256 (hex).

    Raises ``GiveUp`` (404/410, larger than ``max_bytes``) or ``DownloadError`` (any other
    status, a size other than ``expected_size``); transport errors pass through. Nothing is
    left at ``path`` or under a temporary name unless the whole file was stored.
    """
    if expected_size is not None and expected_size > max_bytes:
        raise GiveUp(f"file_size {expected_size} is over max_bytes ({max_bytes})")
    async with client.stream("GET", url) as response:
        if response.status_code in GONE:
            raise GiveUp(f"HTTP {response.status_code}: the file is gone")
        if response.status_code != 200:
            raise DownloadError(f"HTTP {response.status_code}")
        part = await trio.to_thread.run_sync(_PartFile, path)
        try:
            async with aclosing(response.aiter_bytes(CHUNK_BYTES)) as chunks:
                async for chunk in chunks:
                    if expected_size is not None and part.size + len(chunk) > expected_size:
                        raise DownloadError(f"more than the {expected_size} bytes of file_size")
                    if part.size + len(chunk) > max_bytes:
                        raise GiveUp(f"more than max_bytes ({max_bytes})")
                    await trio.to_thread.run_sync(part.write, chunk)
            if expected_size is not None and part.size != expected_size:
                raise DownloadError(f"got {part.size} bytes, file_size says {expected_size}")
            await trio.to_thread.run_sync(part.commit)
        finally:
            part.discard()
    return part.size, part.hash.hexdigest()


def _make_root(directory: str) -> Path:
    root = Path(directory).absolute()
    root.mkdir(parents=True, exist_ok=True)
    return root


# -- the layer ------------------------------------------------------------------------------
class ArtifactsLayer:
    """Downloads the files of real results into the artifact store (see the module doc)."""

    name = NAME
    order = 75
    options = OPTIONS

    def __init__(self, download_timeout: float) -> None:
        self.download_timeout = download_timeout
        self._wake = trio.Event()
        self._rng = random.Random()

    def heartbeat_timeout(self, options: Mapping[str, Any]) -> float:
        """It beats after every file (each bounded by ``[artifacts] timeout_seconds``) and
        every pass (at least every ``interval_seconds``)."""
        return 300.0 + Options(**options).interval_seconds + self.download_timeout

    def wake(self) -> None:
        """Run the next pass now."""
        self._wake.set()

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        settings = ctx.settings.artifacts  # read at start: a reload leaves [artifacts] as is
        if not settings["enabled"]:
            task_status.started()
            ctx.log.info("artifact store off ([artifacts] enabled = false): nothing downloaded")
            return
        root = await trio.to_thread.run_sync(_make_root, settings["dir"])
        async with httpx.AsyncClient(
            timeout=float(settings["timeout_seconds"]),
            follow_redirects=True,
            headers={"User-Agent": "trainguard"},
        ) as client:
            gone = await ctx.gone_owners("artifacts")
            task_status.started()
            while True:
                self._wake = trio.Event()
                options = Options(**ctx.options)  # a reload (SIGHUP) may change them
                await self._pass(ctx, client, root, options, gone)
                ctx.passed()
                await self._idle(ctx, options.interval_seconds)

    async def _idle(self, ctx: LayerContext, interval: float) -> None:
        """Until the next row is due (at once when rows are left over from a full batch),
        ``interval`` at most, or a wake."""
        due = await ctx.store.artifacts.next_due()
        wait = interval if due is None else min(interval, due - ctx.clock.now())
        if wait > 0:
            with trio.move_on_after(wait):
                await self._wake.wait()

    async def _pass(
        self,
        ctx: LayerContext,
        client: httpx.AsyncClient,
        root: Path,
        options: Options,
        gone: list[str],
    ) -> None:
        """Create the rows of new results, then claim what is due (one download per file
        across instances; ``gone``: owners whose claims are taken at once) and download it."""
        found = await ctx.store.artifacts.results_without_rows(options.batch)
        rows = [row for view in found for row in planned_files(ctx.settings, view, root)]
        if rows:
            refused = await ctx.store.artifacts.create(rows, ctx.clock.now())
            ctx.log.info("result files queued for download", trainings=len(found))
            if refused:
                ctx.log.warning(f"{WARN} result files the database refused", files=refused)
        # As many files as download at once, so a claim never waits: it lasts one download.
        limit = min(options.batch, options.concurrency)
        hold = ctx.claim_seconds + self.download_timeout
        claim = await ctx.store.artifacts.claim_due(
            ctx.clock.now(), limit, ctx.instance_id, hold, gone
        )
        ctx.claimed("artifacts", claim)
        limiter = trio.CapacityLimiter(options.concurrency)
        try:
            async with trio.open_nursery() as nursery:
                for artifact in claim.items:
                    nursery.start_soon(self._fetch, ctx, client, artifact, limiter, options)
        finally:
            await ctx.release("artifacts", [artifact.id for artifact in claim.items])

    async def _fetch(
        self,
        ctx: LayerContext,
        client: httpx.AsyncClient,
        artifact: ArtifactRow,
        limiter: trio.CapacityLimiter,
        options: Options,
    ) -> None:
        log = ctx.log.bind(
            request_id=artifact.request_id, name=artifact.training_name, kind=artifact.kind
        )
        attempts = artifact.attempts + 1
        async with limiter:
            try:
                with trio.fail_after(self.download_timeout):
                    size, sha256 = await download(
                        client,
                        artifact.url,
                        Path(artifact.path),
                        expected_size=artifact.expected_size,
                        max_bytes=int(ctx.settings.artifacts["max_bytes"]),
                    )
            except (GiveUp, httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
                await self._failed(ctx, log, artifact, attempts, self._describe(exc), math.inf)
            except (DownloadError, httpx.HTTPError, OSError, trio.TooSlowError) as exc:
                final = attempts >= options.max_attempts
                retry_at = (
                    math.inf if final else ctx.clock.now() + options.backoff(attempts, self._rng)
                )
                await self._failed(ctx, log, artifact, attempts, self._describe(exc), retry_at)
            else:
                now = ctx.clock.now()
                await ctx.store.artifacts.update(
                    artifact.id,
                    size=size,
                    sha256=sha256,
                    stored_at=now,
                    attempts=attempts,
                    next_attempt_at=now,
                    last_error=None,
                )
                if ctx.metrics is not None:
                    ctx.metrics.artifact_bytes.inc(size)
                log.info("result file stored", path=artifact.path, size=size, sha256=sha256)
            ctx.heartbeat()

    async def _failed(
        self,
        ctx: LayerContext,
        log: Any,
        artifact: ArtifactRow,
        attempts: int,
        error: str,
        retry_at: float,
    ) -> None:
        await ctx.store.artifacts.update(
            artifact.id, attempts=attempts, last_error=error, next_attempt_at=retry_at
        )
        if ctx.metrics is not None:
            ctx.metrics.artifact_failures.inc()
        if math.isinf(retry_at):
            log.warning(
                f"{WARN} result file not stored: download given up",
                url=artifact.url,
                error=error,
                attempts=attempts,
            )
        else:
            retry_in = round(retry_at - ctx.clock.now(), 1)
            log.info("result file download failed; will retry", error=error, retry_in=retry_in)

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, trio.TooSlowError):
            return f"not downloaded within {self.download_timeout:g} s"
        return f"{type(exc).__name__}: {exc}"[:2000]


@hookimpl
def trainguard_layers(settings: Settings, context: PluginContext) -> list[ArtifactsLayer]:
    layer = context.stash[LAYER] = ArtifactsLayer(float(settings.artifacts["timeout_seconds"]))
    return [layer]


@hookimpl
def trainguard_training_finished(training: TrainingView, context: PluginContext) -> None:
    """Wake the layer for a real result with files; its own pass does the work (a layer not
    running yet, or any more, just looks at once when it next runs)."""
    real = training.status == "COMPLETED" and not training.is_fallback
    layer = context.stash.get(LAYER, None)
    if real and (training.lora_url or training.config_url) and layer is not None:
        layer.wake()
