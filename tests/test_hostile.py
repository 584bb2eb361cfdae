"""Hostile input and faults (issue 9): each test reproduces one attack, bounded, on loopback."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from tests.test_schedules import LORA, ScriptedFal
from trainguard.config import Settings
from trainguard.layer import LayerContext
from trainguard.layers.startup import StartupLayer
from trainguard.reconcile import Kind, Observation, Reconciler, extract_result
from trainguard.store import Store, WebhookReceipt


@pytest.mark.parametrize(
    "url",
    [
        "https://v3.fal.media/files/\ud800.safetensors",  # a lone surrogate (a JSON escape)
        "https://v3.fal.media/files/a\x00b.safetensors",
        "https://v3.fal.media/" + "a" * 100_000,
    ],
)
async def test_an_unstorable_url_in_fals_output_is_no_proof_not_a_crash(
    reconciler: Reconciler, url: str
) -> None:
    """Regression (issue 9, item 1): a value from FAL's output that the database cannot hold
    made the write raise; now it is judged where it enters, and the result is a marked
    fallback (the output carried no storable proof) instead of a write that fails forever."""
    await reconciler.register(name="n", training_type="portrait", request_id="r1", layer="test")
    output: dict[str, Any] = {"diffusers_lora_file": {"url": url}}
    change = await reconciler.observe(Observation("r1", "webhook", Kind.SUCCEEDED, output=output))
    view = change.training
    assert view is not None and view.is_fallback and view.fallback_kind == "no_artifact"
    assert view.lora_url != url


def test_extract_result_keeps_fals_real_shapes() -> None:
    lora = "https://v3.fal.media/files/koala/abc/pytorch_lora_weights.safetensors"
    output = {"diffusers_lora_file": {"url": lora}, "config_file": {"url": "https://x/c.json"}}
    assert extract_result(output, "diffusers_lora_file") == {
        "lora_url": lora,
        "finetune_id": None,
        "config_url": "https://x/c.json",
    }
    assert extract_result({"finetune_id": "8f1c-uuid"}, "finetune_id") == {
        "lora_url": None,
        "finetune_id": "8f1c-uuid",
        "config_url": None,
    }
    bad_config = {"diffusers_lora_file": {"url": lora}, "config_file": {"url": "\ud800"}}
    assert extract_result(bad_config, "diffusers_lora_file")["config_url"] is None  # type: ignore[index]


async def test_startup_never_replays_receipts_of_unknown_trainings(
    store: Store, settings: Settings
) -> None:
    """Regression (issue 9, item 6): 150,000 signed webhooks for request ids we never
    submitted were re-applied by the startup sweep before READY (106 s). Now the sweep applies
    only stored receipts of known trainings."""
    reconciler = Reconciler(store, settings)
    await reconciler.register(name="n", training_type="portrait", request_id="known", layer="t")

    def plant(conn: Any) -> None:
        rows = [
            {
                "request_id": f"stranger-{i}",
                "body": b'{"request_id": "x", "status": "OK", "payload": {}}',
                "headers_json": "{}",
                "verification": "verified",
                "received_at": 1.0,
                "outcome": "unknown_training",
            }
            for i in range(20_000)
        ]
        for start in range(0, len(rows), 500):
            WebhookReceipt.insert_many(rows[start : start + 500]).execute()
        body = json.dumps({"request_id": "known", "status": "OK", "payload": LORA}).encode()
        WebhookReceipt.create(  # stored, then a crash before it was applied
            request_id="known",
            body=body,
            headers_json="{}",
            verification="verified",
            received_at=2.0,
        )

    await store.write(plant)
    applied: list[int] = []
    original = reconciler.apply_receipt

    async def counting(receipt_id: int, **kw: Any) -> Any:
        applied.append(receipt_id)
        return await original(receipt_id, **kw)

    reconciler.apply_receipt = counting  # type: ignore[method-assign]
    ctx = LayerContext(
        name="startup",
        settings=settings,
        store=store,
        reconciler=reconciler,
        fal=ScriptedFal(),  # type: ignore[arg-type]
        metrics=None,
        clock=reconciler.clock,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(StartupLayer().run, ctx)
    assert len(applied) == 1
    view = await store.training("known")
    assert view is not None and view.status == "COMPLETED"
    left = await store.read(
        lambda conn: (
            WebhookReceipt.select().where(WebhookReceipt.outcome == "unknown_training").count()
        )
    )
    assert left == 20_000  # untouched: evicted by the webhook layer's prune, not replayed
