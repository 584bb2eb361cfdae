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

import hashlib
import json
import math
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import peewee
import structlog
import trio

from trainguard import fal, logs, signing
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
    WebhookReceipt,
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

#: Of a refused request only this much body is kept (with the whole body's size and sha256).
REFUSED_BODY_KEPT = 4096
#: A request id longer than this is cut when a receipt is kept (FAL's are UUIDs).
MAX_KEPT_ID_CHARS = 256
_FAL_HEADERS = frozenset(
    h.lower()
    for h in (
        signing.HEADER_REQUEST_ID,
        signing.HEADER_USER_ID,
        signing.HEADER_TIMESTAMP,
        signing.HEADER_SIGNATURE,
    )
)


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
        await self._after([change])
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
        await self._after(changes)
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
    ) -> tuple[int, bool]:
        """Store a webhook as it arrived, durably. Returns (receipt id, was a duplicate).
        Refused requests pushed out of their bounds by this one are counted."""
        now = self.clock.now()
        keep = int(self.settings.webhook["rejected_kept"])

        def record(conn: Connection) -> tuple[int, bool, int]:
            receipt_id, duplicate = self._record_receipt(
                body, dict(headers), verification, request_id, dedupe_key, reject_reason, now
            )
            refused = verification == "rejected" and not duplicate
            return receipt_id, duplicate, self._prune_rejected(keep) if refused else 0

        receipt_id, duplicate, dropped = await self.store.write(record)
        if self.metrics is not None:
            self.metrics.receipts_dropped("rejected", dropped)
        return receipt_id, duplicate

    async def receive_webhook(
        self,
        *,
        body: bytes,
        headers: Mapping[str, str],
        verification: str,
        request_id: str | None,
        dedupe_key: str,
    ) -> tuple[int, bool, Change | None]:
        """Store a webhook and, when it is verified (or needs no verification), apply it in
        the same commit: one durable write on the webhook path instead of two. Returns
        (receipt id, was a duplicate, the change; None when nothing was applied now). If
        applying fails, the stored receipt stays and is applied later."""
        now = self.clock.now()
        receipt_id, duplicate, change = await self.store.write(
            self._receive_webhook,
            body,
            dict(headers),
            verification,
            request_id,
            dedupe_key,
            now,
        )
        if change is not None:
            await self._after([change])
        return receipt_id, duplicate, change

    def _receive_webhook(
        self,
        conn: Connection,
        body: bytes,
        headers: dict[str, str],
        verification: str,
        request_id: str | None,
        dedupe_key: str,
        now: float,
    ) -> tuple[int, bool, Change | None]:
        if verification == "unverified":
            self._check_unverified_room(dedupe_key, len(body))
        receipt_id, duplicate = self._record_receipt(
            body, headers, verification, request_id, dedupe_key, None, now
        )
        if duplicate or verification not in ("verified", "skipped"):
            return receipt_id, duplicate, None
        try:
            with conn.atomic():  # a savepoint: a failed apply keeps the receipt
                return receipt_id, False, self._apply_receipt(conn, receipt_id, None, now)
        # boundary: any failure of one apply leaves the stored receipt for a retry
        except Exception as exc:
            log.error("webhook stored but not applied; it will be retried", error=repr(exc))
            return receipt_id, False, None

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
        await self._after([change])
        return change

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
        changes = []
        pending = (
            WebhookReceipt.select(WebhookReceipt.id)
            .where(
                WebhookReceipt.request_id == row.request_id,
                WebhookReceipt.processed_at.is_null(),
                WebhookReceipt.verification.in_(("verified", "skipped")),
            )
            .order_by(WebhookReceipt.id)
        )
        for receipt in pending:  # webhooks that came before the training was known
            changes.append(self._apply_receipt(conn, receipt.id, None, now))
        row = Training.get_by_id(row.id)
        return TrainingView.of(row), changes

    def _record_receipt(
        self,
        body: bytes,
        headers: dict[str, str],
        verification: str,
        request_id: str | None,
        dedupe_key: str | None,
        reject_reason: str | None,
        now: float,
    ) -> tuple[int, bool]:
        if dedupe_key is not None:
            existing = WebhookReceipt.get_or_none(WebhookReceipt.dedupe_key == dedupe_key)
            if existing is not None:
                return existing.id, True
        refused = verification == "rejected"
        if refused:  # FAL's four headers only: any number of made-up others is no evidence
            headers = {k: v for k, v in headers.items() if k in _FAL_HEADERS}
        receipt = WebhookReceipt.create(
            request_id=request_id[:MAX_KEPT_ID_CHARS] if request_id else request_id,
            dedupe_key=dedupe_key,
            body=body[:REFUSED_BODY_KEPT] if refused else body,  # forensics need no more
            body_size=len(body),
            body_sha256=hashlib.sha256(body).hexdigest(),
            headers_json=json.dumps(headers, ensure_ascii=False),
            verification=verification,
            reject_reason=reject_reason,
            received_at=now,
            processed_at=now if refused else None,
            outcome="rejected" if refused else None,
        )
        return receipt.id, False

    def _check_unverified_room(self, dedupe_key: str, size: int) -> None:
        """Raise UnverifiedFull when keeping one more unverified body of ``size`` bytes would
        pass ``[webhook] unverified_kept`` or ``unverified_kept_bytes``: what came first is
        kept, what comes beyond is refused for now (503, FAL retries), so a forged flood while
        the key server is down cannot fill the disk. A copy already kept is a duplicate."""
        if WebhookReceipt.select().where(WebhookReceipt.dedupe_key == dedupe_key).exists():
            return
        webhook = self.settings.webhook
        waiting = WebhookReceipt.select(
            peewee.fn.COUNT(WebhookReceipt.id),
            peewee.fn.COALESCE(peewee.fn.SUM(WebhookReceipt.body_size), 0),
        ).where(WebhookReceipt.verification == "unverified")
        count, total = waiting.tuples().get()
        if count + 1 > int(webhook["unverified_kept"]):
            raise UnverifiedFull(f"{count} webhooks wait for FAL's keys already")
        if total + size > int(webhook["unverified_kept_bytes"]):
            raise UnverifiedFull(f"{total} bytes of webhooks wait for FAL's keys already")

    def _prune_rejected(self, keep: int) -> int:
        """Refused webhooks are kept for forensics: the newest ``keep`` of them, and of those
        only as many as fit in ``rejected_kept_bytes`` (each is at most REFUSED_BODY_KEPT
        bytes of body). Both walk the ``verification`` index. Returns how many were dropped."""
        rejected = WebhookReceipt.verification == "rejected"
        stale = (
            WebhookReceipt.select(WebhookReceipt.id)
            .where(rejected)
            .order_by(WebhookReceipt.id.desc())
            .offset(keep)
        )
        dropped = WebhookReceipt.delete().where(WebhookReceipt.id.in_(stale)).execute()
        cap = int(self.settings.webhook["rejected_kept_bytes"])
        size = peewee.fn.COALESCE(WebhookReceipt.body_size, 0)
        kept = peewee.Case(None, [(size > REFUSED_BODY_KEPT, REFUSED_BODY_KEPT)], size)
        total = peewee.fn.SUM(kept).over(order_by=[WebhookReceipt.id.desc()])
        ranked = WebhookReceipt.select(WebhookReceipt.id, total.alias("total")).where(rejected)
        ranked = ranked.alias("r")
        over = peewee.Select([ranked], [peewee.SQL("r.id")]).where(peewee.SQL("r.total") > cap)
        return dropped + WebhookReceipt.delete().where(WebhookReceipt.id.in_(over)).execute()

    def _evict_unknown(self, cutoff: float, keep: int) -> int:
        """Receipts for a training nobody registered: dropped once older than ``cutoff`` (the
        time a webhook can beat its submit's commit) and beyond the newest ``keep``. Walks the
        ``outcome`` index. Returns how many were dropped."""
        unknown = (WebhookReceipt.outcome == "unknown_training") & (
            WebhookReceipt.processed_at.is_null()
        )
        beyond = (
            WebhookReceipt.select(WebhookReceipt.id)
            .where(unknown)
            .order_by(WebhookReceipt.id.desc())
            .offset(keep)
        )
        expired = WebhookReceipt.delete().where(unknown, WebhookReceipt.received_at < cutoff)
        return expired.execute() + (
            WebhookReceipt.delete().where(WebhookReceipt.id.in_(beyond)).execute()
        )

    async def prune_receipts(self) -> dict[str, int]:
        """Drop unknown-training receipts past ``[webhook] unknown_receipt_seconds`` or
        beyond ``unknown_receipts_kept``, and refused ones beyond their bounds; then give the
        space back (SQLite). Returns what was dropped, by kind."""
        webhook = self.settings.webhook
        cutoff = self.clock.now() - float(webhook["unknown_receipt_seconds"])

        def prune(conn: Connection) -> dict[str, int]:
            return {
                "unknown_training": self._evict_unknown(
                    cutoff, int(webhook["unknown_receipts_kept"])
                ),
                "rejected": self._prune_rejected(int(webhook["rejected_kept"])),
            }

        dropped = await self.store.write(prune)
        await self.store.reclaim_space()
        return dropped

    def _apply_receipt(
        self,
        conn: Connection,
        receipt_id: int,
        verification: str | None,
        now: float,
        reject_reason: str | None = None,
    ) -> Change:
        receipt = WebhookReceipt.get_or_none(WebhookReceipt.id == receipt_id)
        if receipt is None or receipt.processed_at is not None:
            return Change(receipt.request_id if receipt else "", "webhook", "none")
        if verification is not None:
            receipt.verification = verification
        if receipt.verification == "rejected":
            receipt.processed_at = now
            receipt.outcome = "rejected"
            receipt.reject_reason = reject_reason or receipt.reject_reason
            receipt.dedupe_key = None  # kept for forensics like any refused webhook
            receipt.save()
            self._prune_rejected(int(self.settings.webhook["rejected_kept"]))
            return Change(receipt.request_id or "", "webhook", "none")
        if receipt.verification not in ("verified", "skipped"):
            receipt.save()  # still waiting for the keys
            return Change(receipt.request_id or "", "webhook", "none")
        try:
            obs = parse_webhook(bytes(receipt.body))
        except MalformedWebhook as exc:
            receipt.processed_at = now
            receipt.outcome = f"malformed: {exc}"
            receipt.save()
            return Change(receipt.request_id or "", "webhook", "none")
        change = self._apply(conn, obs, now)
        if change.kind == "unknown":
            receipt.outcome = "unknown_training"  # stays unprocessed until the training appears
            receipt.save()
            keep = int(self.settings.webhook["unknown_receipts_kept"])
            evicted = self._evict_unknown(-math.inf, keep)  # the count bound, at once
            return replace(change, detail={**change.detail, "evicted": evicted})
        receipt.processed_at = now
        receipt.outcome = change.kind
        receipt.save()
        return change

    # ---- after the commit (trio side) ----------------------------------------------------
    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def _after(self, changes: Sequence[Change]) -> None:
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
