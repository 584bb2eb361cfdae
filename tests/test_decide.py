"""``decide`` alone: no database, no writer. Table-driven rules and the order property."""

from __future__ import annotations

import random
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import make_settings
from trainguard.decide import ChangeKind, Decision, Policy, decide
from trainguard.observe import Kind, Observation
from trainguard.store import TrainingView

NOW = 1_000_000.0
LORA = {"diffusers_lora_file": {"url": "https://x/l.safetensors"}, "config_file": {"url": "c"}}


def policy(**overrides: Any) -> Policy:
    base = Policy.of(make_settings(Path("/nonexistent.db")), random.Random(7))
    return replace(base, **overrides)


def view(**values: Any) -> TrainingView:
    blank: dict[str, Any] = {f.name: None for f in fields(TrainingView)}
    blank.update(
        id=1,
        name="ann",
        training_type="flux_lora",
        endpoint="fal-ai/flux-lora-fast-training",
        request_id="r1",
        status="IN_PROGRESS",
        progress=10,
        trigger_phrase="ann",
        is_fallback=False,
        submitted_at=NOW - 100,
        deadline_at=NOW + 1000,
        attempts=0,
        updated_at=NOW - 100,
        result_errors=0,
    )
    blank.update(values)
    return TrainingView(**blank)


def obs(kind: Kind, layer: str = "poller", **kw: Any) -> Observation:
    return Observation("r1", layer, kind, **kw)


def run(v: TrainingView, o: Observation, p: Policy | None = None) -> tuple[Decision, TrainingView]:
    d = decide(v, o, NOW, p or policy())
    return d, replace(v, **d.updates)


CASES: list[tuple[str, dict[str, Any], Observation, ChangeKind, dict[str, Any]]] = [
    (
        "queued",
        {"status": "SUBMITTED"},
        obs(Kind.QUEUED),
        ChangeKind.STATUS,
        {"status": "IN_QUEUE"},
    ),
    (
        "running",
        {"status": "IN_QUEUE"},
        obs(Kind.RUNNING, progress=40),
        ChangeKind.STATUS,
        {"status": "IN_PROGRESS", "progress": 40, "started_at": NOW},
    ),
    ("progress capped", {}, obs(Kind.RUNNING, progress=100), ChangeKind.PROGRESS, {"progress": 99}),
    (
        "progress never back",
        {"progress": 50},
        obs(Kind.RUNNING, progress=5),
        ChangeKind.CHECKED,
        {"progress": 50},
    ),
    (
        "fal completed",
        {},
        obs(Kind.FAL_COMPLETED),
        ChangeKind.FAL_COMPLETED,
        {"fal_completed_at": NOW, "next_check_at": NOW},
    ),
    (
        "result",
        {"fal_completed_at": NOW - 5},
        obs(Kind.SUCCEEDED, output=LORA),
        ChangeKind.RESULT,
        {
            "status": "COMPLETED",
            "lora_url": "https://x/l.safetensors",
            "config_url": "c",
            "result_layer": "poller",
            "next_check_at": None,
        },
    ),
    (
        "no artifact",
        {},
        obs(Kind.SUCCEEDED, output={}),
        ChangeKind.FALLBACK,
        {"is_fallback": True, "fallback_kind": "no_artifact", "status": "COMPLETED"},
    ),
    (
        "terminal never regresses",
        {"status": "CANCELLED"},
        obs(Kind.RUNNING),
        ChangeKind.NONE,
        {"status": "CANCELLED"},
    ),
    (
        "real failure stays",
        {"status": "FAILED"},
        obs(Kind.SUCCEEDED, output=LORA),
        ChangeKind.NONE,
        {"status": "FAILED"},
    ),
    (
        "upgrade",
        {"status": "COMPLETED", "is_fallback": True, "fallback_kind": "deadline"},
        obs(Kind.SUCCEEDED, output=LORA),
        ChangeKind.UPGRADE,
        {"is_fallback": False, "fallback_kind": None},
    ),
    (
        "fill only",
        {"status": "COMPLETED", "lora_url": "keep"},
        obs(Kind.SUCCEEDED, output=LORA),
        ChangeKind.FILLED,
        {"lora_url": "keep", "config_url": "c"},
    ),
    (
        "transient",
        {"attempts": 2},
        obs(Kind.TRANSIENT, detail="HTTP 503"),
        ChangeKind.BACKOFF,
        {"attempts": 3, "last_error": "HTTP 503", "status": "IN_PROGRESS"},
    ),
    (
        "not found before completed",
        {},
        obs(Kind.NOT_FOUND),
        ChangeKind.BACKOFF,
        {"status": "IN_PROGRESS"},
    ),
    (
        "expired",
        {"fal_completed_at": NOW - 5},
        obs(Kind.RESULT_NOT_FOUND),
        ChangeKind.FALLBACK,
        {"fallback_kind": "expired"},
    ),
    (
        "error result not final yet",
        {},
        obs(Kind.ERROR_RESULT),
        ChangeKind.CHECKED,
        {"next_check_at": NOW, "status": "IN_PROGRESS"},
    ),
    (
        "error result final",
        {"fal_completed_at": NOW - 5},
        obs(Kind.ERROR_RESULT, detail="bad"),
        ChangeKind.FALLBACK,
        {"fallback_kind": "fal_failure", "failure_detail": "bad"},
    ),
    (
        "5xx bounded",
        {"fal_completed_at": NOW - 5, "result_errors": 4},
        obs(Kind.RESULT_ERROR_5XX),
        ChangeKind.FALLBACK,
        {"fallback_kind": "result_error", "result_errors": 5},
    ),
    (
        "5xx counted",
        {"fal_completed_at": NOW - 5},
        obs(Kind.RESULT_ERROR_5XX),
        ChangeKind.BACKOFF,
        {"result_errors": 1, "attempts": 1},
    ),
    (
        "cancel requested",
        {},
        obs(Kind.CANCEL_REQUESTED),
        ChangeKind.CANCEL_REQUESTED,
        {"cancel_requested_at": NOW, "next_check_at": NOW, "status": "IN_PROGRESS"},
    ),
    (
        "failure after cancel",
        {"cancel_requested_at": NOW - 1},
        obs(Kind.FAILED),
        ChangeKind.CANCELLED,
        {"status": "CANCELLED", "delayed_check_at": None},
    ),
    (
        "removed after cancel",
        {"cancel_requested_at": NOW - 1},
        obs(Kind.NOT_FOUND),
        ChangeKind.CANCELLED,
        {"status": "CANCELLED"},
    ),
    (
        "payload error",
        {},
        obs(Kind.PAYLOAD_ERROR, detail="x"),
        ChangeKind.FALLBACK,
        {"fallback_kind": "payload_error"},
    ),
    ("deadline not yet", {}, obs(Kind.DEADLINE), ChangeKind.NONE, {"is_fallback": False}),
    (
        "deadline passed",
        {"deadline_at": NOW - 1},
        obs(Kind.DEADLINE, "emergency"),
        ChangeKind.FALLBACK,
        {"fallback_kind": "deadline", "fallback_layer": "emergency"},
    ),
    ("recheck unfinished", {}, obs(Kind.RECHECK), ChangeKind.RECHECK, {"next_check_at": NOW}),
    (
        "recheck finished",
        {"status": "COMPLETED"},
        obs(Kind.RECHECK),
        ChangeKind.RECHECK,
        {"delayed_check_at": NOW},
    ),
    (
        "probe missing",
        {"status": "COMPLETED", "lora_url": "u"},
        obs(Kind.PROBED, "delayed", available=False),
        ChangeKind.ARTIFACT_MISSING,
        {"lora_available": False, "delayed_check_at": None},
    ),
    (
        "delayed retry",
        {"status": "COMPLETED", "delayed_check_at": NOW},
        obs(Kind.TRANSIENT, "delayed"),
        ChangeKind.NONE,
        {"status": "COMPLETED"},
    ),
]


@pytest.mark.parametrize(
    ("before", "o", "kind", "after"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_rules(
    before: dict[str, Any], o: Observation, kind: ChangeKind, after: dict[str, Any]
) -> None:
    v = view(**before)
    d, new = run(v, o)
    assert d.kind == kind
    assert {k: getattr(new, k) for k in after} == after
    assert v == view(**before)  # nothing was mutated


def test_delayed_retry_is_scheduled_with_backoff() -> None:
    _, new = run(view(status="COMPLETED", delayed_check_at=NOW), obs(Kind.TRANSIENT, "delayed"))
    assert new.delayed_check_at is not None and new.delayed_check_at > NOW


def test_events_and_outbox() -> None:
    d, _ = run(view(), obs(Kind.FAILED, detail="x"), policy(fallback_mode="fail"))
    assert d.outbox_event == "training.failed" and d.event is not None
    assert (d.event.from_status, d.event.to_status) == ("IN_PROGRESS", "FAILED")
    d, _ = run(view(attempts=2), obs(Kind.TRANSIENT))  # attempts 3: no error event
    assert d.event is None and d.outbox_event is None
    d, _ = run(view(attempts=3), obs(Kind.TRANSIENT))  # attempts 4: recorded
    assert d.event is not None and d.event.kind == "error"
    d, _ = run(view(fal_completed_at=NOW - 9), obs(Kind.SUCCEEDED, output=LORA))
    assert d.outbox_event == "training.completed" and d.time_to_result == 9


SUCCESS = [
    obs(Kind.QUEUED),
    obs(Kind.RUNNING, progress=30),
    obs(Kind.RUNNING, progress=70),
    obs(Kind.FAL_COMPLETED),
    obs(Kind.SUCCEEDED, output=LORA),
]
FAILURE = [obs(Kind.QUEUED), obs(Kind.FAL_COMPLETED), obs(Kind.FAILED, detail="422")]
SEMANTIC = ("status", "lora_url", "config_url", "is_fallback", "fallback_kind", "result_json")


def final(steps: list[Observation]) -> dict[str, Any]:
    v, p = view(status="SUBMITTED", progress=0), policy()
    for o in steps:
        v = replace(v, **decide(v, o, NOW, p).updates)
    return {k: getattr(v, k) for k in SEMANTIC}


@settings(max_examples=200, deadline=None)
@given(data=st.data(), story=st.sampled_from([SUCCESS, FAILURE]))
def test_any_order_or_duplication_ends_like_the_clean_sequence(
    data: st.DataObject, story: list[Observation]
) -> None:
    steps = data.draw(st.lists(st.sampled_from(story), max_size=12)) + story
    steps += data.draw(st.lists(st.just(obs(Kind.TRANSIENT, detail="503")), max_size=3))
    assert final(data.draw(st.permutations(steps))) == final(story)
