"""Reconcile: the only writer. Idempotent, monotonic, honest about fallbacks."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import make_settings
from trainguard import config
from trainguard.reconcile import (
    AlreadyTracked,
    Kind,
    MalformedWebhook,
    Observation,
    Reconciler,
    extract_result,
    missing_fields,
    parse_webhook,
)
from trainguard.store import Store, TrainingView, open_store

LORA = {
    "diffusers_lora_file": {"url": "https://v3.fal.media/files/x/pytorch_lora_weights.safetensors"},
    "config_file": {"url": "https://v3.fal.media/files/x/config.json"},
}


async def register(
    r: Reconciler, rid: str = "req-1", ttype: str = "portrait", **kw: Any
) -> TrainingView:
    return await r.register(name="ann", training_type=ttype, request_id=rid, layer="test", **kw)


def obs(kind: Kind, layer: str = "poller", rid: str = "req-1", **kw: Any) -> Observation:
    return Observation(rid, layer, kind, **kw)


async def test_register_sets_schedules_and_refuses_duplicates(
    reconciler: Reconciler, settings: config.Settings
) -> None:
    view = await register(reconciler, trigger_phrase="ann person")
    assert view.status == "SUBMITTED"
    assert view.next_check_at == pytest.approx(view.submitted_at + 90)
    assert view.delayed_check_at == pytest.approx(view.submitted_at + 600)
    assert view.deadline_at == pytest.approx(view.submitted_at + 21600)
    with pytest.raises(AlreadyTracked):
        await register(reconciler)
    events = await reconciler.store.events("req-1")
    assert [e["kind"] for e in events] == ["registered"]


async def test_clean_success_path(reconciler: Reconciler, store: Store) -> None:
    await register(reconciler, trigger_phrase="ann person")
    assert (await reconciler.observe(obs(Kind.QUEUED))).to_status == "IN_QUEUE"
    change = await reconciler.observe(obs(Kind.RUNNING, progress=40))
    assert change.to_status == "IN_PROGRESS" and change.training and change.training.progress == 40
    change = await reconciler.observe(obs(Kind.SUCCEEDED, layer="webhook", output=LORA))
    assert change.kind == "result"
    view = await store.training("req-1")
    assert view is not None
    assert view.status == "COMPLETED" and view.progress == 100
    assert view.lora_url == LORA["diffusers_lora_file"]["url"]
    assert view.config_url == LORA["config_file"]["url"]
    assert view.trigger_phrase == "ann person"
    assert view.result_layer == "webhook" and not view.is_fallback
    assert view.completed_at is not None and view.next_check_at is None
    assert missing_fields(view) == []
    kinds = [e["kind"] for e in await store.events("req-1")]
    assert kinds == ["registered", "status", "status", "result"]


async def test_duplicate_and_late_observations_change_nothing(
    reconciler: Reconciler, store: Store
) -> None:
    await register(reconciler)
    await reconciler.observe(obs(Kind.SUCCEEDED, output=LORA))
    before = await store.training("req-1")
    for late in (
        Kind.RUNNING,
        Kind.QUEUED,
        Kind.FAILED,
        Kind.PAYLOAD_ERROR,
        Kind.TRANSIENT,
        Kind.NOT_FOUND,
    ):
        change = await reconciler.observe(obs(late, progress=5, detail="late"))
        assert not change.changed
    again = await reconciler.observe(obs(Kind.SUCCEEDED, layer="webhook", output=LORA))
    assert again.kind == "none"
    after = await store.training("req-1")
    assert after is not None and before is not None
    assert (after.status, after.lora_url, after.result_layer, after.is_fallback) == (
        before.status,
        before.lora_url,
        before.result_layer,
        before.is_fallback,
    )
    assert len([e for e in await store.events("req-1") if e["kind"] == "result"]) == 1


async def test_default_trigger_phrase_when_none_given(reconciler: Reconciler, store: Store) -> None:
    await register(reconciler)
    await reconciler.observe(obs(Kind.SUCCEEDED, output=LORA))
    view = await store.training("req-1")
    assert view is not None and view.trigger_phrase == "TOK"


async def test_style_result_is_a_finetune_id(reconciler: Reconciler, store: Store) -> None:
    await register(reconciler, ttype="style")
    await reconciler.observe(obs(Kind.SUCCEEDED, output={"finetune_id": "ft-123"}))
    view = await store.training("req-1")
    assert view is not None
    assert (view.status, view.finetune_id, view.lora_url, view.is_fallback) == (
        "COMPLETED",
        "ft-123",
        None,
        False,
    )
    assert missing_fields(view) == []


@pytest.mark.parametrize(
    ("observation", "fallback_kind"),
    [
        (obs(Kind.FAILED, detail="Invalid status code: 422"), "fal_failure"),
        (obs(Kind.SUCCEEDED, output={"config_file": {"url": "https://x/c.json"}}), "no_artifact"),
        (obs(Kind.PAYLOAD_ERROR, detail="too big"), "payload_error"),
    ],
)
async def test_definitive_no_artifact_applies_marked_fallback(
    reconciler: Reconciler, store: Store, observation: Observation, fallback_kind: str
) -> None:
    await register(reconciler)
    change = await reconciler.observe(observation)
    assert change.kind == "fallback"
    view = await store.training("req-1")
    assert view is not None
    assert view.status == "COMPLETED" and view.is_fallback
    assert view.fallback_layer == "poller" and view.fallback_kind == fallback_kind
    assert view.fallback_reason
    assert view.lora_url == "https://status-checker.fallback.invalid/lora/ann.safetensors"
    assert view.result_layer is None
    events = await store.events("req-1")
    assert events[-1]["kind"] == "fallback" and events[-1]["layer"] == "poller"


async def test_fail_mode_finishes_failed_without_url(settings_factory: Any) -> None:
    s = settings_factory({"fallback": {"mode": "fail"}})
    async with open_store(s.database["url"]) as st_:
        r = Reconciler(st_, s)
        await register(r)
        await r.observe(obs(Kind.FAILED, layer="webhook", detail="boom"))
        view = await st_.training("req-1")
    assert view is not None
    assert (view.status, view.lora_url, view.is_fallback, view.fallback_layer) == (
        "FAILED",
        None,
        True,
        "webhook",
    )
    assert view.failure_detail == "boom"


async def test_transient_errors_back_off_and_never_finish(
    reconciler: Reconciler, store: Store
) -> None:
    await register(reconciler)
    delays = []
    for _ in range(12):
        change = await reconciler.observe(obs(Kind.TRANSIENT, detail="HTTP 503"))
        assert change.kind == "backoff"
        assert change.training is not None
        delays.append(change.training.next_check_at - change.training.last_checked_at)
    view = await store.training("req-1")
    assert view is not None and view.status == "SUBMITTED" and view.attempts == 12
    assert delays[1] > delays[0] and delays[3] > delays[2]
    assert max(delays) <= 900  # capped
    errors = [e for e in await store.events("req-1") if e["kind"] == "error"]
    assert len(errors) == 4  # attempts 1, 2, 4, 8: an outage does not flood the history
    # a NOT_FOUND before FAL ever said COMPLETED is not a verdict either
    assert (await reconciler.observe(obs(Kind.NOT_FOUND))).kind == "backoff"
    # a good answer resets the backoff
    await reconciler.observe(obs(Kind.RUNNING, progress=10))
    assert (await store.training("req-1")).attempts == 0  # type: ignore[union-attr]


async def test_expired_result_after_completion_is_a_fallback(
    reconciler: Reconciler, store: Store
) -> None:
    await register(reconciler)
    assert (await reconciler.observe(obs(Kind.FAL_COMPLETED))).kind == "fal_completed"
    change = await reconciler.observe(obs(Kind.NOT_FOUND))
    assert change.kind == "fallback"
    assert change.training is not None and change.training.fallback_kind == "expired"


async def test_deadline_only_after_deadline(settings_factory: Any) -> None:
    s = settings_factory({"layers": {"emergency": {"deadline_seconds": 0.01}}})
    async with open_store(s.database["url"]) as st_:
        r = Reconciler(st_, s)
        await register(r, submitted_at=r.clock.now() + 3600)  # deadline far in the future
        assert (await r.observe(obs(Kind.DEADLINE, layer="emergency"))).kind == "none"
        await register(r, rid="req-2")
        await trio.sleep(0.02)
        change = await r.observe(obs(Kind.DEADLINE, layer="emergency", rid="req-2"))
    assert change.kind == "fallback"
    assert change.training is not None
    assert change.training.fallback_layer == "emergency"
    assert change.training.lora_url == "https://emergency.fallback.invalid/lora/ann.safetensors"


async def test_real_result_upgrades_fallback_and_fallback_never_overwrites_real(
    reconciler: Reconciler, store: Store
) -> None:
    await register(reconciler)
    await reconciler.observe(obs(Kind.PAYLOAD_ERROR, layer="webhook", detail="x"))
    change = await reconciler.observe(obs(Kind.SUCCEEDED, layer="completeness", output=LORA))
    assert change.kind == "upgrade"
    view = await store.training("req-1")
    assert view is not None
    assert not view.is_fallback and view.fallback_layer is None and view.fallback_reason is None
    assert (
        view.lora_url == LORA["diffusers_lora_file"]["url"] and view.result_layer == "completeness"
    )
    # and now no fallback can take its place
    for kind in (Kind.FAILED, Kind.PAYLOAD_ERROR, Kind.DEADLINE, Kind.NOT_FOUND):
        assert not (await reconciler.observe(obs(kind, layer="emergency", detail="x"))).changed
    view = await store.training("req-1")
    assert view is not None and not view.is_fallback
    kinds = [e["kind"] for e in await store.events("req-1")]
    assert kinds == ["registered", "fallback", "upgrade"]


async def test_missing_config_url_is_filled_later_never_replaced(
    reconciler: Reconciler, store: Store
) -> None:
    await register(reconciler)
    partial = {"diffusers_lora_file": LORA["diffusers_lora_file"]}
    await reconciler.observe(obs(Kind.SUCCEEDED, output=partial))
    view = await store.training("req-1")
    assert view is not None and missing_fields(view) == ["config_url"]
    other = {
        "diffusers_lora_file": {"url": "https://elsewhere/other.safetensors"},
        "config_file": LORA["config_file"],
    }
    change = await reconciler.observe(obs(Kind.SUCCEEDED, layer="completeness", output=other))
    assert change.kind == "filled"
    view = await store.training("req-1")
    assert view is not None
    assert view.config_url == LORA["config_file"]["url"]
    assert view.lora_url == LORA["diffusers_lora_file"]["url"]  # the stored result stays


async def test_cancel_is_terminal(reconciler: Reconciler, store: Store) -> None:
    await register(reconciler)
    assert (await reconciler.observe(obs(Kind.CANCELLED, layer="admin"))).kind == "cancelled"
    assert not (await reconciler.observe(obs(Kind.SUCCEEDED, output=LORA))).changed
    view = await store.training("req-1")
    assert view is not None and view.status == "CANCELLED" and view.lora_url is None


async def test_unknown_training_is_reported_not_created(
    reconciler: Reconciler, store: Store
) -> None:
    change = await reconciler.observe(obs(Kind.SUCCEEDED, rid="nobody", output=LORA))
    assert change.kind == "unknown"
    assert await store.training("nobody") is None


def _webhook(status: str = "OK", **extra: Any) -> bytes:
    body = {"request_id": "req-1", "gateway_request_id": "g", "status": status, **extra}
    return json.dumps(body).encode()


def test_parse_webhook_shapes() -> None:
    ok = parse_webhook(_webhook(payload=LORA))
    assert ok.kind == Kind.SUCCEEDED and ok.output == LORA and ok.request_id == "req-1"
    err = parse_webhook(
        _webhook("ERROR", error="Invalid status code: 422", payload={"detail": [{"msg": "bad"}]})
    )
    assert err.kind == Kind.FAILED and err.detail and "422" in err.detail and "bad" in err.detail
    perr = parse_webhook(_webhook(payload=None, payload_error="not serialisable"))
    assert perr.kind == Kind.PAYLOAD_ERROR
    for bad in (
        b"",
        b"[]",
        b"{",
        _webhook("completed", result=LORA),
        _webhook(payload=None),
        b'{"status":"OK"}',
    ):
        with pytest.raises(MalformedWebhook):
            parse_webhook(bad)


async def test_receipt_before_track_is_applied_on_register(
    reconciler: Reconciler, store: Store
) -> None:
    receipt, dup = await reconciler.record_receipt(
        body=_webhook(payload=LORA),
        headers={},
        verification="verified",
        request_id="req-1",
        dedupe_key="k1",
    )
    assert not dup
    assert (await reconciler.apply_receipt(receipt)).kind == "unknown"
    again, dup = await reconciler.record_receipt(
        body=_webhook(payload=LORA),
        headers={},
        verification="verified",
        request_id="req-1",
        dedupe_key="k1",
    )
    assert dup and again == receipt
    view = await register(reconciler)
    assert view.status == "COMPLETED" and view.result_layer == "webhook"


async def test_rejected_receipts_are_bounded(settings_factory: Any) -> None:
    s = settings_factory({"webhook": {"rejected_kept": 3}})
    async with open_store(s.database["url"]) as st_:
        r = Reconciler(st_, s)
        for i in range(10):
            await r.record_receipt(
                body=b"x%d" % i,
                headers={},
                verification="rejected",
                request_id=None,
                dedupe_key=None,
            )
        from trainguard.store import WebhookReceipt

        kept = await st_.read(
            lambda conn: [
                bytes(w.body) for w in WebhookReceipt.select().order_by(WebhookReceipt.id)
            ]
        )
    assert kept == [b"x7", b"x8", b"x9"]


def test_extract_result() -> None:
    assert extract_result(LORA, "diffusers_lora_file") == {
        "lora_url": LORA["diffusers_lora_file"]["url"],
        "finetune_id": None,
        "config_url": LORA["config_file"]["url"],
    }
    assert extract_result({"diffusers_lora_file": {"url": ""}}, "diffusers_lora_file") is None
    assert extract_result({"diffusers_lora_file": None}, "diffusers_lora_file") is None
    assert extract_result({"finetune_id": "f"}, "finetune_id") == {
        "lora_url": None,
        "finetune_id": "f",
        "config_url": None,
    }


# -- property: any interleaving of one training's observations ends like the clean story --
SEMANTIC = (
    "status",
    "progress",
    "lora_url",
    "config_url",
    "finetune_id",
    "trigger_phrase",
    "is_fallback",
    "fallback_kind",
    "result_json",
)

SUCCESS_STORY = [
    (Kind.QUEUED, {}),
    (Kind.RUNNING, {"progress": 30}),
    (Kind.RUNNING, {"progress": 70}),
    (Kind.FAL_COMPLETED, {}),
    (Kind.SUCCEEDED, {"output": LORA}),
]
FAILURE_STORY = [
    (Kind.QUEUED, {}),
    (Kind.RUNNING, {"progress": 50}),
    (Kind.FAL_COMPLETED, {}),
    (Kind.FAILED, {"detail": "Invalid status code: 422"}),
]


def _final_rows(
    db: Path, sequences: list[list[tuple[Kind, dict[str, Any]]]]
) -> list[dict[str, Any]]:
    s = make_settings(db)

    async def run() -> list[dict[str, Any]]:
        rows = []
        async with open_store(s.database["url"]) as st_:
            r = Reconciler(st_, s)
            for i, seq in enumerate(sequences):
                rid = f"r{i}"
                await register(r, rid=rid, trigger_phrase="ann")
                for kind, kw in seq:
                    await r.observe(Observation(rid, "poller", kind, **kw))
                view = await st_.training(rid)
                assert view is not None
                rows.append({k: getattr(view, k) for k in SEMANTIC})
        return rows

    return trio.run(run)


@st.composite
def shuffled(
    draw: st.DrawFn, story: list[tuple[Kind, dict[str, Any]]]
) -> list[tuple[Kind, dict[str, Any]]]:
    steps = draw(st.lists(st.sampled_from(story), min_size=0, max_size=12))
    steps += story  # every true observation at least once, plus duplicates
    noise = draw(st.lists(st.just((Kind.TRANSIENT, {"detail": "HTTP 503"})), max_size=3))
    return draw(st.permutations(steps + noise))


@settings(max_examples=40, deadline=None)
@given(success=shuffled(SUCCESS_STORY), failure=shuffled(FAILURE_STORY))
def test_any_order_or_duplication_ends_like_the_clean_sequence(
    success: list[tuple[Kind, dict[str, Any]]], failure: list[tuple[Kind, dict[str, Any]]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        clean = _final_rows(Path(tmp) / "clean.db", [SUCCESS_STORY, FAILURE_STORY])
        messy = _final_rows(Path(tmp) / "messy.db", [success, failure])
    assert messy == clean
    assert clean[0]["status"] == "COMPLETED" and not clean[0]["is_fallback"]
    assert clean[1]["is_fallback"] and clean[1]["fallback_kind"] == "fal_failure"


async def test_recheck_makes_a_training_due_now(reconciler: Reconciler, store: Store) -> None:
    await register(reconciler)
    change = await reconciler.observe(obs(Kind.RECHECK, layer="admin"))
    assert change.kind == "recheck" and change.training is not None
    assert change.training.next_check_at == change.training.last_checked_at  # due at once
    await reconciler.observe(obs(Kind.SUCCEEDED, output=LORA))
    change = await reconciler.observe(obs(Kind.RECHECK, layer="admin"))
    assert (
        change.training is not None
        and change.training.delayed_check_at == change.training.last_checked_at
    )
    kinds = [e["kind"] for e in await store.events("req-1")]
    assert kinds.count("recheck") == 2


async def test_probe_records_a_missing_artifact_once(reconciler: Reconciler, store: Store) -> None:
    await register(reconciler)
    await reconciler.observe(obs(Kind.SUCCEEDED, output=LORA))
    assert (
        await reconciler.observe(obs(Kind.PROBED, layer="completeness", available=True))
    ).kind == "checked"
    gone = obs(Kind.PROBED, layer="completeness", available=False, detail="HTTP 404")
    assert (await reconciler.observe(gone)).kind == "artifact_missing"
    assert (await reconciler.observe(gone)).kind == "checked"  # said once, not every pass
    view = await store.training("req-1")
    assert view is not None and view.lora_available is False and view.status == "COMPLETED"
    assert [e["kind"] for e in await store.events("req-1")].count("artifact_missing") == 1


async def test_outbox_entries_are_written_with_the_finishing_transition(
    store: Store, settings: config.Settings
) -> None:
    from trainguard.store import Outbox

    seen: list[tuple[str, str, str]] = []

    def collect(training: TrainingView, event: str, layer: str) -> list[dict[str, Any]]:
        seen.append((training.status, event, layer))
        return [{"consumer": "bot", "payload": {"request_id": training.request_id, "event": event}}]

    r = Reconciler(store, settings, outbox=collect)
    await register(r)
    await r.observe(obs(Kind.RUNNING, progress=10))  # not finishing: nothing
    await r.observe(obs(Kind.PAYLOAD_ERROR, layer="webhook", detail="x"))
    await r.observe(obs(Kind.SUCCEEDED, layer="completeness", output=LORA))
    await r.observe(obs(Kind.SUCCEEDED, layer="poller", output=LORA))  # duplicate: nothing
    assert seen == [
        ("COMPLETED", "training.fallback", "webhook"),
        ("COMPLETED", "training.upgraded", "completeness"),
    ]
    rows = await store.read(
        lambda conn: [
            (o.consumer, o.event, o.message_id) for o in Outbox.select().order_by(Outbox.id)
        ]
    )
    assert [(c, e) for c, e, _ in rows] == [
        ("bot", "training.fallback"),
        ("bot", "training.upgraded"),
    ]
    assert len({m for _, _, m in rows}) == 2


async def test_outbox_failure_in_fail_mode_is_training_failed(settings_factory: Any) -> None:
    s = settings_factory({"fallback": {"mode": "fail"}})
    events: list[str] = []
    async with open_store(s.database["url"]) as st_:
        r = Reconciler(st_, s, outbox=lambda t, e, layer: events.append(e) or [])
        await register(r)
        await r.observe(obs(Kind.FAILED, detail="boom"))
    assert events == ["training.failed"]


# -- issue 8: final errors after COMPLETED, cancels as requests, ambiguous answers -----------
def fal_answer(op: str, kind: Any, **fields: Any) -> Any:
    from trainguard import fal

    return fal.Answer(op=op, kind=fal.Kind(kind), **fields)


def test_observation_from_answer_keeps_what_only_reconcile_can_judge_apart() -> None:
    from trainguard.reconcile import observation_from_answer as read

    def kind(op: str, fal_kind: str, **fields: Any) -> Kind:
        return read(fal_answer(op, fal_kind, **fields), "req-1", "poller").kind

    assert kind("result", "failed", http_status=500) == Kind.ERROR_RESULT
    assert kind("result", "not_found", http_status=404) == Kind.RESULT_NOT_FOUND
    assert kind("result", "transient", http_status=502) == Kind.RESULT_ERROR_5XX
    assert kind("result", "transient", http_status=429) == Kind.TRANSIENT
    assert kind("result", "transient") == Kind.TRANSIENT  # no answer at all
    assert kind("status", "failed", http_status=200, status="COMPLETED") == Kind.FAILED
    assert kind("status", "failed", http_status=400) == Kind.TRANSIENT  # says nothing certain
    assert kind("status", "not_found", http_status=404) == Kind.NOT_FOUND
    assert kind("cancel", "succeeded", status="CANCELLATION_REQUESTED") == Kind.CANCEL_REQUESTED
    assert kind("cancel", "failed", status="ALREADY_COMPLETED") == Kind.FAL_COMPLETED
    assert kind("cancel", "failed", http_status=422) == Kind.TRANSIENT


async def test_an_error_result_is_final_only_after_completed_was_seen(
    reconciler: Reconciler, store: Store
) -> None:
    await register(reconciler)
    for ambiguous in (Kind.ERROR_RESULT, Kind.RESULT_NOT_FOUND):
        change = await reconciler.observe(obs(ambiguous, layer="startup", detail="HTTP 400: x"))
        assert change.kind == "checked" and change.to_status == "SUBMITTED"
        view = await store.training("req-1")
        assert view is not None and not view.is_fallback
        assert view.next_check_at == pytest.approx(view.last_checked_at)  # ask the status now
    assert (await reconciler.observe(obs(Kind.FAL_COMPLETED))).kind == "fal_completed"
    change = await reconciler.observe(obs(Kind.ERROR_RESULT, detail="HTTP 500: CUDA error"))
    assert change.kind == "fallback"
    view = await store.training("req-1")
    assert view is not None
    assert (view.fallback_kind, view.failure_detail) == ("fal_failure", "HTTP 500: CUDA error")


async def test_untyped_5xx_after_completed_is_bounded_and_counted_in_the_row(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path / "db.sqlite", {"fal": {"result_error_attempts": 3}})
    url = settings.database["url"]
    for attempt in range(1, 4):  # a fresh store and reconciler each time: as after a restart
        async with open_store(url) as store:
            reconciler = Reconciler(store, settings)
            if attempt == 1:
                await register(reconciler)
                # before COMPLETED an untyped 5xx is an ordinary transient: not counted
                await reconciler.observe(obs(Kind.RESULT_ERROR_5XX, layer="startup"))
                await reconciler.observe(obs(Kind.FAL_COMPLETED))
            change = await reconciler.observe(obs(Kind.RESULT_ERROR_5XX, detail="HTTP 502: <html>"))
            view = await store.training("req-1")
            assert view is not None and view.result_errors == attempt
            if attempt < 3:
                assert change.kind == "backoff" and view.status == "SUBMITTED"
    assert change.kind == "fallback"
    assert (view.status, view.fallback_kind) == ("COMPLETED", "result_error")
    assert view.failure_detail == "HTTP 502: <html> (result failed 3 times)"


async def test_a_cancel_request_is_not_an_outcome(reconciler: Reconciler, store: Store) -> None:
    await register(reconciler)
    await reconciler.observe(obs(Kind.RUNNING, progress=30))
    change = await reconciler.observe(obs(Kind.CANCEL_REQUESTED, layer="admin"))
    assert change.kind == "cancel_requested" and change.to_status == "IN_PROGRESS"
    assert not (await reconciler.observe(obs(Kind.CANCEL_REQUESTED, layer="admin"))).changed
    # Not-ready answers after the cancel decide nothing.
    assert (await reconciler.observe(obs(Kind.RESULT_NOT_FOUND, layer="startup"))).kind == "checked"
    assert (await reconciler.observe(obs(Kind.ERROR_RESULT, layer="startup"))).kind == "checked"
    # The trainer finished anyway: a real result, marked as a cancel not honoured.
    change = await reconciler.observe(obs(Kind.SUCCEEDED, layer="webhook", output=LORA))
    assert change.kind == "result" and change.detail["cancel_not_honoured"] is True
    view = await store.training("req-1")
    assert view is not None and view.status == "COMPLETED" and not view.is_fallback
    assert view.cancel_requested_at is not None


@pytest.mark.parametrize(
    ("steps", "last"),
    [
        ([Kind.NOT_FOUND], Kind.NOT_FOUND),  # a queued request fal removed
        ([Kind.FAL_COMPLETED], Kind.ERROR_RESULT),  # the 499 client_cancelled result
        ([], Kind.FAILED),  # an ERROR webhook, or a COMPLETED status with error
    ],
)
async def test_a_cancel_that_took_effect_ends_cancelled(
    reconciler: Reconciler, store: Store, steps: list[Kind], last: Kind
) -> None:
    await register(reconciler)
    # Without a cancel, NOT_FOUND before COMPLETED is only waited on.
    assert (await reconciler.observe(obs(Kind.NOT_FOUND))).kind == "backoff"
    await reconciler.observe(obs(Kind.CANCEL_REQUESTED, layer="admin"))
    for step in steps[:-1] if last == Kind.NOT_FOUND else steps:
        await reconciler.observe(obs(step))
    change = await reconciler.observe(obs(last, detail="client_cancelled"))
    assert change.kind == "cancelled"
    view = await store.training("req-1")
    assert view is not None
    assert (view.status, view.is_fallback, view.fallback_kind) == ("CANCELLED", False, None)
    assert not (await reconciler.observe(obs(Kind.SUCCEEDED, output=LORA))).changed
