"""`trainguard demo`: the simulator and the daemon on loopback, under faults, in a minute.

The simulator runs in this process; the daemon runs as a real subprocess (``trainguard run``)
on a temporary SQLite database with compressed timings, so that killing it with SIGKILL
mid-way is a real crash. A few dozen trainings are submitted, with webhooks dropped,
duplicated and badly signed, API errors, one failed training, one result without its LoRA
and one training that never finishes. At the end every training is compared with the
simulator's own record of the truth, every webhook delivery attempt with the daemon's stored
receipts, and a table and a verdict line are printed.

The pieces (``DaemonProcess``, ``demo_config``, ``compare_with_truth``) are reused by the
end-to-end tests.
"""

from __future__ import annotations

import argparse
import hashlib
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

from trainguard import actions, config
from trainguard.fal import FalRequestError
from trainguard.fal import Kind as FalKind
from trainguard.reconcile import Reconciler
from trainguard.signing import HEADER_SIGNATURE
from trainguard.store import (
    TERMINAL,
    Connection,
    Event,
    Store,
    Training,
    TrainingView,
    WebhookReceipt,
    open_store,
)
from trainguard.testing import postgres
from trainguard.testing.simulator import Delivery, Faults, SimConfig, Simulator, Truth

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
    tables: Mapping[str, Mapping[str, Any]] | None = None,
    config_name: str = "config.toml",
) -> str:
    """A config.toml for a daemon against ``sim`` with timings compressed ~30x.

    ``layers`` overrides options of ``[layers.NAME]``, ``tables`` those of the top-level
    tables (``fal``, ``webhook``, ``database``, ``cluster``, ...); ``config_name`` is the
    file's name in ``workdir``, so that several instances can share one directory.
    """
    top: dict[str, dict[str, Any]] = {
        "database": {"url": f"sqlite:///{workdir / 'trainguard.db'}"},
        "fal": {
            "queue_url": sim.base_url,
            "backup_queue_url": "",  # tests talk only to loopback
            "jwks_url": sim.jwks_url,
            "max_requests_per_second": 500.0,
            "timeout_seconds": 3.0,
        },
        "webhook": {
            "listen": f"127.0.0.1:{webhook_port}",
            "public_url": f"http://127.0.0.1:{webhook_port}/fal/webhook",
            "jwks_cache_seconds": 30.0,
        },
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "artifacts": {"dir": str(workdir / "artifacts")},
    }
    for name, values in (tables or {}).items():
        top.setdefault(name, {}).update(values)
    layer_tables: dict[str, dict[str, Any]] = {
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
        layer_tables.setdefault(name, {}).update(values)
    sections = list(top.items())
    sections += [(f"layers.{name}", values) for name, values in layer_tables.items()]
    lines = []
    for name, values in sections:
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = workdir / config_name
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
                [sys.executable, "-m", "trainguard", "run", "--config", self.config_path],
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
EXPECTED_FALLBACK = {
    "fail": "fal_failure",
    "error500": "fal_failure",
    "typed_error": "fal_failure",
    "no_lora": "no_artifact",
    "never": "deadline",
}
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
    if truth.cancel_requested and view.cancel_requested_at is None:
        return "FAL accepted a cancel that is not recorded"
    if truth.outcome in REAL_OUTCOMES:
        if view.is_fallback:
            return f"fallback ({view.fallback_kind}) although FAL had a real result"
        if (view.lora_url or view.finetune_id) != _real_result(truth):
            return "stored result differs from FAL's"
        return None
    if truth.outcome == "cancelled":
        return None if view.status == "CANCELLED" else f"expected CANCELLED, found {view.status}"
    expected = EXPECTED_FALLBACK.get(truth.outcome)
    if not view.is_fallback or view.fallback_kind != expected:
        return f"expected a {expected} fallback, found {view.fallback_kind or view.status}"
    if not view.fallback_layer or not view.fallback_reason:
        return "fallback without its layer and reason"
    return None


@dataclass(frozen=True)
class StoredReceipt:
    """A row of ``webhook_receipts``, reduced to what the audit compares."""

    signature: str
    """The ``X-Fal-Webhook-Signature`` header it arrived with ("" if none)."""
    body_sha256: str
    verification: str
    processed: bool
    outcome: str | None

    @property
    def key(self) -> tuple[str, str]:
        return self.signature, self.body_sha256


@dataclass
class WebhookAudit:
    """Every delivery attempt the simulator made, checked against the daemon's receipts."""

    deliveries: Counter[str]
    """Attempts by signature, answer and the receipt they map to, e.g. "good signature,
    HTTP 200 -> verified: result" (the receipt's verification and what applying it did)."""
    dropped: int
    """Webhooks the simulator never sent (the drop fault)."""
    gave_up: int
    """Webhooks the simulator stopped retrying without a 2xx."""
    problems: list[str]


def _label(delivery: Delivery, receipt: StoredReceipt | None) -> str:
    answer = "no answer" if delivery.status is None else f"HTTP {delivery.status}"
    if receipt is None:
        stored = "not stored"
    else:
        stored = (
            f"{receipt.verification}: {receipt.outcome if receipt.processed else 'not applied'}"
        )
    return f"{delivery.signature} signature, {answer} -> {stored}"


def audit_webhooks(
    deliveries: Sequence[Delivery], receipts: Sequence[StoredReceipt], truths: Sequence[Truth]
) -> WebhookAudit:
    """Each correctly signed delivery answered 2xx must be stored, verified and applied;
    no badly signed one may be answered 2xx, unless it was stored unverified (202, the keys
    unreachable) and rejected once the keys were back."""
    stored: dict[tuple[str, str], list[StoredReceipt]] = {}
    for receipt in receipts:
        stored.setdefault(receipt.key, []).append(receipt)
    problems: list[str] = []
    labels: Counter[str] = Counter()
    for d in deliveries:
        matches = stored.get((d.signature_header, d.body_sha256), [])
        kept = [r for r in matches if r.verification != "rejected"]
        labels[_label(d, (kept or matches or [None])[0])] += 1
        if d.signature == "bad":
            rejected_later = d.status == 202 and bool(matches) and not kept
            if d.acked and not rejected_later:
                problems.append(f"{d.request_id}: a badly signed webhook was answered {d.status}")
            problems += [
                f"{d.request_id}: a badly signed webhook stored as {r.verification}" for r in kept
            ]
        elif d.acked:
            if not kept:
                problems.append(f"{d.request_id}: a webhook answered {d.status} was not kept")
            problems += [
                f"{d.request_id}: an acknowledged webhook is {r.verification}, "
                f"{'applied' if r.processed else 'not applied'}"
                for r in kept
                if r.verification != "verified" or not r.processed
            ]
    return WebhookAudit(
        deliveries=labels,
        dropped=sum(1 for t in truths if t.webhook_dropped),
        gave_up=sum(1 for t in truths if t.webhook_gave_up),
        problems=problems,
    )


@dataclass
class Report:
    rows: list[tuple[TrainingView | None, Truth, str | None]]
    results_by_layer: Counter[str]
    fallbacks_by_layer: Counter[str]
    upgrades_by_layer: Counter[str]
    double_transitions: list[str]
    restarts: int = 0
    fallbacks_on_real: list[str] = field(default_factory=list)
    """Request ids whose history shows a fallback although FAL had a real result and said
    so in the webhook too (outcome "ok"), even if it was upgraded later."""
    unmarked_fallbacks: list[str] = field(default_factory=list)
    """Request ids whose history shows a fallback without its layer or reason."""
    webhooks: WebhookAudit | None = None

    @property
    def problems(self) -> list[str]:
        out = [f"{t.request_id}: {p}" for _, t, p in self.rows if p]
        out += [f"{rid}: a transition applied twice" for rid in self.double_transitions]
        out += [
            f"{rid}: a fallback was applied although FAL had a real result"
            for rid in self.fallbacks_on_real
        ]
        out += [
            f"{rid}: a fallback without its layer and reason" for rid in self.unmarked_fallbacks
        ]
        if self.webhooks is not None:
            out += self.webhooks.problems
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
        lines.append(self._layers_table())
        if self.webhooks is not None:
            lines += ["", self._webhooks_table(self.webhooks)]
        return "\n".join(lines)

    def _layers_table(self) -> str:
        lines = [f"{'layer':<14} {'recovered':>9} {'fallbacks':>9} {'upgrades':>8}"]
        layers = sorted(
            set(self.results_by_layer) | set(self.fallbacks_by_layer) | set(self.upgrades_by_layer)
        )
        for layer in layers:
            lines.append(
                f"{layer:<14} {self.results_by_layer[layer]:>9} {self.fallbacks_by_layer[layer]:>9} "
                f"{self.upgrades_by_layer[layer]:>8}"
            )
        return "\n".join(lines)

    @staticmethod
    def _webhooks_table(audit: WebhookAudit) -> str:
        width = max([30, *map(len, audit.deliveries)])
        lines = [f"{'webhook delivery attempts':<{width}} {'count':>9}"]
        lines += [f"{k:<{width}} {n:>9}" for k, n in sorted(audit.deliveries.items())]
        lines += [
            f"{'never sent (dropped)':<{width}} {audit.dropped:>9}",
            f"{'given up by the sender':<{width}} {audit.gave_up:>9}",
        ]
        return "\n".join(lines)

    def summary(self) -> str:
        """Aggregates for runs too large for one line per training: final states against
        FAL's truth, results and fallbacks per layer, webhooks by outcome, restarts."""
        states: Counter[tuple[str, str]] = Counter()
        for view, truth, _ in self.rows:
            if view is None:
                state = "not in the store"
            elif view.is_fallback:
                state = f"{view.status}, fallback {view.fallback_kind}"
            elif view.status == "COMPLETED":
                state = f"COMPLETED, real result by {view.result_layer}"
            else:
                state = view.status
            states[(truth.outcome, state)] += 1
        lines = [f"{'FAL truth':<10} {'final state':<44} {'trainings':>9}"]
        lines += [f"{o:<10} {s:<44} {n:>9}" for (o, s), n in sorted(states.items())]
        lines += ["", self._layers_table()]
        if self.webhooks is not None:
            lines += ["", self._webhooks_table(self.webhooks)]
        lines += ["", f"daemon restarts: {self.restarts}"]
        return "\n".join(lines)

    def verdict(self) -> str:
        total = len(self.rows)
        finished = sum(1 for v, _, _ in self.rows if v is not None and v.status in TERMINAL)
        wrong_fallbacks = len(
            {
                t.request_id
                for v, t, _ in self.rows
                if t.outcome in REAL_OUTCOMES and v is not None and v.is_fallback
            }
            | set(self.fallbacks_on_real)
        )
        real = sum(1 for _, t, p in self.rows if t.outcome in REAL_OUTCOMES and p is None)
        word = "PASS" if not self.problems else "FAIL"
        return (
            f"verdict: {word}: {finished}/{total} trainings accounted for; "
            f"{real}/{sum(1 for _, t, _ in self.rows if t.outcome in REAL_OUTCOMES)} real results stored as FAL gave them; "
            f"{wrong_fallbacks} fallbacks where a real result existed; "
            f"{len(self.double_transitions)} transitions applied twice; "
            + (
                ""
                if self.webhooks is None
                else f"{len(self.webhooks.problems)} webhook deliveries mishandled; "
            )
            + f"daemon restarts: {self.restarts}"
        )


@dataclass
class _History:
    results: Counter[str] = field(default_factory=Counter)
    fallbacks: Counter[str] = field(default_factory=Counter)
    upgrades: Counter[str] = field(default_factory=Counter)
    doubles: list[str] = field(default_factory=list)
    fallback_events: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)
    """Per request id, every fallback applied: (layer, reason)."""


def _history() -> _History:
    history = _History()
    seen: Counter[tuple[str, str, str | None]] = Counter()
    for event in Event.select().order_by(Event.id):
        if event.kind == "result":
            history.results[event.layer] += 1
        elif event.kind == "fallback":
            history.fallbacks[event.layer] += 1
            reason = json.loads(event.detail).get("reason") if event.detail else None
            history.fallback_events.setdefault(event.request_id, []).append((event.layer, reason))
        elif event.kind == "upgrade":
            history.upgrades[event.layer] += 1
        if event.kind in ("result", "fallback", "status", "cancelled"):
            seen[(event.request_id, event.kind, event.to_status)] += 1
    history.doubles = sorted({rid for (rid, _, _), n in seen.items() if n > 1})
    return history


def _fallbacks_on_real(history: _History, truths: Sequence[Truth]) -> list[str]:
    # Not payload_error: its webhook carries no output, so a fallback applied on it is
    # expected, and judge() requires that it was upgraded by the end.
    real = {t.request_id for t in truths if t.outcome == "ok"}
    return sorted(real & set(history.fallback_events))


def _unmarked_fallbacks(history: _History) -> list[str]:
    return sorted(
        rid
        for rid, applied in history.fallback_events.items()
        if any(not layer or not reason for layer, reason in applied)
    )


def _receipts() -> list[StoredReceipt]:
    out = []
    for r in WebhookReceipt.select().order_by(WebhookReceipt.id):
        headers = {k.lower(): v for k, v in json.loads(r.headers_json).items()}
        out.append(
            StoredReceipt(
                signature=headers.get(HEADER_SIGNATURE.lower(), ""),
                body_sha256=hashlib.sha256(bytes(r.body)).hexdigest(),
                verification=r.verification,
                processed=r.processed_at is not None,
                outcome=r.outcome,
            )
        )
    return out


async def compare_with_truth(
    store: Store, truths: Sequence[Truth], deliveries: Sequence[Delivery] | None = None
) -> Report:
    """Judge every training in the store against the simulator's truth, its event history
    against the fallback rules and, given the simulator's delivery log, every webhook
    against the stored receipts."""

    def read(conn: Connection) -> tuple[dict[str, TrainingView], _History, list[StoredReceipt]]:
        views = {t.request_id: TrainingView.of(t) for t in Training.select()}
        return views, _history(), _receipts() if deliveries is not None else []

    views, history, receipts = await store.read(read)
    rows = [(views.get(t.request_id), t, judge(views.get(t.request_id), t)) for t in truths]
    return Report(
        rows,
        history.results,
        history.fallbacks,
        history.upgrades,
        history.doubles,
        fallbacks_on_real=_fallbacks_on_real(history, truths),
        unmarked_fallbacks=_unmarked_fallbacks(history),
        webhooks=None if deliveries is None else audit_webhooks(deliveries, receipts, truths),
    )


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


#: What the demo tells of its fault mix once the daemon (or the instances) are ready.
FAULTS_TOLD = (
    "faults: 30% of webhooks dropped, 10% duplicated, 10% badly signed, 5% API errors; one "
    "training fails, one has no LoRA, one never finishes, one webhook carries a payload_error"
)


def demo_simulator(seed: int) -> Simulator:
    """The demo's simulator: 1 s in queue, 4 s running, the fault mix of ``FAULTS_TOLD``."""
    return Simulator(
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


async def submit_wave(
    settings: config.Settings, fal: Any, reconciler: Reconciler, indexes: range, trainings: int
) -> None:
    """Submit the demo's trainings ``indexes`` of ``trainings`` (``_outcome``), one by one."""
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


async def run_demo(
    workdir: Path, *, trainings: int = 30, seed: int = 7, out: Any = sys.stdout
) -> Report:
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    sim = demo_simulator(seed)
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve)
        metrics_port = free_port()
        path = demo_config(workdir, sim, webhook_port=free_port(), metrics_port=metrics_port)
        settings = config.load(path, env={"FAL_KEY": DEMO_KEY})
        daemon = DaemonProcess(path, metrics_port, workdir / "daemon.log")
        say(f"simulator on {sim.base_url}; daemon log in {daemon.log_path}")
        await daemon.start()
        say(f"daemon ready; submitting {trainings} trainings in two waves ({FAULTS_TOLD})")
        try:
            async with (
                actions.fal_client(settings) as fal,
                open_store(settings.database["url"]) as store,
            ):
                reconciler = Reconciler(store, settings)

                async def wave(indexes: range) -> None:
                    await submit_wave(settings, fal, reconciler, indexes, trainings)

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
                while not await all_finished(settings.database["url"]):
                    await trio.sleep(0.5)
        finally:
            status = await daemon.stop()
            say(f"daemon stopped with SIGTERM (exit status {status})")
        nursery.cancel_scope.cancel()
    async with open_store(settings.database["url"]) as store:
        report = await compare_with_truth(store, list(sim.truth.values()), sim.deliveries)
    report.restarts = daemon.starts - 1
    return report


async def all_finished(db_url: str) -> bool:
    """Whether every training on ``db_url`` is in a terminal state."""
    async with open_store(db_url) as store:
        counts = await store.status_counts()
    return sum(n for s, n in counts.items() if s not in TERMINAL) == 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trainings", type=int, default=30, help="how many trainings (default 30)")
    parser.add_argument("--seed", type=int, default=7, help="the simulator's random seed")
    parser.add_argument("--keep", metavar="DIR", help="keep the database and logs in DIR")
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        metavar="N",
        help="N instances on a temporary PostgreSQL behind a load balancer, the sweeps leader "
        "killed (default 1: one daemon on SQLite); needs PostgreSQL's server binaries",
    )


#: ``--instances`` without PostgreSQL's server binaries: this line, exit status 2.
NO_POSTGRES = (
    "trainguard demo --instances needs PostgreSQL's server binaries (initdb, pg_ctl), not found "
    "on PATH or in /usr/lib/postgresql/*/bin: on Debian or Ubuntu `apt-get install -y postgresql`"
)


def _run_cluster(workdir: Path, args: argparse.Namespace) -> Report:
    # testing.cluster builds on this module, so it is imported only when asked for.
    from trainguard.testing.cluster import run_cluster_demo

    with postgres.running() as server:
        url = server.database()
        return trio.run(
            lambda: run_cluster_demo(
                workdir, url, instances=args.instances, trainings=args.trainings, seed=args.seed
            )
        )


def main(args: argparse.Namespace) -> int:
    if args.trainings < 8:
        raise ValueError("--trainings must be at least 8 (one of each fault, plus real ones)")
    if args.instances < 1:
        raise ValueError("--instances must be at least 1")
    if args.instances > 1 and postgres.find_binaries() is None:
        print(f"trainguard: {NO_POSTGRES}", file=sys.stderr)
        return 2

    def run(workdir: Path) -> Report:
        if args.instances > 1:
            return _run_cluster(workdir, args)
        return trio.run(lambda: run_demo(workdir, trainings=args.trainings, seed=args.seed))

    if args.keep:
        workdir = Path(args.keep)
        workdir.mkdir(parents=True, exist_ok=True)
        report = run(workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="trainguard-demo-") as tmp:
            report = run(Path(tmp))
    print()
    print(report.table())
    print()
    print(report.verdict())
    return 0 if not report.problems else 1
