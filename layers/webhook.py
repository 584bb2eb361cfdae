"""[WEBHOOK] the embedded listener: the normal path, verified, stored first, answered fast.

In order: body size limit -> the four ``X-Fal-Webhook-*`` headers -> timestamp within the
tolerance -> ED25519 signature against FAL's JWKS (cached at most ``jwks_cache_seconds``,
refetched when no cached key verifies, fetched with a timeout) -> the raw receipt stored
durably (group commit, synchronous=FULL) -> 200. Then reconcile applies it.

If the JWKS cannot be fetched, the receipt is still stored, marked unverified, answered 202,
and verified and applied once the keys come back: an outage of FAL's key server loses no
webhook. A webhook for an unknown request_id is kept and applied when the training appears.
Anything malformed, unsigned, stale or badly signed gets a 4xx with a short reason, is
counted, kept (bounded) for forensics, and changes nothing. A duplicate gets 200 and no
second transition.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from daemon import http, logs, signing
from daemon.layer import LayerContext
from daemon.reconcile import MalformedWebhook, parse_webhook
from daemon.store import WebhookReceipt
from plugins.hookspecs import hookimpl

TAG = logs.WEBHOOK
#: A refetch of the keys because none verified is done at most this often.
REFETCH_MIN_SECONDS = 30.0
#: How often stored receipts that are unverified or not yet applied are looked at again.
RETRY_SECONDS = 5.0

Scope = Mapping[str, Any]


class KeyServerDown(RuntimeError):
    """FAL's JWKS could not be fetched, and no fresh enough copy is cached."""


class JwksCache:
    """FAL's webhook verification keys, cached at most ``ttl`` seconds."""

    def __init__(self, url: str, *, ttl: float, timeout: float) -> None:
        self.url = url
        self.ttl = ttl
        self.timeout = timeout
        self._keys: list[Ed25519PublicKey] = []
        self._fetched_at = -float("inf")
        self._lock = trio.Lock()

    async def keys(self, *, refresh: bool = False) -> list[Ed25519PublicKey]:
        """The cached keys, fetched first when stale (or on ``refresh``, at most every 30 s)."""
        async with self._lock:
            age = trio.current_time() - self._fetched_at
            if age >= self.ttl or (refresh and age >= REFETCH_MIN_SECONDS) or not self._keys:
                try:
                    await self._fetch()
                except Exception as exc:
                    if age >= self.ttl or not self._keys:
                        raise KeyServerDown(f"cannot fetch FAL's JWKS: {exc}") from exc
            return list(self._keys)

    async def _fetch(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            reply = await client.get(self.url)
        reply.raise_for_status()
        keys = signing.parse_jwks(reply.json())
        if not keys:
            raise ValueError("the JWKS holds no Ed25519 key")
        self._keys = keys
        self._fetched_at = trio.current_time()


class WebhookLayer:
    name = "webhook"
    order = 10

    def __init__(self) -> None:
        self.address: tuple[str, int] | None = None

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        settings = ctx.settings.webhook
        path = urlsplit(settings["public_url"]).path or "/"
        jwks = JwksCache(
            ctx.settings.fal["jwks_url"],
            ttl=float(settings["jwks_cache_seconds"]),
            timeout=float(ctx.settings.fal["timeout_seconds"]),
        )
        handler = _Handler(ctx, path, jwks)
        async with trio.open_nursery() as nursery:
            self.address = await nursery.start(http.serve_asgi, handler, settings["listen"])
            nursery.start_soon(handler.retry_stored)
            ctx.log.info(f"{TAG} listening", address=self.address, path=path)
            task_status.started()


class _Handler:
    """The ASGI app of the listener."""

    def __init__(self, ctx: LayerContext, path: str, jwks: JwksCache) -> None:
        self.ctx = ctx
        self.path = path
        self.jwks = jwks
        self.wake = trio.Event()

    @property
    def settings(self) -> Mapping[str, Any]:
        return self.ctx.settings.webhook

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await http.lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] != self.path:
            await self._answer(send, 404, "not found")
            return
        if scope["method"] != "POST":
            await self._reject(send, 405, "wrong_method", "use POST")
            return
        body = await _read_body(receive, int(self.settings["max_body_bytes"]))
        if body is None:
            await self._reject(send, 413, "too_large", "body too large")
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        status, outcome, reason = await self._accept(headers, body)
        self.ctx.metrics.webhook(outcome)
        await self._answer(send, status, reason)

    async def _answer(self, send: Any, status: int, reason: str) -> None:
        body = json.dumps({"detail": reason}).encode() + b"\n"
        await http.respond(send, status, body, content_type="application/json")

    async def _reject(self, send: Any, status: int, outcome: str, reason: str) -> None:
        self.ctx.metrics.webhook(outcome)
        await self._answer(send, status, reason)

    async def _accept(self, headers: dict[str, str], body: bytes) -> tuple[int, str, str]:
        ctx = self.ctx
        verify = bool(self.settings["verify_signatures"])
        tolerance = float(self.settings["timestamp_tolerance_seconds"])
        forensic = {k: v for k, v in headers.items() if k.lower().startswith("x-fal-webhook-")}
        request_id: str | None = None
        verification = "skipped"
        try:
            if verify:
                signing.check_envelope(headers, ctx.clock.now(), tolerance)
                request_id = _header(headers, signing.HEADER_REQUEST_ID)
                try:
                    keys = await self.jwks.keys()
                except KeyServerDown as exc:
                    ctx.log.warning(
                        f"{TAG} {logs.WARN} keys unavailable; storing unverified", error=str(exc)
                    )
                    verification = "unverified"
                else:
                    try:
                        signing.verify_webhook(headers, body, keys, ctx.clock.now(), tolerance)
                    except signing.WebhookRejected as rejected:
                        # Maybe FAL rotated its keys: refetch (rate-limited), then decide.
                        try:
                            keys = await self.jwks.keys(refresh=True)
                        except KeyServerDown:
                            raise rejected from None
                        signing.verify_webhook(headers, body, keys, ctx.clock.now(), tolerance)
                    verification = "verified"
            body_id = _body_request_id(body)
            if request_id is not None and body_id != request_id:
                raise MalformedWebhook("request_id in the body does not match the header")
            request_id = body_id
        except (signing.WebhookRejected, MalformedWebhook) as exc:
            code = getattr(exc, "code", "malformed")
            reason = getattr(exc, "reason", str(exc))
            await ctx.reconciler.record_receipt(
                body=body,
                headers=forensic,
                verification="rejected",
                request_id=request_id,
                dedupe_key=None,
                reject_reason=f"{code}: {reason}",
            )
            ctx.log.warning(
                f"{TAG} webhook refused", outcome=code, reason=reason, request_id=request_id
            )
            return (401 if code == "bad_signature" else 400), code, reason

        signature = _header(headers, signing.HEADER_SIGNATURE) or ""
        dedupe = hashlib.sha256(signature.encode() + b"\n" + body).hexdigest()
        receipt_id, duplicate = await ctx.reconciler.record_receipt(
            body=body,
            headers=forensic,
            verification=verification,
            request_id=request_id,
            dedupe_key=dedupe,
        )
        ctx.heartbeat()
        if duplicate:
            ctx.log.info(f"{TAG} duplicate webhook", request_id=request_id)
            return 200, "duplicate", "duplicate"
        if verification == "unverified":
            self.wake.set()
            return 202, "unverified", "stored; will verify when FAL's keys are reachable"
        change = await ctx.reconciler.apply_receipt(receipt_id)
        if change.kind == "unknown":
            ctx.log.info(f"{TAG} webhook for an unknown training kept", request_id=request_id)
            return 200, "unknown_training", "stored; training not known yet"
        ctx.log.info(f"{TAG} webhook applied", request_id=request_id, change=change.kind)
        ctx.passed()
        return 200, "accepted", "ok"

    async def retry_stored(self) -> None:
        """Verify receipts stored while the keys were unreachable, and apply any verified
        receipt not yet applied (a crash between store and apply)."""
        ctx = self.ctx
        while True:
            ctx.heartbeat()
            with trio.move_on_after(RETRY_SECONDS):
                await self.wake.wait()
            self.wake = trio.Event()
            cutoff = ctx.clock.now() - RETRY_SECONDS
            pending = await ctx.store.read(_stored_pending, cutoff)
            if not pending:
                continue
            keys: list[Ed25519PublicKey] | None = None
            with contextlib.suppress(KeyServerDown):
                keys = await self.jwks.keys()
            for receipt_id, verification, headers, body, received_at in pending:
                if verification == "unverified":
                    if keys is None:
                        continue
                    tolerance = float(self.settings["timestamp_tolerance_seconds"])
                    try:  # judged as of its arrival, when its timestamp was checked
                        signing.verify_webhook(headers, body, keys, received_at, tolerance)
                        verification = "verified"
                    except signing.WebhookRejected as exc:
                        verification = "rejected"
                        ctx.log.warning(
                            f"{TAG} stored webhook failed verification", reason=exc.reason
                        )
                change = await ctx.reconciler.apply_receipt(receipt_id, verification=verification)
                ctx.log.info(
                    f"{TAG} stored webhook applied", verification=verification, change=change.kind
                )
                ctx.heartbeat()


def _stored_pending(cutoff: float) -> list[tuple[int, str, dict[str, str], bytes, float]]:
    query = (
        WebhookReceipt.select()
        .where(
            WebhookReceipt.processed_at.is_null(),
            WebhookReceipt.outcome.is_null(),
            WebhookReceipt.received_at <= cutoff,
            WebhookReceipt.verification.in_(("unverified", "verified", "skipped")),
        )
        .order_by(WebhookReceipt.id)
        .limit(500)
    )
    return [
        (r.id, r.verification, json.loads(r.headers_json), bytes(r.body), r.received_at)
        for r in query
    ]


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted), None)


def _body_request_id(body: bytes) -> str:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise MalformedWebhook("body is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("request_id"), str):
        raise MalformedWebhook("body has no request_id")
    parse_webhook(body)  # the whole shape must be FAL's, or it is refused now
    return data["request_id"]


async def _read_body(receive: Any, limit: int) -> bytes | None:
    """The request body, or None once it grows past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


@hookimpl
def trainguard_layers() -> list[WebhookLayer]:
    return [WebhookLayer()]
