"""The webhook receipts inbox: every webhook kept as it arrived, bounded, until it is applied.

A receipt is the raw body and FAL's headers, with how far it got: ``verification``
(verified | unverified | skipped | rejected) and, once reconcile is done with it,
``processed_at`` and ``outcome``. What is kept is bounded: refused requests (a prefix of
``REFUSED_BODY_KEPT`` bytes, ``[webhook] rejected_kept`` / ``rejected_kept_bytes``), receipts
waiting for FAL's keys (``unverified_kept`` / ``unverified_kept_bytes``) and receipts of a
training nobody registered (``unknown_receipts_kept``, ``unknown_receipt_seconds``).

Every function here runs on the database thread inside its caller's transaction and gets
that store's ``Connection`` first (a ``store.write`` function, most often one of
reconcile's, or ``record``/``prune``/``stored_pending`` handed to the store directly), so a receipt and the transition
it causes are committed together. Nothing here reads or changes a training: what a receipt
means is reconcile's business.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import peewee

from trainguard import signing
from trainguard.errors import StoreError, UnverifiedFull
from trainguard.store import Connection, WebhookReceipt

#: Of a refused request only this much body is kept (with the whole body's size and sha256).
REFUSED_BODY_KEPT = 4096
#: A request id longer than this is cut when a receipt is kept (FAL's are UUIDs).
MAX_KEPT_ID_CHARS = 256
#: How many stored receipts one pass of the listener's retry loop looks at.
PENDING_BATCH = 500
_FAL_HEADERS = frozenset(
    h.lower()
    for h in (
        signing.HEADER_REQUEST_ID,
        signing.HEADER_USER_ID,
        signing.HEADER_TIMESTAMP,
        signing.HEADER_SIGNATURE,
    )
)
#: Receipts that reconcile may apply: verified, or received with verification switched off.
APPLICABLE = ("verified", "skipped")

Webhook = Mapping[str, Any]  # the ``[webhook]`` settings


def duplicate(conn: Connection, dedupe_key: str) -> int | None:
    """The id of the receipt already kept under ``dedupe_key``, if any."""
    return (
        WebhookReceipt.select(WebhookReceipt.id)
        .where(WebhookReceipt.dedupe_key == dedupe_key)
        .scalar()
    )


def taken(conn: Connection, dedupe_key: str) -> int:
    """The id of the receipt that took ``dedupe_key`` after ``insert`` found it taken. Gone
    again already (pruned in between): StoreError, the write fails and FAL retries."""
    existing = duplicate(conn, dedupe_key)
    if existing is None:
        raise StoreError("the receipt that took this webhook's dedupe key is gone; retry")
    return existing


def insert(
    conn: Connection,
    body: bytes,
    body_sha256: str,
    headers: Mapping[str, str],
    verification: str,
    request_id: str | None,
    dedupe_key: str | None,
    now: float,
    *,
    reject_reason: str | None = None,
    processed_at: float | None = None,
    outcome: str | None = None,
) -> int | None:
    """Keep one webhook; returns the receipt's id, or None when ``dedupe_key`` is taken
    (the caller looked first, but another instance may have kept the same webhook since:
    the key is unique in the database, and on PostgreSQL this INSERT waits for that other
    transaction and finds the key taken once it commits). A refused one keeps FAL's four
    headers and the first ``REFUSED_BODY_KEPT`` bytes only, and is processed at once.
    ``processed_at`` / ``outcome`` when it was applied already in this transaction (one
    INSERT instead of an INSERT and an UPDATE)."""
    refused = verification == "rejected"
    if refused:  # FAL's four headers only: any number of made-up others is no evidence
        headers = {k: v for k, v in headers.items() if k in _FAL_HEADERS}
    query = WebhookReceipt.insert(
        request_id=request_id[:MAX_KEPT_ID_CHARS] if request_id else request_id,
        dedupe_key=dedupe_key,
        body=body[:REFUSED_BODY_KEPT] if refused else body,  # forensics need no more
        body_size=len(body),
        body_sha256=body_sha256,
        headers_json=json.dumps(dict(headers), ensure_ascii=False),
        verification=verification,
        reject_reason=reject_reason,
        received_at=now,
        processed_at=now if refused else processed_at,
        outcome="rejected" if refused else outcome,
    )
    kept = query.on_conflict(action="NOTHING", conflict_target=[WebhookReceipt.dedupe_key])
    rows = kept.returning(WebhookReceipt.id).tuples().execute()
    return next((row[0] for row in rows), None)  # no row: the key was taken


def record(
    conn: Connection,
    body: bytes,
    headers: Mapping[str, str],
    verification: str,
    request_id: str | None,
    dedupe_key: str | None,
    reject_reason: str | None,
    now: float,
    webhook: Webhook,
    body_sha256: str | None = None,
) -> tuple[int, bool, int]:
    """Keep a webhook as it arrived unless it is a duplicate (kept before, or by another
    instance at the same moment). Returns (receipt id, was a duplicate, how many refused
    receipts this one pushed out of their bounds)."""
    if dedupe_key is not None:
        existing = duplicate(conn, dedupe_key)
        if existing is not None:
            return existing, True, 0
    receipt_id = insert(
        conn,
        body,
        body_sha256 or hashlib.sha256(body).hexdigest(),
        headers,
        verification,
        request_id,
        dedupe_key,
        now,
        reject_reason=reject_reason,
    )
    if receipt_id is None:  # kept by another instance since we looked
        assert dedupe_key is not None  # a receipt without a key is always kept
        return taken(conn, dedupe_key), True, 0
    return receipt_id, False, prune_rejected(conn, webhook) if verification == "rejected" else 0


def check_unverified_room(conn: Connection, webhook: Webhook, size: int) -> None:
    """Raise UnverifiedFull when keeping one more unverified body of ``size`` bytes would
    pass ``[webhook] unverified_kept`` or ``unverified_kept_bytes``: what came first is
    kept, what comes beyond is refused for now (503, FAL retries), so a forged flood while
    the key server is down cannot fill the disk. Call it once a duplicate is ruled out."""
    waiting = WebhookReceipt.select(
        peewee.fn.COUNT(WebhookReceipt.id),
        peewee.fn.COALESCE(peewee.fn.SUM(WebhookReceipt.body_size), 0),
    ).where(WebhookReceipt.verification == "unverified")
    count, total = waiting.tuples().get()
    if count + 1 > int(webhook["unverified_kept"]):
        raise UnverifiedFull(f"{count} webhooks wait for FAL's keys already")
    if total + size > int(webhook["unverified_kept_bytes"]):
        raise UnverifiedFull(f"{total} bytes of webhooks wait for FAL's keys already")


def prune_rejected(conn: Connection, webhook: Webhook) -> int:
    """Refused webhooks are kept for forensics: the newest ``rejected_kept`` of them, and of
    those only as many as fit in ``rejected_kept_bytes`` (each is at most REFUSED_BODY_KEPT
    bytes of body). Both walk the ``verification`` index. Returns how many were dropped."""
    rejected = WebhookReceipt.verification == "rejected"
    stale = (
        WebhookReceipt.select(WebhookReceipt.id)
        .where(rejected)
        .order_by(WebhookReceipt.id.desc())
        .offset(int(webhook["rejected_kept"]))
    )
    dropped = WebhookReceipt.delete().where(WebhookReceipt.id.in_(stale)).execute()
    cap = int(webhook["rejected_kept_bytes"])
    size = peewee.fn.COALESCE(WebhookReceipt.body_size, 0)
    kept = peewee.Case(None, [(size > REFUSED_BODY_KEPT, REFUSED_BODY_KEPT)], size)
    total = peewee.fn.SUM(kept).over(order_by=[WebhookReceipt.id.desc()])
    ranked = WebhookReceipt.select(WebhookReceipt.id, total.alias("total")).where(rejected)
    ranked = ranked.alias("r")
    over = peewee.Select([ranked], [peewee.SQL("r.id")]).where(peewee.SQL("r.total") > cap)
    return dropped + WebhookReceipt.delete().where(WebhookReceipt.id.in_(over)).execute()


def evict_unknown(conn: Connection, cutoff: float, keep: int) -> int:
    """Receipts for a training nobody registered: dropped once older than ``cutoff`` (the
    time a webhook can beat its submit's commit) and beyond the newest ``keep``. Walks the
    ``outcome`` index. Returns how many were dropped."""
    unknown = (WebhookReceipt.outcome == "unknown_training") & (
        WebhookReceipt.processed_at.is_null()
    )
    beyond = (
        WebhookReceipt.select(WebhookReceipt.id)
        .where(unknown)
        .order_by(WebhookReceipt.id.desc())
        .offset(keep)
    )
    expired = WebhookReceipt.delete().where(unknown, WebhookReceipt.received_at < cutoff)
    return expired.execute() + (
        WebhookReceipt.delete().where(WebhookReceipt.id.in_(beyond)).execute()
    )


def evict_unknown_beyond_count(conn: Connection, webhook: Webhook) -> int:
    """The count bound of unknown trainings' receipts, at once (one more was just kept)."""
    return evict_unknown(conn, -math.inf, int(webhook["unknown_receipts_kept"]))


def prune(conn: Connection, webhook: Webhook, now: float) -> dict[str, int]:
    """Drop unknown-training receipts past ``unknown_receipt_seconds`` or beyond
    ``unknown_receipts_kept``, and refused ones beyond their bounds. Returns what was
    dropped, by kind."""
    cutoff = now - float(webhook["unknown_receipt_seconds"])
    return {
        "unknown_training": evict_unknown(conn, cutoff, int(webhook["unknown_receipts_kept"])),
        "rejected": prune_rejected(conn, webhook),
    }


def get(conn: Connection, receipt_id: int) -> WebhookReceipt | None:
    return WebhookReceipt.get_or_none(WebhookReceipt.id == receipt_id)


def settle(
    conn: Connection, receipt: WebhookReceipt, outcome: str | None, processed_at: float | None
) -> None:
    """Write what became of a receipt (``processed_at`` None: it waits, for FAL's keys or
    for its training to be registered)."""
    WebhookReceipt.update(
        verification=receipt.verification, processed_at=processed_at, outcome=outcome
    ).where(WebhookReceipt.id == receipt.id).execute()


def settle_rejected(
    conn: Connection, receipt: WebhookReceipt, reason: str | None, now: float, webhook: Webhook
) -> None:
    """A stored receipt that failed its later verification: kept for forensics like any
    refused webhook (no dedupe key, within the refused bounds)."""
    WebhookReceipt.update(
        verification="rejected",
        processed_at=now,
        outcome="rejected",
        reject_reason=reason or receipt.reject_reason,
        dedupe_key=None,
    ).where(WebhookReceipt.id == receipt.id).execute()
    prune_rejected(conn, webhook)


def pending_for(conn: Connection, request_id: str) -> list[int]:
    """Applicable receipts of ``request_id`` not yet applied (webhooks that came before the
    training was registered), oldest first."""
    query = (
        WebhookReceipt.select(WebhookReceipt.id)
        .where(
            WebhookReceipt.request_id == request_id,
            WebhookReceipt.processed_at.is_null(),
            WebhookReceipt.verification.in_(APPLICABLE),
        )
        .order_by(WebhookReceipt.id)
    )
    return [r.id for r in query]


def stored_pending(
    conn: Connection, cutoff: float
) -> list[tuple[int, str, dict[str, str], bytes, float]]:
    """Receipts received by ``cutoff`` that wait for verification or were never applied (a
    crash between store and apply): (id, verification, headers, body, received_at)."""
    query = (
        WebhookReceipt.select()
        .where(
            WebhookReceipt.processed_at.is_null(),
            WebhookReceipt.outcome.is_null(),
            WebhookReceipt.received_at <= cutoff,
            WebhookReceipt.verification.in_(("unverified", *APPLICABLE)),
        )
        .order_by(WebhookReceipt.id)
        .limit(PENDING_BATCH)
    )
    return [
        (r.id, r.verification, json.loads(r.headers_json), bytes(r.body), r.received_at)
        for r in query
    ]
