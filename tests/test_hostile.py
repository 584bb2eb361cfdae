"""Hostile input and faults (issue 9): each test reproduces one attack, bounded, on loopback."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.reconcile import Kind, Observation, Reconciler, extract_result


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
