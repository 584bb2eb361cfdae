"""Webhooks at any instance (issue 11): one webhook stored at one instance and its duplicate
arriving at another at the same moment are applied once, because the dedupe key is unique in
the database (not in memory). "Two instances" are two Stores on one database URL, each with
its own Reconciler, receiving the same webhook at once."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import daemon_settings, make_settings
from tests.test_layer_webhook import Harness, ok_body
from trainguard import inbox
from trainguard.observe import read_webhook
from trainguard.plugins.manager import build_manager
from trainguard.reconcile import Change, Reconciler
from trainguard.store import Connection, Event, Store, WebhookReceipt, open_store
from trainguard.supervisor import Daemon
from trainguard.testing.simulator import Simulator

ROUNDS = 20


def kept(conn: Connection, request_id: str) -> tuple[int, list[str]]:
    """(receipts of ``request_id``, the kinds of its events) as the database has them."""
    receipts = WebhookReceipt.select().where(WebhookReceipt.request_id == request_id).count()
    events = Event.select(Event.kind).where(Event.request_id == request_id).order_by(Event.id)
    return receipts, [e.kind for e in events]


async def receive(
    reconciler: Reconciler, body: bytes, results: list[tuple[int, bool, Change | None]]
) -> None:
    digest = hashlib.sha256(body).hexdigest()
    results.append(
        await reconciler.receive_webhook(
            body=body,
            body_sha256=digest,
            headers={"x-fal-webhook-request-id": "r"},
            verification="skipped",
            observation=read_webhook(body).observation,
            dedupe_key=f"key-{digest}",
        )
    )


async def test_one_webhook_at_two_instances_at_once_is_applied_once(database_url: str) -> None:
    settings = make_settings(database_url)
    async with open_store(database_url) as one, open_store(database_url) as two:
        first, second = Reconciler(one, settings), Reconciler(two, settings)
        for n in range(ROUNDS):
            rid = f"req-{n}"
            await first.register(name="ann", training_type="portrait", request_id=rid, layer="t")
            body = ok_body(rid)
            results: list[tuple[int, bool, Change | None]] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive, first, body, results)
                nursery.start_soon(receive, second, body, results)
            assert sorted(duplicate for _, duplicate, _ in results) == [False, True]
            assert results[0][0] == results[1][0]  # the duplicate names the kept receipt
            applied = [c for _, duplicate, c in results if not duplicate]
            assert applied[0] is not None and applied[0].to_status == "COMPLETED"
            receipts, kinds = await one.read(kept, rid)
            assert receipts == 1
            assert kinds == ["registered", "result"]


async def record(reconciler: Reconciler, key: str, results: list[tuple[int, bool]]) -> None:
    results.append(
        await reconciler.record_receipt(
            body=b"{}",
            headers={},
            verification="unverified",
            request_id="req-x",
            dedupe_key=key,
        )
    )


async def test_a_receipt_recorded_at_two_instances_at_once_is_kept_once(
    database_url: str,
) -> None:
    settings = make_settings(database_url)
    async with open_store(database_url) as one, open_store(database_url) as two:
        first, second = Reconciler(one, settings), Reconciler(two, settings)
        for n in range(ROUNDS):
            results: list[tuple[int, bool]] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(record, first, f"k-{n}", results)
                nursery.start_soon(record, second, f"k-{n}", results)
            assert sorted(duplicate for _, duplicate in results) == [False, True]
            assert results[0][0] == results[1][0]
        assert await one.read(_count_receipts) == ROUNDS


def _count_receipts(conn: Connection) -> int:
    return int(WebhookReceipt.select().count())


async def test_a_duplicate_found_at_the_insert_undoes_its_apply(
    store: Store, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The apply runs before the receipt's INSERT (the INSERT carries its outcome): when the
    INSERT finds the key taken (another instance committed it after this one looked), the
    apply is undone and the webhook answered as a duplicate."""
    reconciler = Reconciler(store, settings)
    await reconciler.register(name="ann", training_type="portrait", request_id="req-1", layer="t")
    body = ok_body("req-1")
    digest = hashlib.sha256(body).hexdigest()
    other = await reconciler.record_receipt(
        body=body,
        headers={},
        verification="unverified",
        request_id="req-1",
        dedupe_key=f"key-{digest}",
    )
    looked = []
    real = inbox.duplicate

    def not_yet(conn: Connection, dedupe_key: str) -> int | None:
        looked.append(dedupe_key)
        return None if len(looked) == 1 else real(conn, dedupe_key)

    monkeypatch.setattr(inbox, "duplicate", not_yet)
    results: list[tuple[int, bool, Change | None]] = []
    await receive(reconciler, body, results)
    assert results == [(other[0], True, None)]
    view = await store.training("req-1")
    assert view is not None and view.status == "SUBMITTED"
    assert await store.read(kept, "req-1") == (1, ["registered"])


async def test_one_webhook_posted_to_two_listeners_at_once_is_applied_once(
    database_url: str, nursery: trio.Nursery, tmp_path: Path, sim: Simulator
) -> None:
    """The same, end to end: two daemons (webhook layer only) on one database, FAL's webhook
    reaching both at once (a load balancer's retry): both answer 200, one "duplicate"."""
    async with httpx.AsyncClient(trust_env=False, timeout=10.0) as client:
        listeners = []
        for n in range(2):
            settings = daemon_settings(
                tmp_path / f"db{n}.sqlite", sim, only=("webhook",), url=database_url
            )
            daemon = Daemon(settings, pm=build_manager(entry_points=False))
            await nursery.start(daemon.run)
            listeners.append(Harness(daemon, sim, client, settings.webhook["public_url"]))
        one, two = listeners
        for _ in range(5):
            rid = await one.track()
            body = ok_body(rid)
            headers = one.sign(body, rid)
            replies: list[httpx.Response] = []

            async def post(h: Harness) -> None:
                replies.append(await h.post(body, headers))  # noqa: B023

            async with trio.open_nursery() as both:
                both.start_soon(post, one)
                both.start_soon(post, two)
            assert sorted((r.status_code, r.json()["detail"]) for r in replies) == [
                (200, "duplicate"),
                (200, "ok"),
            ]
            assert await two.kinds(rid) == ["registered", "result"]
            assert [r["outcome"] for r in await two.receipts(rid)] == ["result"]
