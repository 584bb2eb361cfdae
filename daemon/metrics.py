"""The Prometheus metrics of trainguard, on a private registry per :class:`Metrics`.

Every known label combination is exported as 0 from the start, so that dashboards and
alerts (``increase(...)``, ``absent(...)``) work before the first event.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from trainguard.names import BUILTIN_LAYERS

__all__ = [
    "BUILTIN_LAYERS",
    "FAL_OPERATIONS",
    "FAL_OUTCOMES",
    "RECEIPT_EVICTIONS",
    "STATUSES",
    "WEBHOOK_OUTCOMES",
    "Metrics",
]

WEBHOOK_OUTCOMES = (
    "accepted",
    "duplicate",
    "unverified",
    "unknown_training",
    "bad_signature",
    "stale",
    "missing_header",
    "malformed",
    "too_large",
    "timeout",
    "wrong_method",
    "foreign_user",
    "unavailable",
    "unverified_full",
)
#: Why webhook receipts were dropped: a training nobody registered in time (or too many of
#: them), a refused request beyond the forensics bounds, or one not kept at all (a flood).
RECEIPT_EVICTIONS = ("unknown_training", "rejected", "rejected_not_kept")
FAL_OPERATIONS = ("submit", "status", "result", "cancel", "probe")
FAL_OUTCOMES = ("pending", "completed", "succeeded", "failed", "transient", "not_found")
STATUSES = ("SUBMITTED", "IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED")
#: The tables whose rows instances claim (``trainguard.store.ClaimKind``).
CLAIM_KINDS = ("trainings", "outbox", "artifacts")

_TIME_TO_RESULT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
_FAL_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)

_M = TypeVar("_M", Counter, Gauge)

# No `*_created` series: they double every counter and histogram for little use.
# (A process-wide switch of prometheus_client; trainguard has no other registry.)
disable_created_metrics()


class Metrics:
    """All trainguard metrics, registered on ``self.registry`` (not the global one)."""

    #: The classic text format (0.0.4) that :meth:`render` produces, read by every scraper.
    content_type = CONTENT_TYPE_PLAIN_0_0_4

    def __init__(self, layers: Iterable[str] = BUILTIN_LAYERS) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        self.layer_passes = counter(
            "trainguard_layer_passes_total", "Completed passes (sweeps) of a layer.", ("layer",)
        )
        self.layer_errors = counter(
            "trainguard_layer_errors_total", "Errors raised inside a layer.", ("layer",)
        )
        self.layer_restarts = counter(
            "trainguard_layer_restarts_total",
            "Times the supervisor restarted a layer after it crashed.",
            ("layer",),
        )
        self.results_recovered = counter(
            "trainguard_results_recovered_total",
            "Real training results obtained and stored, by the layer that obtained them.",
            ("layer",),
        )
        self.fallbacks_applied = counter(
            "trainguard_fallbacks_applied_total",
            "Fallback results stored because the real result could not be obtained.",
            ("layer",),
        )
        self.fallbacks_upgraded = counter(
            "trainguard_fallbacks_upgraded_total",
            "Fallback results later replaced by the real result.",
            ("layer",),
        )
        self.layer_last_success = gauge(
            "trainguard_layer_last_success_timestamp_seconds",
            "Unix time of the last successful pass of a layer (0: never).",
            ("layer",),
        )
        self.layer_up = gauge(
            "trainguard_layer_up", "1 while a layer is running, 0 otherwise.", ("layer",)
        )
        self.webhooks_received = counter(
            "trainguard_webhooks_received_total",
            "Webhook requests received, by outcome.",
            ("outcome",),
        )
        self.receipts_evicted = counter(
            "trainguard_webhook_receipts_evicted_total",
            "Webhook receipts dropped to keep the database bounded, by kind.",
            ("kind",),
        )
        self.fal_requests = counter(
            "trainguard_fal_requests_total",
            "Requests made to the FAL queue API, by operation and classified outcome.",
            ("operation", "outcome"),
        )
        self.fal_request_duration = Histogram(
            "trainguard_fal_request_duration_seconds",
            "Duration of requests to the FAL queue API.",
            ("operation",),
            buckets=_FAL_DURATION_BUCKETS,
            registry=r,
        )
        self.trainings = gauge(
            "trainguard_trainings", "Trainings in the database, by status.", ("status",)
        )
        self.time_to_result_seconds = Histogram(
            "trainguard_time_to_result_seconds",
            "Time from FAL reporting completion to the real result being stored.",
            buckets=_TIME_TO_RESULT_BUCKETS,
            registry=r,
        )
        self.transitions = counter(
            "trainguard_transitions_total", "Training status transitions, by new status.", ("to",)
        )
        self.hook_errors = counter(
            "trainguard_hook_errors_total", "Errors raised by plugin hook calls.", ("hook",)
        )
        self.db_commit_batch_size = Histogram(
            "trainguard_db_commit_batch_size",
            "Rows written per database commit.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.db_commits = counter("trainguard_db_commits_total", "Database commits.")
        # The built-in delivery and artifact plugins (exported at 0 even when they are off).
        self.delivery_delivered = counter(
            "trainguard_delivery_events_delivered_total", "Events the bot acknowledged (2xx)."
        )
        self.delivery_attempts_failed = counter(
            "trainguard_delivery_attempts_failed_total",
            "Delivery attempts that got no 2xx (retried until max_age_seconds).",
        )
        self.delivery_backlog = gauge(
            "trainguard_delivery_outbox_backlog", "Outbox events not yet delivered nor abandoned."
        )
        self.delivery_oldest_age = gauge(
            "trainguard_delivery_outbox_oldest_age_seconds",
            "Age of the oldest undelivered outbox event (0 when none).",
        )
        self.artifact_bytes = counter(
            "trainguard_artifact_bytes_downloaded_total", "Bytes of result files stored on disk."
        )
        self.artifact_failures = counter(
            "trainguard_artifact_downloads_failed_total", "Result file downloads that failed."
        )
        self.rescued = counter(
            "trainguard_rescued_total",
            "Claims taken over from an instance that died (or stalled): expired, or its "
            "process gone from this host; by table (trainings, outbox, artifacts).",
            ("kind",),
        )
        # Several instances on one database (issue 11).
        self.instances = gauge(
            "trainguard_instances", "Live trainguard instances on this database (heartbeats)."
        )
        self.leader = gauge(
            "trainguard_leader", "1 while this instance holds the leader role, else 0.", ("role",)
        )

        self._layers: set[str] = set()
        for layer in layers:
            self.add_layer(layer)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhooks_received.labels(outcome=outcome)
        for kind in RECEIPT_EVICTIONS:
            self.receipts_evicted.labels(kind=kind)
        for operation in FAL_OPERATIONS:
            self.fal_request_duration.labels(operation=operation)
            for outcome in FAL_OUTCOMES:
                self.fal_requests.labels(operation=operation, outcome=outcome)
        for status in STATUSES:
            self.trainings.labels(status=status)
            self.transitions.labels(to=status)
        for kind in CLAIM_KINDS:
            self.rescued.labels(kind=kind)

    @property
    def layers(self) -> frozenset[str]:
        """The layer label values exported so far."""
        return frozenset(self._layers)

    def add_layer(self, name: str) -> None:
        """Export every per-layer series for ``name`` at 0 (idempotent)."""
        if name in self._layers:
            return
        for metric in self._per_layer():
            metric.labels(layer=name)
        self._layers.add(name)

    def add_hook(self, name: str) -> None:
        """Export the error counter of plugin hook ``name`` at 0."""
        self.hook_errors.labels(hook=name)

    def layer_pass(self, layer: str) -> None:
        self._layer(self.layer_passes, layer).inc()

    def layer_error(self, layer: str) -> None:
        self._layer(self.layer_errors, layer).inc()

    def layer_restart(self, layer: str) -> None:
        self._layer(self.layer_restarts, layer).inc()

    def result_recovered(self, layer: str) -> None:
        self._layer(self.results_recovered, layer).inc()

    def fallback_applied(self, layer: str) -> None:
        self._layer(self.fallbacks_applied, layer).inc()

    def fallback_upgraded(self, layer: str) -> None:
        self._layer(self.fallbacks_upgraded, layer).inc()

    def layer_success(self, layer: str, ts: float) -> None:
        """Record a successful pass of ``layer`` at Unix time ``ts``."""
        self._layer(self.layer_last_success, layer).set(ts)

    def set_layer_up(self, layer: str, up: bool) -> None:
        """Mark ``layer`` as running (``True``) or stopped."""
        self._layer(self.layer_up, layer).set(1 if up else 0)

    def webhook(self, outcome: str) -> None:
        """Count one webhook request by outcome (one of ``WEBHOOK_OUTCOMES``)."""
        self.webhooks_received.labels(outcome=outcome).inc()

    def receipts_dropped(self, kind: str, count: int = 1) -> None:
        """Count ``count`` webhook receipts dropped (``kind``: one of ``RECEIPT_EVICTIONS``)."""
        if count:
            self.receipts_evicted.labels(kind=kind).inc(count)

    def fal_request(self, operation: str, outcome: str, seconds: float) -> None:
        """Count one FAL request and its duration (fits the FAL client's callback)."""
        self.fal_requests.labels(operation=operation, outcome=outcome).inc()
        self.fal_request_duration.labels(operation=operation).observe(seconds)

    def set_trainings(self, counts: Mapping[str, int]) -> None:
        """Set the trainings gauge from status counts; statuses not given are set to 0."""
        for status in dict.fromkeys((*STATUSES, *counts)):
            self.trainings.labels(status=status).set(counts.get(status, 0))

    def time_to_result(self, seconds: float) -> None:
        self.time_to_result_seconds.observe(seconds)

    def transition(self, to: str) -> None:
        self.transitions.labels(to=to).inc()

    def hook_error(self, hook: str) -> None:
        self.hook_errors.labels(hook=hook).inc()

    def rescued_claims(self, kind: str, count: int) -> None:
        self.rescued.labels(kind=kind).inc(count)

    def db_commit(self, batch_size: int) -> None:
        """Count one database commit of ``batch_size`` rows."""
        self.db_commits.inc()
        self.db_commit_batch_size.observe(batch_size)

    def set_instances(self, live: int) -> None:
        """The number of live instances this instance sees (itself included)."""
        self.instances.set(live)

    def set_leader(self, role: str, leads: bool) -> None:
        """Whether this instance holds leader ``role`` (the series exists from the start)."""
        self.leader.labels(role=role).set(1 if leads else 0)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def _per_layer(self) -> tuple[Counter | Gauge, ...]:
        return (
            self.layer_passes,
            self.layer_errors,
            self.layer_restarts,
            self.results_recovered,
            self.fallbacks_applied,
            self.fallbacks_upgraded,
            self.layer_last_success,
            self.layer_up,
        )

    def _layer(self, metric: _M, layer: str) -> _M:
        self.add_layer(layer)
        return metric.labels(layer=layer)
