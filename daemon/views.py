"""The JSON views of a training: what the CLI, the admin API and the delivery plugin show."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from trainguard.store import TrainingView


def missing_fields(view: TrainingView) -> list[str]:
    """Guaranteed fields a finished training lacks (empty for unfinished or failed ones)."""
    if view.status != "COMPLETED":
        return []
    missing = []
    if not view.trigger_phrase:
        missing.append("trigger_phrase")
    if not (view.lora_url or view.finetune_id):
        missing.append("lora_url")
    if not view.is_fallback and view.lora_url and not view.config_url:
        missing.append("config_url")
    return missing


def view_as_dict(view: TrainingView) -> dict[str, Any]:
    """The operator contract's JSON shape of a training (see design.md)."""

    def iso(ts: float | None) -> str | None:
        return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z") if ts else None

    return {
        "request_id": view.request_id,
        "name": view.name,
        "training_type": view.training_type,
        "endpoint": view.endpoint,
        "status": view.status,
        "progress": view.progress,
        "trigger_phrase": view.trigger_phrase,
        "lora_url": view.lora_url,
        "config_url": view.config_url,
        "finetune_id": view.finetune_id,
        "is_fallback": bool(view.is_fallback),
        "fallback_layer": view.fallback_layer,
        "fallback_kind": view.fallback_kind,
        "fallback_reason": view.fallback_reason,
        "result_layer": view.result_layer,
        "failure_detail": view.failure_detail,
        "last_error": view.last_error,
        "attempts": view.attempts,
        "missing_fields": missing_fields(view),
        "submitted_at": iso(view.submitted_at),
        "started_at": iso(view.started_at),
        "completed_at": iso(view.completed_at),
        "last_checked_at": iso(view.last_checked_at),
        "next_check_at": iso(view.next_check_at),
        "deadline_at": iso(view.deadline_at),
        "cancel_requested_at": iso(view.cancel_requested_at),
        "result_errors": view.result_errors,
    }
