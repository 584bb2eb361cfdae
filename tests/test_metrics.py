"""daemon.metrics: every known series at 0 from the start, counters move, valid exposition."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trainguard.metrics import (
    BUILTIN_LAYERS,
    FAL_OPERATIONS,
    FAL_OUTCOMES,
    STATUSES,
    WEBHOOK_OUTCOMES,
    Metrics,
)

PER_LAYER = (
    "trainguard_layer_passes_total",
    "trainguard_layer_errors_total",
    "trainguard_layer_restarts_total",
    "trainguard_results_recovered_total",
    "trainguard_fallbacks_applied_total",
    "trainguard_fallbacks_upgraded_total",
    "trainguard_layer_last_success_timestamp_seconds",
    "trainguard_layer_up",
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(metrics: Metrics) -> Samples:
    """Parse the exposition into {(sample name, labels): value}."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def test_builtin_layers() -> None:
    assert BUILTIN_LAYERS == (
        "webhook",
        "poller",
        "delayed",
        "startup",
        "completeness",
        "emergency",
    )


def test_every_known_series_is_zero_from_the_start() -> None:
    found = samples(Metrics())
    for name in PER_LAYER:
        for layer in BUILTIN_LAYERS:
            assert value(found, name, layer=layer) == 0
    for outcome in WEBHOOK_OUTCOMES:
        assert value(found, "trainguard_webhooks_received_total", outcome=outcome) == 0
    for operation in FAL_OPERATIONS:
        assert (
            value(found, "trainguard_fal_request_duration_seconds_count", operation=operation) == 0
        )
        for outcome in FAL_OUTCOMES:
            assert (
                value(found, "trainguard_fal_requests_total", operation=operation, outcome=outcome)
                == 0
            )
    for status in STATUSES:
        assert value(found, "trainguard_trainings", status=status) == 0
        assert value(found, "trainguard_transitions_total", to=status) == 0
    assert value(found, "trainguard_time_to_result_seconds_count") == 0
    assert value(found, "trainguard_time_to_result_seconds_bucket", le="21600.0") == 0
    assert value(found, "trainguard_db_commits_total") == 0
    assert value(found, "trainguard_db_commit_batch_size_count") == 0
    assert not any(name.endswith("_created") for name, _ in found)


def test_add_layer_and_unknown_layers() -> None:
    metrics = Metrics()
    metrics.add_layer("my_plugin")
    metrics.add_layer("my_plugin")
    metrics.layer_error("surprise")  # an unknown layer is added, not an error
    found = samples(metrics)
    for name in PER_LAYER:
        assert value(found, name, layer="my_plugin") == 0
        assert (name, frozenset({("layer", "surprise")})) in found
    assert value(found, "trainguard_layer_errors_total", layer="surprise") == 1
    assert metrics.layers == {*BUILTIN_LAYERS, "my_plugin", "surprise"}


def test_counters_and_gauges_move() -> None:
    metrics = Metrics()
    metrics.layer_pass("poller")
    metrics.layer_pass("poller")
    metrics.layer_error("webhook")
    metrics.layer_restart("delayed")
    metrics.result_recovered("startup")
    metrics.fallback_applied("emergency")
    metrics.fallback_upgraded("completeness")
    metrics.layer_success("poller", 1_700_000_000.5)
    metrics.set_layer_up("poller", True)
    metrics.webhook("duplicate")
    metrics.fal_request("status", "pending", 0.03)
    metrics.time_to_result(42.0)
    metrics.transition("COMPLETED")
    metrics.add_hook("on_result")
    metrics.hook_error("on_transition")
    metrics.db_commit(7)
    found = samples(metrics)
    assert value(found, "trainguard_layer_passes_total", layer="poller") == 2
    assert value(found, "trainguard_layer_errors_total", layer="webhook") == 1
    assert value(found, "trainguard_layer_restarts_total", layer="delayed") == 1
    assert value(found, "trainguard_results_recovered_total", layer="startup") == 1
    assert value(found, "trainguard_fallbacks_applied_total", layer="emergency") == 1
    assert value(found, "trainguard_fallbacks_upgraded_total", layer="completeness") == 1
    assert (
        value(found, "trainguard_layer_last_success_timestamp_seconds", layer="poller")
        == 1_700_000_000.5
    )
    assert value(found, "trainguard_layer_up", layer="poller") == 1
    assert value(found, "trainguard_webhooks_received_total", outcome="duplicate") == 1
    assert value(found, "trainguard_fal_requests_total", operation="status", outcome="pending") == 1
    assert value(found, "trainguard_fal_request_duration_seconds_sum", operation="status") == 0.03
    assert value(found, "trainguard_time_to_result_seconds_bucket", le="60.0") == 1
    assert value(found, "trainguard_time_to_result_seconds_bucket", le="30.0") == 0
    assert value(found, "trainguard_transitions_total", to="COMPLETED") == 1
    assert value(found, "trainguard_hook_errors_total", hook="on_result") == 0
    assert value(found, "trainguard_hook_errors_total", hook="on_transition") == 1
    assert value(found, "trainguard_db_commits_total") == 1
    assert value(found, "trainguard_db_commit_batch_size_sum") == 7


def test_set_trainings_resets_missing_statuses() -> None:
    metrics = Metrics()
    metrics.set_trainings({"IN_PROGRESS": 3, "COMPLETED": 10})
    metrics.set_trainings({"COMPLETED": 12})
    found = samples(metrics)
    assert value(found, "trainguard_trainings", status="COMPLETED") == 12
    assert value(found, "trainguard_trainings", status="IN_PROGRESS") == 0


def test_registries_are_private() -> None:
    first, second = Metrics(), Metrics(layers=("poller",))
    first.layer_pass("poller")
    found = samples(second)
    assert value(found, "trainguard_layer_passes_total", layer="poller") == 0
    assert ("trainguard_layer_up", frozenset({("layer", "webhook")})) not in found
    assert second.content_type.startswith("text/plain; version=0.0.4")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not on PATH")
def test_promtool_check_metrics() -> None:
    metrics = Metrics()
    metrics.add_layer("my_plugin")
    metrics.add_hook("on_result")
    metrics.fal_request("submit", "succeeded", 0.2)
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=metrics.render(),
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == b""
