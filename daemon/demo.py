"""`trainguard demo`: the simulator and the daemon on loopback, under faults, in a minute.

The simulator runs in this process; the daemon runs as a real subprocess (``trainguard run``)
on a temporary SQLite database with compressed timings, so that killing it with SIGKILL
mid-way is a real crash. A few dozen trainings are submitted, with webhooks dropped,
duplicated and badly signed, API errors, one failed training, one result without its LoRA
and one training that never finishes. At the end every training is compared with the
simulator's own record of the truth, and a table and a verdict line are printed.

The pieces (``DaemonProcess``, ``demo_config``, ``compare_with_truth``) are reused by the
end-to-end tests.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from daemon import actions, config
from daemon.fal import FalRequestError
from daemon.fal import Kind as FalKind
from daemon.reconcile import Reconciler
from daemon.simulator import Faults, SimConfig, Simulator, Truth
from daemon.store import TERMINAL, Event, Store, Training, TrainingView, open_store

DEMO_KEY = "demo-key-not-secret"
TYPES = ("portrait", "fast", "style")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_config(
    workdir: Path,
    sim: Simulator,
    *,
    webhook_port: int,
    metrics_port: int,
    deadline_seconds: float = 20.0,
    layers: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """A config.toml for a daemon against ``sim`` with timings compressed ~30x."""
    tables: dict[str, dict[str, Any]] = {
        "poller": {
            "first_check_after_seconds": 2.0,
            "interval_seconds": 2.0,
            "max_backoff_seconds": 4.0,
        },
        "delayed": {"after_seconds": 8.0, "verify_after_seconds": 2.0},
        "completeness": {"interval_seconds": 4.0},
        "emergency": {"deadline_seconds": deadline_seconds},
    }
    for name, values in (layers or {}).items():
        tables.setdefault(name, {}).update(values)
    lines = [
        "[database]",
        f'url = "sqlite:///{workdir / "trainguard.db"}"',
        "[fal]",
        f'queue_url = "{sim.base_url}"',
        f'jwks_url = "{sim.jwks_url}"',
        "max_requests_per_second = 500.0",
        "timeout_seconds = 3.0",
        "[webhook]",
        f'listen = "127.0.0.1:{webhook_port}"',
        f'public_url = "http://127.0.0.1:{webhook_port}/fal/webhook"',
        "jwks_cache_seconds = 30.0",
        "[metrics]",
        f'listen = "127.0.0.1:{metrics_port}"',
    ]
    for name, values in tables.items():
        lines.append(f"[layers.{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = workdir / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@dataclass
class DaemonProcess:
    """``trainguard run`` as a subprocess that can be started, killed and stopped."""

    config_path: str
    metrics_port: int
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    process: trio.Process | None = None
    starts: int = 0

    async def start(self, timeout: float = 30.0) -> None:
        """Start it and return once /readyz answers 200 (the startup sweep is done)."""
        env = {**os.environ, "FAL_KEY": DEMO_KEY, **self.env}
        with self.log_path.open("ab") as log:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "daemon", "run", "--config", self.config_path],
                stdout=log,
                stderr=log,
                env=env,
            )
        self.starts += 1
        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        async with httpx.AsyncClient(timeout=1.0) as client:
            with trio.fail_after(timeout):
                while True:
                    if self.process.poll() is not None:
                        raise RuntimeError(f"the daemon exited at start; see {self.log_path}")
                    try:
                        if (await client.get(url)).status_code == 200:
                            return
                    except httpx.HTTPError:
                        pass
                    await trio.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no goodbye, no cleanup; what was committed must be enough."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(timeout):
                return await self.process.wait()
            self.process.kill()
        return await self.process.wait()


# -- the verdict ---------------------------------------------------------------------------
EXPECTED_FALLBACK = {"fail": "fal_failure", "no_lora": "no_artifact", "never": "deadline"}
#: Outcomes with a real result at FAL. A payload_error spoils only the webhook: the result
#: fetch still answers, so a fallback applied on it must have been upgraded by the end.
REAL_OUTCOMES = ("ok", "payload_error")


def _real_result(truth: Truth) -> str | None:
    output = truth.output or {}
    lora = output.get("diffusers_lora_file")
    if isinstance(lora, dict):
        return lora.get("url")
    return output.get("finetune_id")


def judge(view: TrainingView | None, truth: Truth) -> str | None:
    """None when the stored training matches the truth, else what is wrong."""
    if view is None:
        return "not in the store"
    if view.status not in TERMINAL:
        return f"not finished ({view.status})"
    if truth.outcome in REAL_OUTCOMES:
        if view.is_fallback:
            return f"fallback ({view.fallback_kind}) although FAL had a real result"
        if (view.lora_url or view.finetune_id) != _real_result(truth):
            return "stored result differs from FAL's"
        return None
    expected = EXPECTED_FALLBACK.get(truth.outcome)
    if not view.is_fallback or view.fallback_kind != expected:
        return f"expected a {expected} fallback, found {view.fallback_kind or view.status}"
    if not view.fallback_layer or not view.fallback_reason:
        return "fallback without its layer and reason"
    return None


@dataclass
class Report:
    rows: list[tuple[TrainingView | None, Truth, str | None]]
    results_by_layer: Counter[str]
    fallbacks_by_layer: Counter[str]
    upgrades_by_layer: Counter[str]
    double_transitions: list[str]
    restarts: int = 0

    @property
    def problems(self) -> list[str]:
        out = [f"{t.request_id}: {p}" for _, t, p in self.rows if p]
        out += [f"{rid}: a transition applied twice" for rid in self.double_transitions]
        return out

    def table(self) -> str:
        lines = [
            f"{'training':<10} {'type':<9} {'FAL truth':<13} {'status':<10} {'result by':<12} {'fallback':<28} ok"
        ]
        for view, truth, problem in self.rows:
            name = view.name if view else truth.request_id[:8]
            fallback = (
                f"{view.fallback_layer} ({view.fallback_kind})"
                if view and view.is_fallback
                else "-"
            )
            lines.append(
                f"{name:<10} {(view.training_type if view else '?'):<9} {truth.outcome:<13} "
                f"{(view.status if view else '-'):<10} {(view.result_layer or '-') if view else '-':<12} "
                f"{fallback:<28} {'yes' if problem is None else 'NO: ' + problem}"
            )
        lines.append("")
        lines.append(f"{'layer':<14} {'recovered':>9} {'fallbacks':>9} {'upgrades':>8}")
        layers = sorted(
            set(self.results_by_layer) | set(self.fallbacks_by_layer) | set(self.upgrades_by_layer)
        )
        for layer in layers:
            lines.append(
                f"{layer:<14} {self.results_by_layer[layer]:>9} {self.fallbacks_by_layer[layer]:>9} "
                f"{self.upgrades_by_layer[layer]:>8}"
            )
        return "\n".join(lines)

    def verdict(self) -> str:
        total = len(self.rows)
        finished = sum(1 for v, _, _ in self.rows if v is not None and v.status in TERMINAL)
        wrong_fallbacks = sum(
            1
            for v, t, _ in self.rows
            if t.outcome in REAL_OUTCOMES and v is not None and v.is_fallback
        )
        real = sum(1 for _, t, p in self.rows if t.outcome in REAL_OUTCOMES and p is None)
        word = "PASS" if not self.problems else "FAIL"
        return (
            f"verdict: {word}: {finished}/{total} trainings accounted for; "
            f"{real}/{sum(1 for _, t, _ in self.rows if t.outcome in REAL_OUTCOMES)} real results stored as FAL gave them; "
            f"{wrong_fallbacks} fallbacks where a real result existed; "
            f"{len(self.double_transitions)} transitions applied twice; daemon restarts: {self.restarts}"
        )


def _history() -> tuple[Counter[str], Counter[str], Counter[str], list[str]]:
    results: Counter[str] = Counter()
    fallbacks: Counter[str] = Counter()
    upgrades: Counter[str] = Counter()
    seen: Counter[tuple[str, str, str | None]] = Counter()
    for event in Event.select().order_by(Event.id):
        if event.kind == "result":
            results[event.layer] += 1
        elif event.kind == "fallback":
            fallbacks[event.layer] += 1
        elif event.kind == "upgrade":
            upgrades[event.layer] += 1
        if event.kind in ("result", "fallback", "status", "cancelled"):
            seen[(event.request_id, event.kind, event.to_status)] += 1
    doubles = sorted({rid for (rid, _, _), n in seen.items() if n > 1})
    return results, fallbacks, upgrades, doubles


async def compare_with_truth(store: Store, truths: Sequence[Truth]) -> Report:
    """Judge every training in the store against the simulator's truth."""

    def read() -> tuple[dict[str, TrainingView], tuple[Any, ...]]:
        views = {t.request_id: TrainingView.of(t) for t in Training.select()}
        return views, _history()

    views, (results, fallbacks, upgrades, doubles) = await store.read(read)
    rows = [(views.get(t.request_id), t, judge(views.get(t.request_id), t)) for t in truths]
    return Report(rows, results, fallbacks, upgrades, doubles)


async def submit_until_accepted(
    settings: config.Settings, fal: Any, reconciler: Reconciler, *, attempts: int = 8, **kwargs: Any
) -> TrainingView:
    """Submit, resubmitting on a transient refusal.

    Only safe against the simulator, which injects its API faults before it creates anything;
    against FAL a timed-out submit may have started a training (the client does not resend it).
    """
    for attempt in range(attempts):
        try:
            return await actions.submit(settings, fal, reconciler, **kwargs)
        except FalRequestError as exc:
            if exc.answer.kind != FalKind.TRANSIENT or attempt == attempts - 1:
                raise
            await trio.sleep(0.2)
    raise AssertionError("unreachable")


# -- the demo itself -----------------------------------------------------------------------
def _outcome(i: int, total: int) -> str:
    """One of each fault in the first wave, a payload_error in the second, the rest real."""
    return {0: "fail", 1: "no_lora", 2: "never", total // 2 + 1: "payload_error"}.get(i, "ok")


async def run_demo(
    workdir: Path, *, trainings: int = 30, seed: int = 7, out: Any = sys.stdout
) -> Report:
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    sim = Simulator(
        SimConfig(
            queue_seconds=1.0,
            run_seconds=4.0,
            seed=seed,
            faults=Faults(
                drop_webhook=0.3, duplicate_webhook=0.1, bad_signature=0.1, api_error_rate=0.05
            ),
            webhook_retry_delays=(0.5, 1.0, 2.0),
        )
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve)
        metrics_port = free_port()
        path = demo_config(workdir, sim, webhook_port=free_port(), metrics_port=metrics_port)
        settings = config.load(path, env={"FAL_KEY": DEMO_KEY})
        daemon = DaemonProcess(path, metrics_port, workdir / "daemon.log")
        say(f"simulator on {sim.base_url}; daemon log in {daemon.log_path}")
        await daemon.start()
        say(
            f"daemon ready; submitting {trainings} trainings in two waves (faults: 30% of webhooks "
            "dropped, 10% duplicated, 10% badly signed, 5% API errors; one training fails, one "
            "has no LoRA, one never finishes, one webhook carries a payload_error)"
        )
        try:
            async with (
                actions.fal_client(settings) as fal,
                open_store(settings.database["url"]) as store,
            ):
                reconciler = Reconciler(store, settings)

                async def wave(indexes: range) -> None:
                    for i in indexes:
                        ttype = TYPES[i % len(TYPES)]
                        name = f"user{i:02d}"
                        arguments = actions.training_arguments(
                            settings,
                            ttype,
                            f"https://example.invalid/{name}.zip",
                            f"{name} person",
                            {"sim_outcome": _outcome(i, trainings)},
                        )
                        await submit_until_accepted(
                            settings,
                            fal,
                            reconciler,
                            training_type=ttype,
                            name=name,
                            arguments=arguments,
                            trigger=f"{name} person",
                        )

                half = trainings // 2
                await wave(range(half))
                await trio.sleep(2.5)
                daemon.kill()
                say(
                    f"first wave of {half} in flight; daemon killed with SIGKILL (webhooks now hit a closed port)"
                )
                await trio.sleep(4.0)
                await daemon.start()
                say("daemon restarted; its startup sweep reconciled what it missed before READY")
                await wave(range(half, trainings))
                say(f"second wave of {trainings - half} submitted")
            with trio.move_on_after(45.0):
                while not await _all_finished(settings.database["url"]):
                    await trio.sleep(0.5)
        finally:
            status = await daemon.stop()
            say(f"daemon stopped with SIGTERM (exit status {status})")
        nursery.cancel_scope.cancel()
    async with open_store(settings.database["url"]) as store:
        report = await compare_with_truth(store, list(sim.truth.values()))
    report.restarts = daemon.starts - 1
    return report


async def _all_finished(db_url: str) -> bool:
    async with open_store(db_url) as store:
        counts = await store.status_counts()
    return sum(n for s, n in counts.items() if s not in TERMINAL) == 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trainings", type=int, default=30, help="how many trainings (default 30)")
    parser.add_argument("--seed", type=int, default=7, help="the simulator's random seed")
    parser.add_argument("--keep", metavar="DIR", help="keep the database and logs in DIR")


def main(args: argparse.Namespace) -> int:
    if args.trainings < 8:
        raise ValueError("--trainings must be at least 8 (one of each fault, plus real ones)")
    if args.keep:
        workdir = Path(args.keep)
        workdir.mkdir(parents=True, exist_ok=True)
        report = trio.run(lambda: run_demo(workdir, trainings=args.trainings, seed=args.seed))
    else:
        with tempfile.TemporaryDirectory(prefix="trainguard-demo-") as tmp:
            report = trio.run(lambda: run_demo(Path(tmp), trainings=args.trainings, seed=args.seed))
    print()
    print(report.table())
    print()
    print(report.verdict())
    return 0 if not report.problems else 1
