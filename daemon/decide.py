"""The rules of reconcile as one pure function: ``decide(view, observation, now, policy)``.

``decide`` reads a snapshot of a training (a ``TrainingView``) and one observation and
returns a ``Decision``: the change kind, the column updates, the event row and the outbox
event to write with them. It touches no database and mutates nothing; the writer
(``daemon/reconcile.py``) locks the row, calls it and applies the decision in one
transaction. The only input besides its arguments is ``policy.rng``, the jitter of the next
check times (seed it and ``decide`` is deterministic).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from trainguard.config import Settings
from trainguard.observe import Kind, Observation
from trainguard.store import TERMINAL, TrainingView

#: The longest URL and finetune id taken from FAL's output (theirs are ~100 and 36 chars).
MAX_URL_CHARS = 4096
MAX_ID_CHARS = 256


class ChangeKind(StrEnum):
    """What one observation did to its training."""

    NONE = "none"
    UNKNOWN = "unknown"  # no such training (decided by the writer: there is no row)
    REGISTERED = "registered"
    STATUS = "status"
    PROGRESS = "progress"
    CHECKED = "checked"
    BACKOFF = "backoff"
    RESULT = "result"
    FALLBACK = "fallback"
    UPGRADE = "upgrade"
    FILLED = "filled"
    CANCELLED = "cancelled"
    CANCEL_REQUESTED = "cancel_requested"
    FAL_COMPLETED = "fal_completed"
    ARTIFACT_MISSING = "artifact_missing"
    RECHECK = "recheck"


#: Changes that leave a row in the event history.
EVENT_KINDS = frozenset(
    {
        ChangeKind.REGISTERED,
        ChangeKind.STATUS,
        ChangeKind.RESULT,
        ChangeKind.FALLBACK,
        ChangeKind.UPGRADE,
        ChangeKind.FILLED,
        ChangeKind.CANCELLED,
        ChangeKind.CANCEL_REQUESTED,
        ChangeKind.FAL_COMPLETED,
        ChangeKind.ARTIFACT_MISSING,
        ChangeKind.RECHECK,
    }
)

#: Changes that finish a training (or replace how it finished), with the outbox event name.
OUTBOX_EVENTS = {
    ChangeKind.RESULT: "training.completed",
    ChangeKind.FALLBACK: "training.fallback",
    ChangeKind.UPGRADE: "training.upgraded",
    ChangeKind.CANCELLED: "training.cancelled",
}


@dataclass(frozen=True)
class Policy:
    """What the rules need of the settings (and the jitter's random source)."""

    result_fields: Mapping[str, str]  # training type -> the output field that proves a result
    fallback_trigger_phrase: str
    fallback_mode: str  # "complete" or "fail"
    fallback_url: Callable[..., str]  # (layer, *, name, request_id) -> URL
    poll_interval: float
    poll_jitter: float
    max_backoff: float
    verify_after: float  # a finished training is checked again by the delayed layer after this
    result_error_attempts: int
    #: The layer whose checks run on ``delayed_check_at`` (one-off, retried with backoff).
    delayed_layer: str = "delayed"
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def of(cls, settings: Settings, rng: random.Random | None = None) -> Policy:
        poller = settings.layer("poller").options
        delayed = settings.layer("delayed").options
        return cls(
            result_fields={n: t.result_field for n, t in settings.training_types.items()},
            fallback_trigger_phrase=settings.fallback["trigger_phrase"],
            fallback_mode=settings.fallback["mode"],
            fallback_url=settings.fallback_url,
            poll_interval=float(poller.get("interval_seconds", 60.0)),
            poll_jitter=float(poller.get("jitter", 0.1)),
            max_backoff=float(poller.get("max_backoff_seconds", 900.0)),
            verify_after=float(delayed.get("verify_after_seconds", 60.0)),
            result_error_attempts=int(settings.fal["result_error_attempts"]),
            rng=rng or random.Random(),
        )

    def poll_after(self, now: float) -> float:
        jitter = self.poll_jitter
        return now + self.poll_interval * (1 + self.rng.uniform(-jitter, jitter))

    def backoff(self, attempts: int, now: float) -> float:
        delay = min(self.max_backoff, self.poll_interval * 2 ** max(0, attempts - 1))
        return now + delay * self.rng.uniform(0.8, 1.0)


@dataclass(frozen=True)
class EventRow:
    """One row of the event history, written with the decision."""

    kind: str
    from_status: str | None
    to_status: str | None
    detail: Mapping[str, Any]


@dataclass(frozen=True)
class Decision:
    """What an observation does: ``updates`` are the training's new column values (the
    writer adds ``last_checked_at`` and ``updated_at``), including its next check times."""

    kind: ChangeKind
    updates: Mapping[str, Any] = field(default_factory=dict)
    detail: Mapping[str, Any] = field(default_factory=dict)
    time_to_result: float | None = None
    event: EventRow | None = None
    outbox_event: str | None = None  # the outbox rows' event name, when there are any


def extract_result(output: Mapping[str, Any], result_field: str) -> dict[str, Any] | None:
    """The stored fields of a real result, or None when the proof field is missing.

    A File proof (``{"url": ...}``) is a LoRA; a plain string proof is a finetune id. Each is
    taken only when it can be stored as it is (see ``_storable``): an unstorable value is no
    proof, never a crash of the writer.
    """
    proof = output.get(result_field)
    fields: dict[str, Any] = {"lora_url": None, "finetune_id": None, "config_url": None}
    if isinstance(proof, dict) and _storable(proof.get("url"), MAX_URL_CHARS):
        fields["lora_url"] = proof["url"]
    elif _storable(proof, MAX_ID_CHARS):
        fields["finetune_id"] = proof
    else:
        return None
    config = output.get("config_file")
    if isinstance(config, dict) and _storable(config.get("url"), MAX_URL_CHARS):
        fields["config_url"] = config["url"]
    return fields


def _storable(value: Any, limit: int) -> bool:
    """A non-empty string of at most ``limit`` characters that the database can hold and a
    reader can show: valid UTF-8 (no lone surrogate from a JSON escape), no control
    character."""
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return value.isprintable()


class _Draft:
    """The training as the rules change it: the view plus the updates so far."""

    def __init__(self, view: TrainingView) -> None:
        self.view = view
        self.updates: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        updates = self.__dict__["updates"]
        return updates[name] if name in updates else getattr(self.__dict__["view"], name)

    def set(self, **values: Any) -> None:
        self.updates.update(values)


_Rule = tuple[ChangeKind, dict[str, Any], float | None]
_NOTHING: _Rule = (ChangeKind.NONE, {}, None)


def decide(view: TrainingView, obs: Observation, now: float, policy: Policy) -> Decision:
    """What ``obs`` does to the training ``view`` at ``now``; pure (see the module doc)."""
    row = _Draft(view)
    kind, detail, ttr = _rules(row, obs, now, policy)
    event: EventRow | None = None
    if kind in EVENT_KINDS:
        event = EventRow(kind, view.status, row.status, detail)
    elif kind == ChangeKind.BACKOFF and row.attempts & (row.attempts - 1) == 0:
        # Errors of a long outage: recorded at attempts 1, 2, 4, 8, ... not every time.
        event = EventRow("error", view.status, row.status, detail)
    outbox = OUTBOX_EVENTS.get(kind)
    if kind == ChangeKind.FALLBACK and row.status == "FAILED":
        outbox = "training.failed"
    return Decision(kind, row.updates, detail, ttr, event, outbox)


def _rules(row: _Draft, obs: Observation, now: float, policy: Policy) -> _Rule:
    k = obs.kind
    terminal = row.status in TERMINAL
    if obs.layer == policy.delayed_layer:  # its one-off check is done (or retried)
        retry = k in (Kind.TRANSIENT, Kind.RESULT_ERROR_5XX)
        row.set(delayed_check_at=policy.backoff(row.attempts + 1, now) if retry else None)

    if k == Kind.SUCCEEDED:
        return _succeeded(row, obs, now, policy, terminal)

    if k == Kind.RECHECK:  # due now: the poller (unfinished) or the delayed layer (finished)
        if row.status == "CANCELLED":
            return _NOTHING
        if terminal:
            row.set(delayed_check_at=now)
        else:
            row.set(next_check_at=now)
        return ChangeKind.RECHECK, {}, None

    if k == Kind.PROBED:
        if row.status != "COMPLETED" or row.is_fallback or obs.available is None:
            return _NOTHING
        was = row.lora_available
        row.set(lora_checked_at=now, lora_available=obs.available)
        if was is not False and not obs.available:
            return (
                ChangeKind.ARTIFACT_MISSING,
                {"lora_url": row.lora_url, "error": obs.detail},
                None,
            )
        return ChangeKind.CHECKED, {}, None

    if terminal:  # a terminal state never regresses; late or duplicate news changes nothing
        return _NOTHING

    completed = row.fal_completed_at is not None
    cancelling = row.cancel_requested_at is not None
    if k == Kind.CANCEL_REQUESTED:  # a request, not an outcome: keep watching, soon
        if cancelling:
            return _NOTHING
        row.set(cancel_requested_at=now, next_check_at=now)
        return ChangeKind.CANCEL_REQUESTED, {}, None
    if k in (Kind.ERROR_RESULT, Kind.RESULT_NOT_FOUND) and not completed:
        # Not certainly final before FAL said COMPLETED ("not ready" has no documented
        # wording): ask the status now, decide on its answer.
        row.set(next_check_at=now)
        return ChangeKind.CHECKED, {}, None
    if k == Kind.RESULT_ERROR_5XX and completed:
        row.set(result_errors=row.result_errors + 1)
        if row.result_errors >= policy.result_error_attempts:
            detail = f"{obs.detail or 'HTTP 5xx'} (result failed {row.result_errors} times)"
            return _failure(row, obs, "result_error", detail, now, policy)
    if k in (Kind.TRANSIENT, Kind.RESULT_ERROR_5XX) or (
        k == Kind.NOT_FOUND and not completed and not cancelling
    ):
        attempts = row.attempts + 1
        error = (obs.detail or k.value)[:2000]
        row.set(attempts=attempts, last_error=error, next_check_at=policy.backoff(attempts, now))
        return ChangeKind.BACKOFF, {"error": error, "attempts": attempts}, None
    if k in (Kind.NOT_FOUND, Kind.RESULT_NOT_FOUND):
        if not completed:  # FAL no longer knows a request we cancelled: it was removed
            return _cancelled(row, now, obs.detail or "FAL no longer knows the request")
        return _fallback(row, obs, "expired", "FAL no longer has the result (expired)", now, policy)
    if k in (Kind.FAILED, Kind.ERROR_RESULT):
        return _failure(row, obs, "fal_failure", obs.detail, now, policy)
    if k == Kind.PAYLOAD_ERROR:
        reason = f"FAL could not deliver the output: {obs.detail or 'payload_error'}"[:2000]
        return _fallback(row, obs, "payload_error", reason, now, policy)
    if k == Kind.DEADLINE:
        if row.deadline_at is None or now < row.deadline_at:
            return _NOTHING
        reason = "no final answer from FAL before the deadline"
        return _fallback(row, obs, "deadline", reason, now, policy)
    if k == Kind.CANCELLED:
        return _cancelled(row, now, obs.detail)

    row.set(attempts=0)
    if k == Kind.FAL_COMPLETED:
        row.set(next_check_at=now)  # fetch the result at once
        if row.fal_completed_at is None:
            row.set(fal_completed_at=now)
            return ChangeKind.FAL_COMPLETED, {}, None
        return ChangeKind.CHECKED, {}, None
    row.set(next_check_at=policy.poll_after(now))
    if k == Kind.QUEUED and row.status == "SUBMITTED":
        row.set(status="IN_QUEUE")
        return ChangeKind.STATUS, {}, None
    if k == Kind.RUNNING:
        progress = max(row.progress, min(99, obs.progress or 0))
        if row.status != "IN_PROGRESS":
            row.set(status="IN_PROGRESS", started_at=row.started_at or now, progress=progress)
            return ChangeKind.STATUS, {}, None
        if progress != row.progress:
            row.set(progress=progress)
            return ChangeKind.PROGRESS, {}, None
    return ChangeKind.CHECKED, {}, None


def _succeeded(row: _Draft, obs: Observation, now: float, policy: Policy, terminal: bool) -> _Rule:
    result_field = policy.result_fields.get(row.training_type, "diffusers_lora_file")
    fields = extract_result(obs.output or {}, result_field)
    if fields is None:
        if terminal:
            return _NOTHING
        return _fallback(
            row, obs, "no_artifact", f"FAL's result has no {result_field}", now, policy
        )
    if terminal and not row.is_fallback:
        if row.status != "COMPLETED":  # a real failure or a cancel stays as it is
            return _NOTHING
        return _fill(row, fields, obs), {}, None
    kind = ChangeKind.UPGRADE if terminal else ChangeKind.RESULT
    previous = {"fallback_layer": row.fallback_layer, "fallback_reason": row.fallback_reason}
    row.set(
        status="COMPLETED",
        progress=100,
        lora_url=fields["lora_url"],
        config_url=fields["config_url"],
        finetune_id=fields["finetune_id"],
        result_json=json.dumps(obs.output, ensure_ascii=False, sort_keys=True),
        result_layer=obs.layer,
        trigger_phrase=row.trigger_phrase or policy.fallback_trigger_phrase,
        is_fallback=False,
        fallback_layer=None,
        fallback_reason=None,
        fallback_kind=None,
        completed_at=now,
        next_check_at=None,
        attempts=0,
    )
    ttr = now - row.fal_completed_at if row.fal_completed_at else None
    if kind == ChangeKind.RESULT:
        row.set(delayed_check_at=now + policy.verify_after)
        stored: dict[str, Any] = {"lora_url": row.lora_url, "finetune_id": row.finetune_id}
        if row.cancel_requested_at is not None:
            stored["cancel_not_honoured"] = True  # it finished anyway: a paid result
        return kind, stored, ttr
    return kind, {"replaced": previous, "lora_url": row.lora_url}, ttr


def _failure(
    row: _Draft, obs: Observation, kind: str, detail: str | None, now: float, policy: Policy
) -> _Rule:
    """FAL's certain failure; after a cancel was requested it is the cancel taking effect."""
    if row.cancel_requested_at is not None:
        return _cancelled(row, now, detail)
    row.set(failure_detail=(detail or "")[:4000] or None)
    reason = f"FAL reported a failure: {detail or 'no detail'}"[:2000]
    return _fallback(row, obs, kind, reason, now, policy)


def _cancelled(row: _Draft, now: float, detail: str | None) -> _Rule:
    row.set(status="CANCELLED", completed_at=now, next_check_at=None, delayed_check_at=None)
    return ChangeKind.CANCELLED, {"detail": detail[:2000]} if detail else {}, None


def _fallback(
    row: _Draft, obs: Observation, kind: str, reason: str, now: float, policy: Policy
) -> _Rule:
    row.set(
        is_fallback=True,
        fallback_layer=obs.layer,
        fallback_kind=kind,
        fallback_reason=reason,
        trigger_phrase=row.trigger_phrase or policy.fallback_trigger_phrase,
    )
    if policy.fallback_mode == "complete":
        url = policy.fallback_url(obs.layer, name=row.name, request_id=row.request_id)
        row.set(status="COMPLETED", progress=100, lora_url=url)
    else:
        row.set(status="FAILED")
    row.set(completed_at=now, next_check_at=None, delayed_check_at=now + policy.verify_after)
    return ChangeKind.FALLBACK, {"reason": reason}, None


def _fill(row: _Draft, fields: Mapping[str, Any], obs: Observation) -> ChangeKind:
    """A real result is stored; fill only what it lacks, never replace what it has."""
    filled = {k: v for k, v in fields.items() if v and not getattr(row, k)}
    row.set(**filled)
    if not row.result_json and obs.output:
        row.set(result_json=json.dumps(obs.output, ensure_ascii=False, sort_keys=True))
    return ChangeKind.FILLED if filled else ChangeKind.NONE
