"""The only writer of training state: observations in, transitions out.

Layers notice things (a webhook arrived, a status poll answered, a deadline passed) and hand
each one to ``Reconciler.observe`` as an ``Observation``. Reconcile decides what it means and
applies at most one transition in one transaction, with an event row; after the commit it
counts, logs and calls the plugin hooks. The rules make overlapping layers safe:

* idempotent: the same observation twice changes nothing the second time;
* monotonic: a terminal state never regresses, a real result always beats a fallback, and a
  fallback never overwrites a real result;
* honest: a fallback is applied only when FAL has definitively no artifact (a failure, a result
  without its proof field, a payload error, an expired result) or the deadline has passed, and
  it is always marked with its layer, kind and reason. A transient error is never terminal:
  it only moves the next check, with backoff.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
import trio

from trainguard import fal, inbox, logs
from trainguard.clock import Clock
from trainguard.config import Settings
from trainguard.decide import (
    EVENT_KINDS,
    MAX_ID_CHARS,
    MAX_URL_CHARS,
    OUTBOX_EVENTS,
    ChangeKind,
    Decision,
    Policy,
    decide,
    extract_result,
)
from trainguard.errors import AlreadyTracked, UnverifiedFull
from trainguard.observe import (
    Kind,
    MalformedWebhook,
    Observation,
    WebhookBody,
    observation_from_answer,
    parse_webhook,
    read_webhook,
)
from trainguard.store import (
    Connection,
    Event,
    Outbox,
    Store,
    Training,
    TrainingView,
)
from trainguard.views import missing_fields, view_as_dict

__all__ = [
    "EVENT_KINDS",
    "MAX_ID_CHARS",
    "MAX_URL_CHARS",
    "OUTBOX_EVENTS",
    "AlreadyTracked",
    "Change",
    "ChangeKind",
    "Decision",
    "Kind",
    "MalformedWebhook",
    "Observation",
    "Policy",
    "Reconciler",
    "UnverifiedFull",
    "WebhookBody",
    "decide",
    "extract_result",
    "missing_fields",
    "observation_from_answer",
    "parse_webhook",
    "read_webhook",
    "view_as_dict",
]

log = structlog.get_logger("trainguard.reconcile")


@dataclass(frozen=True)
class Change:
    """What one observation did to its training (``kind == "none"``: nothing)."""

    request_id: str
    layer: str
    kind: str
    from_status: str | None = None
    to_status: str | None = None
    training: TrainingView | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)
    time_to_result: float | None = None

    @property
    def changed(self) -> bool:
        return self.kind not in ("none", "unknown", "backoff", "checked")


#: Called on the database thread: (training, event, layer) -> [{"consumer", "payload"}, ...].
OutboxCollector = Callable[[TrainingView, str, str], list[dict[str, Any]]]


def _receipt_outcome(change: Change, now: float) -> tuple[str, float | None]:
    """What a receipt records once its observation was applied: the change's kind, processed
    now; for an unknown training "unknown_training", unprocessed until it is registered."""
    if change.kind == "unknown":
        return "unknown_training", None
    return change.kind, now


class _KeyTaken(Exception):
    """A fresh webhook's dedupe key was taken by another instance after it was looked up
    (never leaves this module: ``receive_webhook`` answers it as a duplicate)."""

    def __init__(self, receipt_id: int) -> None:
        super().__init__(receipt_id)
        self.receipt_id = receipt_id


# -- the reconciler ------------------------------------------------------------------------
HookCaller = Callable[..., Awaitable[None]]


class Reconciler:
    """Applies observations through the store's writer; the only writer of trainings."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        clock: Clock | None = None,
        metrics: Any = None,
        hooks: HookCaller | None = None,
        outbox: OutboxCollector | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock or Clock()
        self.metrics = metrics
        self.hooks = hooks
        self.outbox = outbox
        self._lock_sql_cache: str | None = None
        self._policy_cache: tuple[Settings, Policy] | None = None
        self.rng = rng or random.Random()
        #: Set whenever a training is registered or rescheduled, so layers can wake early.
        self.changed = trio.Event()

    # ---- public API (trio side) ----------------------------------------------------------
    async def observe(self, obs: Observation) -> Change:
        now = self.clock.now()
        change = await self.store.write(self._apply, obs, now)
        await self.announce([change])
        if change.kind == "recheck":
            self._poke()
        return change

    async def observe_answer(self, answer: fal.Answer, request_id: str, layer: str) -> Change:
        return await self.observe(observation_from_answer(answer, request_id, layer))

    async def register(
        self,
        *,
        name: str,
        training_type: str,
        request_id: str,
        layer: str,
        endpoint: str | None = None,
        status_url: str | None = None,
        response_url: str | None = None,
        cancel_url: str | None = None,
        trigger_phrase: str | None = None,
        arguments: Mapping[str, Any] | None = None,
        submitted_at: float | None = None,
    ) -> TrainingView:
        """Record a new training (submitted here or adopted) and apply any webhook that
        arrived before it; raises AlreadyTracked for a known request_id."""
        ttype = self.settings.training_type(training_type)
        now = self.clock.now()
        row = {
            "name": name,
            "training_type": ttype.name,
            "endpoint": endpoint or ttype.endpoint,
            "request_id": request_id,
            "status_url": status_url,
            "response_url": response_url,
            "cancel_url": cancel_url,
            "trigger_phrase": trigger_phrase or None,
            "input_json": json.dumps(arguments, ensure_ascii=False) if arguments else None,
            "submitted_at": submitted_at if submitted_at is not None else now,
        }
        view, changes = await self.store.write(self._register, row, layer, now)
        await self.announce(changes)
        self._poke()
        return view

    async def record_receipt(
        self,
        *,
        body: bytes,
        headers: Mapping[str, str],
        verification: str,
        request_id: str | None,
        dedupe_key: str | None,
        reject_reason: str | None = None,
        body_sha256: str | None = None,
    ) -> tuple[int, bool]:
        """Store a webhook as it arrived, durably (``body_sha256``: its digest, when the
        caller has it already). Returns (receipt id, was a duplicate). Refused requests
        pushed out of their bounds by this one are counted."""
        receipt_id, duplicate, dropped = await self.store.write(
            inbox.record,
            body,
            dict(headers),
            verification,
            request_id,
            dedupe_key,
            reject_reason,
            self.clock.now(),
            self.settings.webhook,
            body_sha256,
        )
        if self.metrics is not None:
            self.metrics.receipts_dropped("rejected", dropped)
        return receipt_id, duplicate

    async def receive_webhook(
        self,
        *,
        body: bytes,
        body_sha256: str,
        headers: Mapping[str, str],
        verification: str,
        observation: Observation,
        dedupe_key: str,
    ) -> tuple[int, bool, Change | None]:
        """Store a webhook and, when it is verified (or needs no verification), apply
        ``observation`` (what the listener parsed from ``body``) in the same commit: one
        durable write on the webhook path. Returns (receipt id, was a duplicate, the change;
        None when nothing was applied now). If applying fails, the stored receipt stays and
        is applied later. The change is not announced here: the listener answers FAL first,
        then calls ``announce``."""
        try:
            return await self.store.write(
                self._receive_webhook,
                body,
                body_sha256,
                dict(headers),
                verification,
                observation,
                dedupe_key,
                self.clock.now(),
            )
        except _KeyTaken as taken:  # its write rolled back: nothing of it is stored
            return taken.receipt_id, True, None

    def _receive_webhook(
        self,
        conn: Connection,
        body: bytes,
        body_sha256: str,
        headers: dict[str, str],
        verification: str,
        obs: Observation,
        dedupe_key: str,
        now: float,
    ) -> tuple[int, bool, Change | None]:
        existing = inbox.duplicate(conn, dedupe_key)
        if existing is not None:
            return existing, True, None
        if verification == "unverified":
            inbox.check_unverified_room(conn, self.settings.webhook, len(body))
        change: Change | None = None
        outcome: str | None = None
        processed_at: float | None = None
        if verification in inbox.APPLICABLE:
            try:  # applied before its receipt is written, so the INSERT carries the outcome
                with conn.atomic():  # a savepoint: a failed apply keeps the receipt
                    change = self._apply(conn, obs, now)
            # boundary: any failure of one apply leaves the stored receipt for a retry
            except Exception as exc:
                log.error("webhook stored but not applied; it will be retried", error=repr(exc))
            else:
                outcome, processed_at = _receipt_outcome(change, now)
        receipt_id = inbox.insert(
            conn,
            body,
            body_sha256,
            headers,
            verification,
            obs.request_id,
            dedupe_key,
            now,
            processed_at=processed_at,
            outcome=outcome,
        )
        if receipt_id is None:
            # Another instance kept the same webhook after we looked (on PostgreSQL the INSERT
            # waited for its commit): a duplicate. Raised so that this write's savepoint
            # undoes what the apply did; ``receive_webhook`` answers it as a duplicate.
            raise _KeyTaken(inbox.taken(conn, dedupe_key))
        if change is not None and change.kind == "unknown":
            change = self._evicted(conn, change)
        return receipt_id, False, change

    async def apply_receipt(
        self,
        receipt_id: int,
        *,
        verification: str | None = None,
        reject_reason: str | None = None,
    ) -> Change:
        """Apply a stored receipt (optionally first settling its verification outcome, with
        the reason when it is "rejected")."""
        now = self.clock.now()
        change = await self.store.write(
            self._apply_receipt, receipt_id, verification, now, reject_reason
        )
        await self.announce([change])
        return change

    async def prune_receipts(self) -> dict[str, int]:
        """Drop receipts past their bounds (``inbox.prune``), then give the space back
        (SQLite). Returns what was dropped, by kind."""
        dropped = await self.store.write(inbox.prune, self.settings.webhook, self.clock.now())
        await self.store.reclaim_space()
        return dropped

    # ---- what runs on the database thread -----------------------------------------------
    def _lock(self, request_id: str) -> Training | None:
        # Plain SQL: building this select with peewee costs more than running it (measured
        # ~0.3 ms of the database thread per observation).
        return next(iter(Training.raw(self._lock_sql, request_id)), None)

    @property
    def _lock_sql(self) -> str:
        if self._lock_sql_cache is None:
            sql, _ = Training.select().where(Training.request_id == "").sql()
            self._lock_sql_cache = sql + self.store.dialect.lock_suffix
        return self._lock_sql_cache

    def _policy(self) -> Policy:
        """The rules' view of the settings, rebuilt when the settings are (SIGHUP)."""
        if self._policy_cache is None or self._policy_cache[0] is not self.settings:
            self._policy_cache = (self.settings, Policy.of(self.settings, self.rng))
        return self._policy_cache[1]

    def _apply(self, conn: Connection, obs: Observation, now: float) -> Change:
        row = self._lock(obs.request_id)
        if row is None:
            return Change(obs.request_id, obs.layer, "unknown")
        view = TrainingView.of(row)
        decision = decide(view, obs, now, self._policy())
        updates = {**decision.updates, "last_checked_at": now, "updated_at": now}
        for column, value in updates.items():
            setattr(row, column, value)
        row.save()
        after = replace(view, **updates)
        if decision.event is not None:
            e = decision.event
            self._event(row, obs.layer, e.kind, e.from_status, e.to_status, e.detail, now)
        if decision.outbox_event is not None and self.outbox is not None:
            self._queue_outbox(after, decision.outbox_event, obs.layer, now)
        return Change(
            obs.request_id,
            obs.layer,
            decision.kind,
            view.status,
            after.status,
            after,
            decision.detail,
            decision.time_to_result,
        )

    def _queue_outbox(self, view: TrainingView, event: str, layer: str, now: float) -> None:
        """Outbox entries of the plugins, in the same transaction as the transition."""
        assert self.outbox is not None
        for entry in self.outbox(view, event, layer):
            Outbox.create(
                consumer=entry["consumer"],
                message_id=f"msg_{uuid.uuid4().hex}",
                request_id=view.request_id,
                event=event,
                payload_json=json.dumps(entry["payload"], ensure_ascii=False, sort_keys=True),
                created_at=now,
                next_attempt_at=now,
            )

    def _event(
        self,
        row: Training,
        layer: str,
        kind: str,
        before: str | None,
        after: str | None,
        detail: Mapping[str, Any],
        now: float,
    ) -> None:
        Event.create(
            training=row,
            request_id=row.request_id,
            at=now,
            layer=layer,
            kind=kind,
            from_status=before,
            to_status=after,
            detail=json.dumps(detail, ensure_ascii=False) if detail else None,
        )

    def _register(
        self, conn: Connection, values: dict[str, Any], layer: str, now: float
    ) -> tuple[TrainingView, list[Change]]:
        if Training.select().where(Training.request_id == values["request_id"]).exists():
            raise AlreadyTracked(f"training {values['request_id']} is already tracked")
        submitted = values["submitted_at"]
        poller = self.settings.layer("poller").options
        delayed = self.settings.layer("delayed").options
        emergency = self.settings.layer("emergency").options
        row = Training.create(
            **values,
            status="SUBMITTED",
            next_check_at=submitted + float(poller.get("first_check_after_seconds", 90.0)),
            delayed_check_at=submitted + float(delayed.get("after_seconds", 600.0)),
            deadline_at=submitted + float(emergency.get("deadline_seconds", 21600.0)),
            updated_at=now,
        )
        self._event(row, layer, "registered", None, "SUBMITTED", {"name": row.name}, now)
        changes = [  # webhooks that came before the training was known
            self._apply_receipt(conn, receipt_id, None, now)
            for receipt_id in inbox.pending_for(conn, row.request_id)
        ]
        row = Training.get_by_id(row.id)
        return TrainingView.of(row), changes

    def _apply_receipt(
        self,
        conn: Connection,
        receipt_id: int,
        verification: str | None,
        now: float,
        reject_reason: str | None = None,
    ) -> Change:
        """A stored receipt: its one parse, then applied like a fresh webhook."""
        receipt = inbox.get(conn, receipt_id)
        if receipt is None or receipt.processed_at is not None:
            return Change(receipt.request_id if receipt else "", "webhook", "none")
        unchanged = Change(receipt.request_id or "", "webhook", "none")
        if verification is not None:
            receipt.verification = verification
        if receipt.verification == "rejected":
            inbox.settle_rejected(conn, receipt, reject_reason, now, self.settings.webhook)
            return unchanged
        if receipt.verification not in inbox.APPLICABLE:
            inbox.settle(conn, receipt, receipt.outcome, None)  # still waiting for the keys
            return unchanged
        try:
            obs = parse_webhook(bytes(receipt.body))
        except MalformedWebhook as exc:
            inbox.settle(conn, receipt, f"malformed: {exc}", now)
            return unchanged
        change = self._apply(conn, obs, now)
        inbox.settle(conn, receipt, *_receipt_outcome(change, now))
        return self._evicted(conn, change) if change.kind == "unknown" else change

    def _evicted(self, conn: Connection, change: Change) -> Change:
        """A receipt of an unknown training was kept: the count bound applies at once."""
        evicted = inbox.evict_unknown_beyond_count(conn, self.settings.webhook)
        return replace(change, detail={**change.detail, "evicted": evicted})

    # ---- after the commit (trio side) ----------------------------------------------------
    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def announce(self, changes: Sequence[Change]) -> None:
        """After the commit: count, log and call the plugin hooks for each change."""
        for change in changes:
            await self._announce(change)

    async def _announce(self, change: Change) -> None:
        view = change.training
        if view is None or change.kind in ("none", "unknown", "checked", "progress"):
            return
        tag = logs.tag_for(change.layer)
        m = self.metrics
        with logs.bound(request_id=view.request_id, name=view.name, layer=change.layer):
            if change.kind == "backoff":
                log.info(f"{tag} FAL not reachable for this training; will retry", **change.detail)
                return
            if change.from_status != change.to_status and m is not None:
                m.transition(change.to_status)
            if change.kind in ("result", "upgrade"):
                if m is not None:
                    m.result_recovered(change.layer)
                    if change.time_to_result is not None:
                        m.time_to_result(change.time_to_result)
                if change.kind == "upgrade":
                    if m is not None:
                        m.fallback_upgraded(change.layer)
                    log.info(f"{tag} fallback replaced by the real result", **change.detail)
                    await self._hook(
                        "trainguard_fallback_upgraded", training=view, layer=change.layer
                    )
                else:
                    log.info(f"{tag} result stored", status=view.status, **change.detail)
                await self._hook("trainguard_training_finished", training=view, layer=change.layer)
            elif change.kind == "fallback":
                if m is not None:
                    m.fallback_applied(change.layer)
                log.warning(
                    f"{logs.WARN} fallback applied",
                    kind=view.fallback_kind,
                    reason=view.fallback_reason,
                    status=view.status,
                    lora_url=view.lora_url,
                )
                await self._hook(
                    "trainguard_fallback_applied",
                    training=view,
                    layer=change.layer,
                    reason=view.fallback_reason,
                )
                await self._hook("trainguard_training_finished", training=view, layer=change.layer)
            elif change.kind == "artifact_missing":
                log.warning(f"{logs.WARN} stored LoRA URL does not answer", **change.detail)
            elif change.kind == "cancelled":
                log.info(f"{tag} training cancelled")
                await self._hook("trainguard_training_finished", training=view, layer=change.layer)
            else:
                log.info(f"{tag} {change.kind}", status=view.status, progress=view.progress)

    async def _hook(self, name: str, **kwargs: Any) -> None:
        if self.hooks is not None:
            await self.hooks(name, **kwargs)
