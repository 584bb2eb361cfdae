"""Delivery to the bot: every finished training as a signed webhook, at least once, in order.

A built-in plugin that uses nothing but the public hooks, the way a team would write its own:

* ``trainguard_outbox`` adds one entry for consumer ``delivery`` to every finishing transition
  (real result, fallback, failure, cancel, upgrade). Reconcile writes it in the transition's
  own transaction, so the event exists exactly when the transition does, even if the daemon
  is killed right after the commit.
* ``trainguard_training_finished`` (after the commit) wakes the sender, so the bot hears of a
  transition at once; a short idle poll catches entries written by another process.
* ``trainguard_layers`` offers the sender layer ``delivery`` when ``[delivery] enabled``. Each
  pass it POSTs the oldest pending entry of every training to ``[delivery] url``, signed per
  Standard Webhooks (``webhook-id`` is the entry's stable ``message_id``, the same on every
  retry). A training's next event is sent only once the previous one is delivered or
  abandoned; trainings do not wait for each other: at most ``SEND_CONCURRENCY`` POSTs are in
  flight, each started as soon as a slot is free, whatever the others are doing. With
  several instances, each head is claimed by one sender before it is POSTed (one sender per
  entry; a training's next entry only once no instance holds one of its entries, so the
  order holds across instances). Every POST
  has one time limit for all of it (``timeout_seconds``: connect, send, and the answer however
  slowly it trickles), and at most ``MAX_ANSWER_BYTES`` of an answer are read: a slow or
  huge answer from the bot costs one slot for ``timeout_seconds`` and a few KB, no more.
  A non-2xx answer or no answer is retried
  with exponential backoff and jitter until the entry is ``max_age_seconds`` old, then
  abandoned with a ⚠️ error. A 410 Gone stops delivery to that URL for good: pending entries
  are abandoned with the reason ``410 Gone from URL`` (which also keeps it stopped across
  restarts) until the configured URL changes.

The hooks share the sender through the plugin's context: ``trainguard_layers``, which the
daemon calls once, at construction, before any transition, keeps it in ``context.stash``
(one per plugin manager, so two daemons in one process never share it); the other hooks
find it there. ``trainguard_outbox`` finds its context with ``current_context()`` rather
than an argument, so that it can also be called directly: without a daemon's context (or
before the layers are collected) it writes no delivery entries.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import random
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import trio

from trainguard.api import Option, PluginContext, StashKey, current_context
from trainguard.config import ConfigError, Settings
from trainguard.layer import LayerContext
from trainguard.logs import WARN
from trainguard.plugins.hookspecs import hookimpl
from trainguard.reconcile import view_as_dict
from trainguard.store import OutboxMessage, TrainingView

CONSUMER = "delivery"
SECRET_ENV = "TRAINGUARD_DELIVERY_SECRET"
SECRET_PREFIX = "whsec_"
#: Fields of ``view_as_dict`` that schedule trainguard's own checks: not the bot's business.
INTERNAL_FIELDS = frozenset(
    {"attempts", "last_error", "last_checked_at", "next_check_at", "deadline_at"}
)
RETRY_FIRST_SECONDS = 2.0
RETRY_MAX_SECONDS = 600.0
SEND_CONCURRENCY = 4
MAX_ANSWER_BYTES = 4096  # of the bot's answer (only its status matters)


# -- what the hooks share ----------------------------------------------------------------
#: The sender layer, in the plugin's stash while ``[delivery] enabled`` (else absent).
SENDER: StashKey[DeliveryLayer] = StashKey()


@hookimpl
def trainguard_layers(settings: Settings, context: PluginContext) -> list[DeliveryLayer]:
    if not settings.delivery["enabled"]:
        return []
    sender = context.stash[SENDER] = DeliveryLayer(settings.delivery)
    return [sender]


@hookimpl
def trainguard_outbox(training: TrainingView, event: str) -> list[dict[str, Any]] | None:
    context = current_context()
    if context is None or SENDER not in context.stash:
        return None
    return [{"consumer": CONSUMER, "payload": payload(training, event)}]


@hookimpl
def trainguard_training_finished(context: PluginContext) -> None:
    sender = context.stash.get(SENDER, None)
    if sender is not None:
        sender.wake()


# -- the message -------------------------------------------------------------------------
def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def payload(training: TrainingView, event: str) -> dict[str, Any]:
    """The Standard Webhooks body: ``type``, ``timestamp`` (of the transition), ``data``."""
    data = {k: v for k, v in view_as_dict(training).items() if k not in INTERNAL_FIELDS}
    return {"type": event, "timestamp": _iso(training.updated_at), "data": data}


def load_secret(env: Mapping[str, str] = os.environ) -> bytes:
    """The signing key from ``whsec_<base64>`` in the environment; its value is never shown."""
    raw = env.get(SECRET_ENV, "")
    if not raw:
        raise ConfigError(f"{SECRET_ENV}: must be set (whsec_<base64>) when delivery is enabled")
    if not raw.startswith(SECRET_PREFIX):
        raise ConfigError(f"{SECRET_ENV}: must be whsec_ followed by base64")
    encoded = raw.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{SECRET_ENV}: the part after whsec_ is not base64") from None
    if not key:
        raise ConfigError(f"{SECRET_ENV}: the key after whsec_ is empty")
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: str) -> str:
    """The ``webhook-signature`` header: ``v1,`` + base64(HMAC-SHA256(id.timestamp.body))."""
    mac = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


# -- the sender layer --------------------------------------------------------------------
class DeliveryLayer:
    """POSTs the ``delivery`` outbox to the bot (see the module doc)."""

    name = "delivery"
    order = 80
    #: ``[layers.delivery]`` takes only ``enabled``: delivery is configured in ``[delivery]``.
    options: Mapping[str, Option] = {}

    def __init__(self, delivery: Mapping[str, Any]) -> None:
        self.url = str(delivery["url"])
        self.max_age = float(delivery["max_age_seconds"])
        self.timeout = float(delivery["timeout_seconds"])
        self.gone_reason = f"410 Gone from {self.url}"
        self._wake = trio.Event()
        self._said_gone = False
        self._gone = False
        self._in_flight: set[str] = set()  # request ids with a head queued or being sent
        self._settled: set[int] = set()  # outbox ids whose outcome was stored this pass
        self._gone_owners: list[str] = []  # claims of these dead processes are taken at once

    def heartbeat_timeout(self, options: Mapping[str, Any]) -> float:
        return max(300.0, self.timeout + 60.0)  # one POST may take the whole timeout

    def wake(self) -> None:
        """Look at the outbox now (a transition was just committed)."""
        self._wake.set()

    async def run(self, ctx: LayerContext, *, task_status: trio.TaskStatus[None]) -> None:
        key = load_secret()
        # Whether this URL answered 410 and nothing was delivered since (survives restarts).
        self._gone = await ctx.store.outbox.stopped_since_delivered(CONSUMER, self.gone_reason)
        self._gone_owners = await ctx.gone_owners("outbox")
        self._in_flight.clear()
        limiter = trio.CapacityLimiter(SEND_CONCURRENCY)
        async with (
            httpx.AsyncClient(timeout=self.timeout, trust_env=False) as client,
            trio.open_nursery() as senders,
        ):
            task_status.started()
            if self._gone:
                self._say_gone(ctx, abandoned=0)
            while True:
                wake = self._wake = trio.Event()
                now = ctx.clock.now()
                await self._expire(ctx, now)
                if self._gone:
                    ctx.metrics.delivery_attempts_failed.inc(
                        await ctx.store.outbox.abandon_pending(CONSUMER, now, self.gone_reason)
                    )
                else:
                    await self._send_due(ctx, senders, limiter, client, key, now)
                next_due = await self._gauges(ctx)
                ctx.passed()
                wait = ctx.idle_seconds
                if next_due is not None and len(self._in_flight) < SEND_CONCURRENCY:
                    wait = min(wait, next_due - ctx.clock.now())
                if wait > 0:
                    with trio.move_on_after(wait):
                        await wake.wait()

    # ---- one pass ------------------------------------------------------------------------
    async def _send_due(
        self,
        ctx: LayerContext,
        senders: trio.Nursery,
        limiter: trio.CapacityLimiter,
        client: httpx.AsyncClient,
        key: bytes,
        now: float,
    ) -> None:
        """Claim a due head of a training with nothing in flight for every free slot and
        start sending them; returns at once. Only heads that a slot takes at once are
        claimed, so a claim never waits in a queue: it lasts ``_claim_seconds``."""
        room = SEND_CONCURRENCY - len(self._in_flight)
        if room <= 0:
            return
        self._settled.clear()
        busy = sorted(self._in_flight)
        claim = await ctx.store.outbox.claim_heads(
            CONSUMER, now, busy, room, ctx.instance_id, self._claim_seconds(ctx), self._gone_owners
        )
        ctx.claimed("outbox", claim)
        stale = []
        for message in claim.items:
            # A head read while its training's previous message was being settled is stale.
            if message.request_id in self._in_flight or message.id in self._settled:
                stale.append(message.id)
                continue
            self._in_flight.add(message.request_id)
            senders.start_soon(self._send_one, ctx, limiter, client, key, message)
        await ctx.release("outbox", stale)

    def _claim_seconds(self, ctx: LayerContext) -> float:
        """How long a claimed head is this instance's: ``[cluster] claim_seconds``, and at
        least twice the time limit of its one POST."""
        return max(ctx.claim_seconds, 2 * self.timeout)

    async def _send_one(
        self,
        ctx: LayerContext,
        limiter: trio.CapacityLimiter,
        client: httpx.AsyncClient,
        key: bytes,
        message: OutboxMessage,
    ) -> None:
        gone = settled = False
        try:
            async with limiter:
                if self._gone:
                    return
                gone = await self._deliver(ctx, client, key, message)
            settled = True  # delivered() / failed() gave the claim up with the outcome
            self._settled.add(message.id)
        finally:
            if not settled:
                await ctx.release("outbox", [message.id])
            self._in_flight.discard(message.request_id)
        ctx.heartbeat()
        if gone and not self._gone:
            self._gone = True
            abandoned = await ctx.store.outbox.abandon_pending(
                CONSUMER, ctx.clock.now(), self.gone_reason
            )
            ctx.metrics.delivery_attempts_failed.inc(abandoned)
            self._say_gone(ctx, abandoned)
        self.wake()  # this training's next event, or a free slot for another's

    async def _post(self, client: httpx.AsyncClient, body: bytes, headers: dict[str, str]) -> int:
        """POST ``body``; the status, having read at most ``MAX_ANSWER_BYTES`` of the answer's
        body (httpcore reads the head, up to 100 KiB, in 64 KiB reads).

        Raises ``trio.TooSlowError`` when the whole exchange takes more than ``timeout_seconds``.
        """
        with trio.fail_after(self.timeout):
            async with client.stream("POST", self.url, content=body, headers=headers) as response:
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) <= MAX_ANSWER_BYTES:
                    await response.aread()  # h11 stops at the declared length: keep-alive
                # Else nothing of the body is read: the connection is closed, not reused.
                return response.status_code

    async def _deliver(
        self, ctx: LayerContext, client: httpx.AsyncClient, key: bytes, message: OutboxMessage
    ) -> bool:
        """One attempt at one message, its outcome stored; True on 410 Gone."""
        timestamp = int(ctx.clock.now())
        headers = {
            "content-type": "application/json",
            "webhook-id": message.message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(key, message.message_id, timestamp, message.body),
        }
        log = ctx.log.bind(
            request_id=message.request_id, type=message.event, message_id=message.message_id
        )
        try:
            status = await self._post(client, message.body.encode(), headers)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except trio.TooSlowError:
            error = f"no complete answer within {self.timeout:g} s"
        else:
            if 200 <= status < 300:
                await ctx.store.outbox.delivered(message.id, ctx.clock.now(), ctx.instance_id)
                ctx.metrics.delivery_delivered.inc()
                log.info("delivered to the bot", attempts=message.attempts + 1)
                return False
            error = f"HTTP {status}"
            if status == 410:
                await ctx.store.outbox.failed(message.id, self.gone_reason, None, ctx.instance_id)
                ctx.metrics.delivery_attempts_failed.inc()
                return True
        attempts = message.attempts + 1
        delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (attempts - 1))
        delay *= random.uniform(0.5, 1.0)
        await ctx.store.outbox.failed(message.id, error, ctx.clock.now() + delay, ctx.instance_id)
        ctx.metrics.delivery_attempts_failed.inc()
        log.info(
            "delivery failed; will retry", error=error, attempts=attempts, retry_in=round(delay, 2)
        )
        return False

    async def _expire(self, ctx: LayerContext, now: float) -> None:
        def reason(last_error: str | None) -> str:
            return f"not acknowledged within {self.max_age:g} s; last: {last_error}"

        expired = await ctx.store.outbox.abandon_created_before(
            CONSUMER, now - self.max_age, now, reason
        )
        for o in expired:
            ctx.metrics.delivery_attempts_failed.inc()
            ctx.log.error(
                f"{WARN} delivery abandoned: not acknowledged within max_age_seconds",
                max_age_seconds=self.max_age,
                request_id=o.request_id,
                type=o.event,
                message_id=o.message_id,
                attempts=o.attempts,
                last_error=o.last_error,
            )

    async def _gauges(self, ctx: LayerContext) -> float | None:
        """Set the backlog gauges; return when the next head not in flight is due (None: none;
        a sender wakes the layer when it is done)."""
        busy = sorted(self._in_flight)
        backlog, oldest, next_due = await ctx.store.outbox.stats(CONSUMER, busy, ctx.clock.now())
        ctx.metrics.delivery_backlog.set(backlog)
        ctx.metrics.delivery_oldest_age.set(ctx.clock.now() - oldest if oldest else 0)
        return next_due

    def _say_gone(self, ctx: LayerContext, abandoned: int) -> None:
        if not self._said_gone:
            self._said_gone = True
            ctx.log.error(
                f"{WARN} the bot answered 410 Gone: delivery to this URL is stopped; "
                "set another [delivery] url to resume",
                url=self.url,
                abandoned=abandoned,
            )
