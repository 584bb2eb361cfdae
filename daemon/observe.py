"""What layers see, as observations: FAL's classified answers and FAL's webhook bodies.

Beside the FAL client (``daemon/fal.py``): ``observation_from_answer`` reads a
``fal.Answer``; ``read_webhook`` parses a webhook body once, where it arrives, into a
``WebhookBody`` (its ids and its observation) that the listener hands on to reconcile.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from trainguard import fal
from trainguard.errors import MalformedWebhook


class Kind(StrEnum):
    """What a layer saw."""

    QUEUED = "queued"  # FAL: IN_QUEUE
    RUNNING = "running"  # FAL: IN_PROGRESS (maybe with progress)
    PENDING = "pending"  # FAL: not done yet, nothing more known
    FAL_COMPLETED = "fal_completed"  # FAL: COMPLETED; the result is still to be fetched
    SUCCEEDED = "succeeded"  # a model output (result fetch, OK webhook)
    FAILED = "failed"  # FAL's definitive failure (ERROR webhook, COMPLETED status with error)
    ERROR_RESULT = "error_result"  # the result call answered an error: final once COMPLETED
    RESULT_ERROR_5XX = "result_error_5xx"  # an untyped 5xx on the result: bounded once COMPLETED
    RESULT_NOT_FOUND = "result_not_found"  # the result call answered 404
    PAYLOAD_ERROR = "payload_error"  # FAL finished but could not serialise the output
    NOT_FOUND = "not_found"  # FAL does not know the request (expired after completion)
    TRANSIENT = "transient"  # timeout, 429, 5xx, connection error: try again later
    DEADLINE = "deadline"  # the emergency deadline has passed
    CANCEL_REQUESTED = "cancel_requested"  # FAL accepted our cancel request (not an outcome)
    CANCELLED = "cancelled"  # FAL certainly will not produce a result: the cancel took effect
    PROBED = "probed"  # the stored LoRA URL was asked whether it still answers
    RECHECK = "recheck"  # an operator asked for a check now


@dataclass(frozen=True)
class Observation:
    request_id: str
    layer: str
    kind: Kind
    progress: int | None = None
    output: Mapping[str, Any] | None = None
    detail: str | None = None
    available: bool | None = None  # PROBED: whether the artifact URL answered 2xx


@dataclass(frozen=True)
class WebhookBody:
    """A webhook body parsed once: its two ids and what it says."""

    request_id: str
    gateway_request_id: str | None
    observation: Observation


def observation_from_answer(answer: fal.Answer, request_id: str, layer: str) -> Observation:
    """Translate a classified FAL answer into an observation.

    What a result call's error means depends on whether FAL said COMPLETED before (only
    reconcile knows), so those get kinds of their own; a status call's error answer (not
    COMPLETED with an error) says nothing certain about the training and is transient.
    """
    k, op = fal.Kind, answer.op

    def seen(kind: Kind, **fields: Any) -> Observation:
        return Observation(request_id, layer, kind, **fields)

    if answer.kind == k.TRANSIENT:
        if op == "result" and (answer.http_status or 0) >= 500:
            return seen(Kind.RESULT_ERROR_5XX, detail=answer.detail)
        return seen(Kind.TRANSIENT, detail=answer.detail)
    if answer.kind == k.NOT_FOUND:
        kind = Kind.RESULT_NOT_FOUND if op == "result" else Kind.NOT_FOUND
        return seen(kind, detail=answer.detail)
    if answer.kind == k.FAILED:
        if answer.status == "ALREADY_COMPLETED":  # a cancel too late: fetch the result
            return seen(Kind.FAL_COMPLETED, detail=answer.detail)
        if op == "result":
            return seen(Kind.ERROR_RESULT, detail=answer.detail)
        if answer.status == "COMPLETED":  # a COMPLETED status with an error
            return seen(Kind.FAILED, detail=answer.detail)
        return seen(Kind.TRANSIENT, detail=answer.detail)
    if answer.kind == k.COMPLETED:
        return seen(Kind.FAL_COMPLETED)
    if answer.kind == k.SUCCEEDED:
        if op == "cancel":
            return seen(Kind.CANCEL_REQUESTED)
        return seen(Kind.SUCCEEDED, output=answer.output or {})
    # PENDING
    if answer.status == "IN_QUEUE":
        return seen(Kind.QUEUED)
    if answer.status == "IN_PROGRESS":
        return seen(Kind.RUNNING, progress=answer.progress)
    return seen(Kind.PENDING)


def _detail_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)[:2000]


def read_webhook(body: bytes) -> WebhookBody:
    """Parse a FAL webhook body (OK / ERROR / payload_error) once: its ids and its
    observation. Raises MalformedWebhook for anything that is not FAL's shape."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise MalformedWebhook("body is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("request_id"), str):
        raise MalformedWebhook("body has no request_id")
    if not data["request_id"]:
        raise MalformedWebhook("request_id is missing")
    gateway = data.get("gateway_request_id")
    return WebhookBody(
        data["request_id"],
        gateway if isinstance(gateway, str) else None,
        _webhook_observation(data),
    )


def parse_webhook(body: bytes) -> Observation:
    """Read a FAL webhook body (OK / ERROR / payload_error) into an observation."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise MalformedWebhook("body is not JSON") from None
    if not isinstance(data, dict):
        raise MalformedWebhook("body is not a JSON object")
    request_id = data.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise MalformedWebhook("request_id is missing")
    return _webhook_observation(data)


def _webhook_observation(data: Mapping[str, Any]) -> Observation:
    request_id = data["request_id"]
    status = data.get("status")
    payload = data.get("payload")
    if status == "OK":
        if isinstance(payload, dict):
            return Observation(request_id, "webhook", Kind.SUCCEEDED, output=payload)
        if payload is None and data.get("payload_error"):
            detail = _detail_text(data["payload_error"])
            return Observation(request_id, "webhook", Kind.PAYLOAD_ERROR, detail=detail)
        raise MalformedWebhook("status OK without a payload object")
    if status == "ERROR":
        parts = [_detail_text(data.get("error") or "error")]
        if payload is None and data.get("payload_error"):
            parts.append(_detail_text(data["payload_error"]))
        elif isinstance(payload, dict) and "detail" in payload:
            parts.append(_detail_text(payload["detail"]))
        detail = ": ".join(parts)
        return Observation(request_id, "webhook", Kind.FAILED, detail=detail)
    raise MalformedWebhook(f"unknown status {str(status)[:40]!r}")
