"""[WEBHOOK] the embedded listener: the normal path, verified, stored first, answered fast.

In order: POST only -> body size limit, and the whole body within ``BODY_TIMEOUT_SECONDS``
-> the four ``X-Fal-Webhook-*`` headers (each once, of a sane length) -> timestamp within
the tolerance -> ED25519 signature against FAL's JWKS (the keys of every ``[fal] jwks_url``
host that answers, each cached at most ``jwks_cache_seconds``, refetched when no cached key
verifies, fetched with a total time limit) -> the body parsed (once: its observation goes
on to reconcile) -> the raw receipt stored durably and, in the same transaction, applied by
reconcile (group commit, synchronous=FULL) -> 200. Only once the answer is sent are the
change's metrics counted, its logs written and the plugin hooks called
(``trainguard_training_finished`` ...): a slow hook never holds up FAL's answer.

If no key host answers, the receipt is still stored, marked unverified, answered 202,
and verified and applied once the keys come back: an outage of FAL's key server loses no
webhook. What is kept unverified is bounded (``unverified_kept``, ``unverified_kept_bytes``:
the first ones are kept); beyond, a webhook gets 503 and FAL delivers it again later. While the keys are unreachable a fetch is tried at most every
``FETCH_RETRY_SECONDS``, and a webhook verified by the cached keys never waits for a fetch,
so neither a hanging key server nor a flood of forged webhooks slows the listener down.
A webhook for an unknown request_id is kept and applied when the training appears.
Anything malformed, unsigned, stale, badly signed, too large or too slow gets a 4xx with a
short reason, is counted, kept for forensics (its first 4 KiB and the whole body's sha256,
bounded in count and bytes, at most ``REFUSED_KEPT_IN_FLIGHT`` being written at a time so a
flood never crowds out genuine webhooks), and changes nothing. A locked, full or unreachable
database (PostgreSQL restarting) gets 503 (FAL retries) within ``WRITE_WAIT_SECONDS``; the listener keeps listening. A duplicate
gets 200 and no second transition.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from trainguard import http, inbox, logs, signing
from trainguard.config import LAYER_SCHEMA
from trainguard.errors import KeyServerDown, MalformedWebhook, Refusal, UnverifiedFull
from trainguard.layer import LayerContext
from trainguard.observe import read_webhook
from trainguard.plugins.hookspecs import hookimpl
from trainguard.reconcile import Change

TAG = logs.WEBHOOK
#: A refetch of the keys because none verified is tried at most this often.
REFETCH_MIN_SECONDS = 30.0
#: While no fresh key set is at hand, a failed fetch is retried at most this often; in
#: between, webhooks are stored unverified at once instead of waiting for the key server.
FETCH_RETRY_SECONDS = 5.0
#: Once one key host has answered, the others get this much longer before they are given up.
OTHER_HOSTS_GRACE_SECONDS = 2.0
#: How often stored receipts that are unverified or not yet applied are looked at again.
RETRY_SECONDS = 5.0
#: How often receipts past their bounds are dropped and the space given back.
PRUNE_SECONDS = 30.0
#: At most this many refused requests are being kept at a time; beyond, a refused request
#: is answered without a copy (counted): a flood of garbage never crowds out the writer.
REFUSED_KEPT_IN_FLIGHT = 8
#: The longest a request waits for its durable write before it is answered 503: a locked
#: database must not hold FAL's sender (10 s) nor the listener.
WRITE_WAIT_SECONDS = 5.0
#: The whole request body must arrive within this time (hypercorn only limits each read).
BODY_TIMEOUT_SECONDS = 10.0
#: FAL's header values are short (ids, a timestamp, a 128-character hex signature).
MAX_HEADER_CHARS = 256
_HEADER_PREFIX = "x-fal-webhook-"
#: The answer to a refused verification by its code; the others get 400.
_REFUSED_STATUS = {"bad_signature": 401, "foreign_user": 403}

Scope = Mapping[str, Any]


class JwksCache:
    """FAL's webhook verification keys from one or more hosts, each cached at most ``ttl``.

    Which of fal's hosts serves the keys is unsourced, so every URL is asked (at once, each
    within ``timeout``) and a webhook verifies against the keys of every host that answered.
    A host that fails or hangs blocks no other: once one has answered, the rest get
    ``OTHER_HOSTS_GRACE_SECONDS`` more. KeyServerDown only when no host's keys are fresh.
    """

    def __init__(self, urls: Sequence[str], *, ttl: float, timeout: float) -> None:
        self.urls = tuple(urls)
        self.ttl = ttl
        self.timeout = timeout
        self._errors: dict[str, str] = {}  # per URL, why its last fetch failed
        self._keys: dict[str, list[Ed25519PublicKey]] = {}
        self._fetched_at: dict[str, float] = {}  # per URL, when its last success ended
        self._tried_at = -float("inf")  # when the last fetch ended, successful or not
        self._lock = trio.Lock()

    def _fresh(self) -> list[Ed25519PublicKey]:
        """The keys of every host fetched within ``ttl``."""
        now = trio.current_time()
        return [
            key
            for url in self.urls
            if now - self._fetched_at.get(url, -float("inf")) < self.ttl
            for key in self._keys.get(url, ())
        ]

    async def keys(self, *, refresh: bool = False) -> list[Ed25519PublicKey]:
        """The cached keys; fetched first when none is fresh (tried at most every
        ``FETCH_RETRY_SECONDS``), or on ``refresh`` (at most every ``REFETCH_MIN_SECONDS``).

        Raises KeyServerDown when no fresh key set can be had now.
        """
        fresh = self._fresh()
        if fresh and not refresh:
            return fresh
        async with self._lock:
            since = trio.current_time() - self._tried_at
            due = since >= (REFETCH_MIN_SECONDS if self._fresh() else FETCH_RETRY_SECONDS)
            if due:
                try:
                    await self._fetch_all()
                finally:  # counted from its end: callers queued behind it do not retry
                    self._tried_at = trio.current_time()
            fresh = self._fresh()
            if not fresh:
                why = "; ".join(f"{url}: {error}" for url, error in self._errors.items())
                if not due:
                    why = f"the last fetch failed ({why}); not retried yet"
                raise KeyServerDown(f"cannot fetch FAL's JWKS from any host: {why}")
            return fresh

    async def _fetch_all(self) -> None:
        async with (
            httpx.AsyncClient(timeout=self.timeout) as client,
            trio.open_nursery() as nursery,
        ):
            for url in self.urls:
                nursery.start_soon(self._fetch, client, url, nursery.cancel_scope)

    async def _fetch(self, client: httpx.AsyncClient, url: str, others: trio.CancelScope) -> None:
        self._errors[url] = "no answer in time"  # kept if cut off by its time limit
        try:
            with trio.fail_after(self.timeout):  # httpx's timeout is per read, not in total
                reply = await client.get(url)
            reply.raise_for_status()
            keys = signing.parse_jwks(reply.json())
        except Exception as exc:  # boundary: one key host's failure never blocks the others
            self._errors[url] = f"{type(exc).__name__}: {exc}"
            return
        self._keys[url] = keys
        self._fetched_at[url] = trio.current_time()
        del self._errors[url]
        others.deadline = min(others.deadline, trio.current_time() + OTHER_HOSTS_GRACE_SECONDS)


class WebhookLayer:
    name = "webhook"
    order = 10
    #: ``[layers.webhook]`` takes only ``enabled``: the listener is configured in ``[webhook]``.
    options = LAYER_SCHEMA["webhook"]

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
            self.address = await nursery.start(
                partial(
                    http.serve_asgi,
                    handler,
                    settings["listen"],
                    max_connections=settings["max_connections"],
                )
            )
            nursery.start_soon(handler.keep_retrying)
            nursery.start_soon(handler.prune_stored)
            ctx.log.info(f"{TAG} listening", address=self.address, path=path)
            if settings["verify_signatures"] and not settings["allowed_user_ids"]:
                ctx.log.warning(
                    f"{TAG} {logs.WARN} [webhook] allowed_user_ids is empty: signed webhooks"
                    " of ANY fal account are accepted; set your fal user id(s)"
                )
            task_status.started()


class _Handler:
    """The ASGI app of the listener."""

    def __init__(self, ctx: LayerContext, path: str, jwks: JwksCache) -> None:
        self.ctx = ctx
        self.path = path
        self.jwks = jwks
        self.wake = trio.Event()
        self._keeping = 0  # refused requests being written now

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
        headers, problem = _webhook_headers(scope["headers"])
        try:
            body = await self._receive(scope, receive)
        except Refusal as refusal:
            await self._keep_rejected(b"", headers, refusal.outcome, refusal.reason)
            self.ctx.metrics.webhook(refusal.outcome)
            allow = ((b"allow", b"POST"),) if refusal.status == 405 else ()
            await self._answer(send, refusal.status, refusal.reason, allow)
            return
        if body is None:  # the sender went away mid-body; it will deliver again
            return
        status, outcome, reason, change = await self._accept(headers, problem, body)
        self.ctx.metrics.webhook(outcome)
        try:
            await self._answer(send, status, reason)
        finally:  # once FAL has its answer: metrics, logs and plugin hooks take their time
            if change is not None:
                await self.ctx.reconciler.announce([change])

    async def _receive(self, scope: Scope, receive: Any) -> bytes | None:
        """The whole body (None if the client disconnected); raises Refusal."""
        if scope["method"] != "POST":
            raise Refusal(405, "wrong_method", "use POST")
        limit = int(self.settings["max_body_bytes"])
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            raise Refusal(413, "too_large", f"body larger than {limit} bytes")
        with trio.move_on_after(BODY_TIMEOUT_SECONDS):
            try:
                return await http.read_body(receive, limit)
            except http.BodyTooLarge as exc:
                raise Refusal(413, "too_large", str(exc)) from None
        raise Refusal(408, "timeout", f"body not received within {BODY_TIMEOUT_SECONDS:g} s")

    async def _answer(
        self, send: Any, status: int, reason: str, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        body = json.dumps({"detail": reason}).encode() + b"\n"
        await http.respond(send, status, body, content_type="application/json", headers=headers)

    async def _keep_rejected(
        self,
        body: bytes,
        headers: Mapping[str, str],
        code: str,
        reason: str,
        body_sha256: str | None = None,
    ) -> None:
        """Keep a refused request for forensics (bounded by ``rejected_kept``)."""
        request_id = headers.get(signing.HEADER_REQUEST_ID.lower())
        self.ctx.log.warning(
            f"{TAG} webhook refused", outcome=code, reason=reason, request_id=request_id
        )
        if self._keeping >= REFUSED_KEPT_IN_FLIGHT:  # a flood: the genuine path comes first
            self.ctx.metrics.receipts_dropped("rejected_not_kept")
            return
        self._keeping += 1
        try:  # best effort: a refusal stands even when the database cannot keep its copy
            with trio.fail_after(WRITE_WAIT_SECONDS):
                await self.ctx.reconciler.record_receipt(
                    body=body,
                    headers=headers,
                    verification="rejected",
                    request_id=request_id,
                    dedupe_key=None,
                    reject_reason=f"{code}: {reason}",
                    body_sha256=body_sha256,
                )
        except Exception as exc:  # boundary: keeping a refused copy is best effort
            self.ctx.log.warning(f"{TAG} refused webhook not kept", error=_storage_error(exc))
        finally:
            self._keeping -= 1

    async def _accept(
        self, headers: dict[str, str], problem: str | None, body: bytes
    ) -> tuple[int, str, str, Change | None]:
        """Check, store and apply one webhook: (status, outcome, reason, the change to
        announce once FAL has its answer)."""
        ctx = self.ctx
        verify = bool(self.settings["verify_signatures"])
        tolerance = float(self.settings["timestamp_tolerance_seconds"])
        verification = "skipped"
        digest = hashlib.sha256(body).hexdigest()  # the one hash of the body
        try:
            if problem is not None:
                raise MalformedWebhook(problem)
            envelope: signing.Envelope | None = None
            if verify:
                envelope = signing.check_envelope(headers, ctx.clock.now(), tolerance)
                try:
                    keys = await self.jwks.keys()
                except KeyServerDown as exc:
                    ctx.log.warning(
                        f"{TAG} {logs.WARN} keys unavailable; storing unverified", error=str(exc)
                    )
                    verification = "unverified"
                else:
                    try:
                        signing.verify_signature(envelope, digest, keys)
                    except signing.WebhookRejected as rejected:
                        # Maybe FAL rotated its keys: refetch (rate-limited), then decide.
                        try:
                            keys = await self.jwks.keys(refresh=True)
                        except KeyServerDown:
                            raise rejected from None
                        signing.verify_signature(envelope, digest, keys)
                    verification = "verified"
                    signing.check_user_id(envelope.user_id, self.settings["allowed_user_ids"])
            parsed = read_webhook(body)  # the whole shape must be FAL's, or it is refused now
            # Which id FAL puts in the header after it retried a request is unsourced; the
            # signature covers the header, so either of the body's two ids is genuine.
            if envelope is not None and envelope.request_id not in (
                parsed.request_id,
                parsed.gateway_request_id,
            ):
                raise MalformedWebhook(
                    "the request id header matches neither request_id nor gateway_request_id"
                    " of the body"
                )
        except signing.WebhookRejected as exc:
            await self._keep_rejected(body, headers, exc.code, exc.reason, digest)
            return _REFUSED_STATUS.get(exc.code, 400), exc.code, exc.reason, None
        except MalformedWebhook as exc:
            await self._keep_rejected(body, headers, "malformed", str(exc), digest)
            return 400, "malformed", str(exc), None

        request_id = parsed.request_id
        # Derived from the body's digest, not from the body again. Receipts stored before
        # this key (sha256 of signature + "\n" + body) keep their old keys: a FAL retry
        # that spans the upgrade is stored once more, and reconcile, being idempotent,
        # applies no transition twice (the receipt's outcome is "none").
        signature = headers.get(signing.HEADER_SIGNATURE.lower(), "")
        dedupe = hashlib.sha256(f"{signature}\n{digest}".encode()).hexdigest()
        try:
            # Not answered before it is durable; a write that outlasts the wait may still
            # commit, and FAL's retry of it is then a duplicate (200).
            with trio.fail_after(WRITE_WAIT_SECONDS):
                _, duplicate, change = await ctx.reconciler.receive_webhook(
                    body=body,
                    body_sha256=digest,
                    headers=headers,
                    verification=verification,
                    observation=parsed.observation,
                    dedupe_key=dedupe,
                )
        except UnverifiedFull as exc:  # FAL's retries come back once the keys do
            ctx.log.warning(f"{TAG} {logs.WARN} unverified webhook not kept", error=str(exc))
            return 503, "unverified_full", "FAL's keys unreachable; retry later", None
        except Exception as exc:  # a locked or full database: transient, FAL retries a 503
            ctx.log.warning(
                f"{TAG} {logs.WARN} webhook not stored; answered 503",
                request_id=request_id,
                error=_storage_error(exc),
            )
            return 503, "unavailable", "storage unavailable; retry later", None
        ctx.heartbeat()
        if duplicate:
            ctx.log.info(f"{TAG} duplicate webhook", request_id=request_id)
            return 200, "duplicate", "duplicate", None
        if verification == "unverified":
            self.wake.set()
            return 202, "unverified", "stored; will verify when FAL's keys are reachable", None
        if change is None:  # stored; applying failed and is retried by retry_stored
            self.wake.set()
            return 200, "accepted", "stored", None
        if change.kind == "unknown":
            ctx.metrics.receipts_dropped("unknown_training", change.detail.get("evicted", 0))
            ctx.log.info(f"{TAG} webhook for an unknown training kept", request_id=request_id)
            return 200, "unknown_training", "stored; training not known yet", None
        ctx.log.info(f"{TAG} webhook applied", request_id=request_id, change=change.kind)
        ctx.passed()
        return 200, "accepted", "ok", change

    async def prune_stored(self) -> None:
        """Every ``PRUNE_SECONDS``: drop receipts past their bounds (unknown trainings past
        ``unknown_receipt_seconds``, refused ones beyond their caps), counted, and give the
        space back. A database error is transient: tried again next time."""
        while True:
            await trio.sleep(PRUNE_SECONDS)
            try:
                dropped = await self.ctx.reconciler.prune_receipts()
            except Exception as exc:  # boundary: the prune loop outlives a database error
                self.ctx.log.warning(f"{TAG} receipts not pruned now", error=_storage_error(exc))
                continue
            for kind, count in dropped.items():
                self.ctx.metrics.receipts_dropped(kind, count)
            if any(dropped.values()):
                self.ctx.log.info(f"{TAG} stored receipts pruned", **dropped)

    async def keep_retrying(self) -> None:
        """``retry_stored``, started again after a database error (a locked or full
        database is transient: it must not take the listener down)."""
        while True:
            try:
                await self.retry_stored()
            except Exception as exc:  # boundary: the retry loop outlives a database error
                self.ctx.log.warning(
                    f"{TAG} stored webhooks not retried now", error=_storage_error(exc)
                )
                await trio.sleep(RETRY_SECONDS)

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
            pending = await ctx.store.read(inbox.stored_pending, cutoff)
            if not pending:
                continue
            keys: list[Ed25519PublicKey] | None = None
            with contextlib.suppress(KeyServerDown):
                keys = await self.jwks.keys()
            for receipt_id, verification, headers, body, received_at in pending:
                reason: str | None = None
                if verification == "unverified":
                    if keys is None:
                        continue
                    tolerance = float(self.settings["timestamp_tolerance_seconds"])
                    try:  # judged as of its arrival, when its timestamp was checked
                        signing.verify_webhook(headers, body, keys, received_at, tolerance)
                        signing.check_user(headers, self.settings["allowed_user_ids"])
                        verification = "verified"
                    except signing.WebhookRejected as exc:
                        verification = "rejected"
                        reason = f"{exc.code}: {exc.reason}"
                        ctx.log.warning(
                            f"{TAG} stored webhook failed verification", reason=exc.reason
                        )
                try:  # one receipt that cannot be applied must not hold back the rest
                    change = await ctx.reconciler.apply_receipt(
                        receipt_id, verification=verification, reject_reason=reason
                    )
                except Exception as exc:  # boundary: one receipt never holds back the rest
                    ctx.log.error(
                        f"{TAG} {logs.WARN} stored webhook not applied; will retry",
                        receipt_id=receipt_id,
                        error=_storage_error(exc),
                    )
                    ctx.heartbeat()
                    if ctx.store.stalled():  # the database itself: try the rest next pass
                        break
                    continue
                ctx.log.info(
                    f"{TAG} stored webhook applied", verification=verification, change=change.kind
                )
                ctx.heartbeat()


def _storage_error(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return f"not stored within {WRITE_WAIT_SECONDS:g} s"
    return f"{type(exc).__name__}: {exc}"[:500]


def _webhook_headers(raw: Iterable[tuple[bytes, bytes]]) -> tuple[dict[str, str], str | None]:
    """The ``X-Fal-Webhook-*`` headers by lower-case name (values cut to
    ``MAX_HEADER_CHARS``), and what is wrong with them: a header given twice (which copy
    would count?) or a value too long to be FAL's."""
    found: dict[str, str] = {}
    problem: str | None = None
    for key, value in raw:
        name = key.decode("latin-1").lower()
        if not name.startswith(_HEADER_PREFIX):
            continue
        text = value.decode("latin-1")
        if name in found:
            problem = problem or f"header {name} given more than once"
        elif len(text) > MAX_HEADER_CHARS:
            problem = problem or f"header {name} longer than {MAX_HEADER_CHARS} characters"
        found.setdefault(name, text[:MAX_HEADER_CHARS])
    return found, problem


@hookimpl
def trainguard_layers() -> list[WebhookLayer]:
    return [WebhookLayer()]
