"""Delivery to the bot: Standard Webhooks signatures, at least once, in order per training.

The bot is a tiny ASGI receiver on loopback that verifies every request with the
``standardwebhooks`` reference package and answers as each test scripts it.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from standardwebhooks import Webhook, WebhookVerificationError
from structlog.testing import capture_logs

from tests.test_layers import wait_for
from trainguard import config, http
from trainguard.logs import WARN
from trainguard.plugins import delivery
from trainguard.plugins.manager import build_manager, collect_layers, outbox_collector
from trainguard.reconcile import Kind, Observation, Reconciler
from trainguard.store import Outbox, open_store
from trainguard.supervisor import Daemon, LayerStartError
from trainguard.testing.demo import free_port

KEY = b"trainguard-delivery-test-key-32b"
SECRET = "whsec_" + base64.b64encode(KEY).decode()
LORA = {
    "diffusers_lora_file": {"url": "https://v3.fal.media/files/x/lora.safetensors"},
    "config_file": {"url": "https://v3.fal.media/files/x/config.json"},
}


class Receiver:
    """The bot: verifies each request, records it, answers the scripted status (then 200)."""

    def __init__(self, *answers: int) -> None:
        self.answers = list(answers)
        self.always: int | None = None
        #: (webhook-id, type, request_id, status answered, path) of every verified request.
        self.got: list[tuple[str, str, str, int, str]] = []
        self.bodies: dict[str, dict[str, Any]] = {}
        self.unverified = 0

    async def __call__(self, scope: http.Scope, receive: http.Receive, send: http.Send) -> None:
        if scope["type"] == "lifespan":
            await http.lifespan(receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        try:
            data = Webhook(SECRET).verify(body, headers)
        except WebhookVerificationError:
            self.unverified += 1
            status = 400
        else:
            status = self.always or (self.answers.pop(0) if self.answers else 200)
            msg_id = headers["webhook-id"]
            self.got.append(
                (msg_id, data["type"], data["data"]["request_id"], status, scope["path"])
            )
            self.bodies[msg_id] = data
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def acked(self) -> list[tuple[str, str, str]]:
        return [(m, t, r) for m, t, r, status, _ in self.got if 200 <= status < 300]


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery, "RETRY_FIRST_SECONDS", 0.05)
    monkeypatch.setattr(delivery, "RETRY_MAX_SECONDS", 0.2)
    monkeypatch.setenv(delivery.SECRET_ENV, SECRET)


def settings_for(tmp_path: Path, url: str, **options: Any) -> config.Settings:
    """Every built-in layer off: transitions come from the test, through the daemon's reconciler."""
    data: dict[str, Any] = {
        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        "metrics": {"listen": "127.0.0.1:0"},
        "layers": {name: {"enabled": False} for name in config.BUILTIN_LAYERS},
        "delivery": {"enabled": True, "url": url, "timeout_seconds": 2.0, **options},
    }
    return config.parse(data, env={})


async def serve(nursery: trio.Nursery, receiver: Receiver, port: int = 0) -> str:
    host, bound = await nursery.start(http.serve_asgi, receiver, f"127.0.0.1:{port}")
    return f"http://{host}:{bound}"


@asynccontextmanager
async def running(settings: config.Settings) -> AsyncIterator[Daemon]:
    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(Daemon(settings, pm=build_manager(entry_points=False)).run)
        assert daemon.reconciler is not None and daemon.reconciler.outbox is not None
        yield daemon
        nursery.cancel_scope.cancel()


async def finish(r: Reconciler, rid: str, *kinds: Kind) -> None:
    """Register a training and hand it the observations ``kinds`` (as the webhook layer)."""
    await r.register(name=rid, training_type="portrait", request_id=rid, layer="test")
    for kind in kinds:
        output = LORA if kind == Kind.SUCCEEDED else None
        await r.observe(Observation(rid, "webhook", kind, output=output, detail="boom"))


async def outbox(daemon: Daemon) -> list[dict[str, Any]]:
    assert daemon.store is not None
    return await daemon.store.read(lambda conn: list(Outbox.select().order_by(Outbox.id).dicts()))


def metric(daemon: Daemon, name: str) -> float:
    value = daemon.metrics.registry.get_sample_value(f"trainguard_delivery_{name}")
    assert value is not None
    return value


def assert_secret_absent(*texts: object) -> None:
    for text in map(str, texts):
        assert SECRET not in text and SECRET.removeprefix("whsec_") not in text
        assert KEY.decode() not in text


# -- the cases --------------------------------------------------------------------------
async def test_result_fallback_upgrade_and_cancel_are_delivered_signed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    bot = Receiver()
    url = await serve(nursery, bot) + "/bot"
    async with running(settings_for(tmp_path, url)) as daemon:
        assert daemon.reconciler is not None
        await finish(daemon.reconciler, "real", Kind.SUCCEEDED)
        await finish(daemon.reconciler, "saved", Kind.FAILED, Kind.SUCCEEDED)  # fallback, upgrade
        await finish(daemon.reconciler, "stopped", Kind.CANCELLED)

        async def all_acked() -> bool:  # the bot's 200s, and the daemon's record of them
            return len(bot.acked()) == 4 and metric(daemon, "events_delivered_total") == 4

        await wait_for(all_acked, 5)
        rows = await outbox(daemon)
        assert metric(daemon, "events_delivered_total") == 4
        assert metric(daemon, "attempts_failed_total") == 0
        assert metric(daemon, "outbox_backlog") == 0
    assert bot.unverified == 0
    assert sorted(bot.acked()) == sorted(
        (r["message_id"], r["event"], r["request_id"]) for r in rows
    )
    assert all(r["delivered_at"] and r["attempts"] == 1 for r in rows)
    by_request = {r: [t for _, t, rid in bot.acked() if rid == r] for r in ("real", "saved")}
    assert by_request == {
        "real": ["training.completed"],
        "saved": ["training.fallback", "training.upgraded"],
    }
    fallback, upgrade = (bot.bodies[r["message_id"]] for r in rows if r["request_id"] == "saved")
    assert (
        fallback["data"]["is_fallback"] is True and fallback["data"]["fallback_layer"] == "webhook"
    )
    assert upgrade["data"]["is_fallback"] is False
    assert upgrade["data"]["lora_url"] == LORA["diffusers_lora_file"]["url"]
    assert upgrade["timestamp"].endswith("Z") and upgrade["data"]["status"] == "COMPLETED"
    assert not delivery.INTERNAL_FIELDS & set(upgrade["data"])
    assert {p for *_, p in bot.got} == {"/bot"}


async def test_retries_keep_the_webhook_id_and_never_log_the_secret(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bot = Receiver(500, 500, 503)
    url = await serve(nursery, bot)
    with capture_logs() as logs:
        async with running(settings_for(tmp_path, url)) as daemon:
            assert daemon.reconciler is not None
            await finish(daemon.reconciler, "r1", Kind.SUCCEEDED)

            async def acked() -> bool:  # the bot's 200, and the daemon's record of it
                return bool(bot.acked()) and metric(daemon, "events_delivered_total") == 1

            await wait_for(acked, 5)
            (row,) = await outbox(daemon)
            assert metric(daemon, "attempts_failed_total") == 3
            assert metric(daemon, "events_delivered_total") == 1
    assert [(m, s) for m, _, _, s, _ in bot.got] == [
        (row["message_id"], s) for s in (500, 500, 503, 200)
    ]
    assert (row["attempts"], row["last_error"]) == (4, None) and row["delivered_at"]
    retried = [e for e in logs if e["event"] == "delivery failed; will retry"]
    assert [e["error"] for e in retried] == ["HTTP 500", "HTTP 500", "HTTP 503"]
    assert_secret_absent(logs, caplog.text)


async def test_a_bot_down_for_a_while_gets_everything_in_order(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there yet: connection refused
    bot = Receiver()
    async with running(settings_for(tmp_path, f"http://127.0.0.1:{port}")) as daemon:
        assert daemon.reconciler is not None
        rids = ["t1", "t2", "t3"]
        for rid in rids:
            await finish(daemon.reconciler, rid, Kind.FAILED, Kind.SUCCEEDED)

        async def retried() -> bool:
            return metric(daemon, "attempts_failed_total") >= 9

        await wait_for(retried, 5)
        rows = await outbox(daemon)
        assert not any(r["delivered_at"] for r in rows)
        assert all("ConnectError" in r["last_error"] for r in rows if r["attempts"])
        # Only the first event of each training was tried: the upgrades wait behind them.
        assert {r["event"] for r in rows if r["attempts"]} == {"training.fallback"}
        assert metric(daemon, "outbox_backlog") == 6
        assert metric(daemon, "outbox_oldest_age_seconds") > 0

        await serve(nursery, bot, port)

        async def all_acked() -> bool:
            return len({m for m, _, _ in bot.acked()}) == 6

        await wait_for(all_acked, 5)

        async def gauges_settled() -> bool:
            return metric(daemon, "outbox_backlog") == 0

        await wait_for(gauges_settled, 5)
        assert metric(daemon, "outbox_oldest_age_seconds") == 0
    for rid in rids:
        seen = [t for _, t, r in bot.acked() if r == rid]
        assert seen == ["training.fallback", "training.upgraded"]


async def test_an_event_older_than_max_age_is_abandoned_and_counted(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    bot = Receiver()
    bot.always = 500
    url = await serve(nursery, bot)
    with capture_logs() as logs:
        async with running(settings_for(tmp_path, url, max_age_seconds=0.5)) as daemon:
            assert daemon.reconciler is not None
            await finish(daemon.reconciler, "old", Kind.SUCCEEDED)

            async def abandoned() -> bool:
                return any(r["abandoned_at"] for r in await outbox(daemon))

            await wait_for(abandoned, 5)
            (row,) = await outbox(daemon)
            tried = len(bot.got)
            await trio.sleep(0.3)
            assert len(bot.got) == tried  # given up: never sent again
            assert metric(daemon, "attempts_failed_total") == row["attempts"] + 1
            assert metric(daemon, "events_delivered_total") == 0
            assert metric(daemon, "outbox_backlog") == 0
    assert row["delivered_at"] is None and row["attempts"] == tried >= 1
    assert row["last_error"] == "not acknowledged within 0.5 s; last: HTTP 500"
    (error,) = [e for e in logs if e["log_level"] == "error"]
    assert error["event"].startswith(WARN) and error["request_id"] == "old"
    assert error["message_id"] == row["message_id"] and error["last_error"] == "HTTP 500"


async def test_410_gone_stops_delivery_to_that_url_until_it_changes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    bot = Receiver(410)
    base = await serve(nursery, bot)
    gone_url = base + "/old"
    with capture_logs() as logs:
        async with running(settings_for(tmp_path, gone_url)) as daemon:
            assert daemon.reconciler is not None
            await finish(daemon.reconciler, "a", Kind.SUCCEEDED)

            async def stopped() -> bool:
                return all(r["abandoned_at"] for r in await outbox(daemon))

            await wait_for(stopped, 5)
            await finish(daemon.reconciler, "b", Kind.SUCCEEDED)

            async def both_abandoned() -> bool:
                rows = await outbox(daemon)
                return len(rows) == 2 and all(r["abandoned_at"] for r in rows)

            await wait_for(both_abandoned, 5)
            assert metric(daemon, "attempts_failed_total") == 3  # the 410, two events given up
        # Restarted with the same URL: still stopped (the reason is in the database).
        async with running(settings_for(tmp_path, gone_url)) as daemon:
            assert daemon.reconciler is not None
            await finish(daemon.reconciler, "c", Kind.SUCCEEDED)

            async def three_abandoned() -> bool:
                rows = await outbox(daemon)
                return len(rows) == 3 and all(r["abandoned_at"] for r in rows)

            await wait_for(three_abandoned, 5)
            rows = await outbox(daemon)
    assert [(p, s) for *_, s, p in bot.got] == [("/old", 410)]
    assert {r["last_error"] for r in rows} == {f"410 Gone from {gone_url}"}
    loud = [e for e in logs if e["log_level"] == "error"]
    assert len(loud) == 2  # once per process: when it happened, and at the restart
    assert all(e["event"].startswith(f"{WARN} the bot answered 410 Gone") for e in loud)
    assert loud[0]["url"] == gone_url and loud[0]["abandoned"] == 1

    # A new URL resumes delivery (what was abandoned stays abandoned).
    async with running(settings_for(tmp_path, base + "/new")) as daemon:
        assert daemon.reconciler is not None
        await finish(daemon.reconciler, "d", Kind.SUCCEEDED)

        async def delivered() -> bool:
            return bool(bot.acked())

        await wait_for(delivered, 5)
    assert [(r, p) for _, _, r, _, p in bot.got[1:]] == [("d", "/new")]


async def test_the_event_survives_a_kill_right_after_the_transition(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    bot = Receiver()
    url = await serve(nursery, bot)
    settings = settings_for(tmp_path, url)
    pm = build_manager(entry_points=False)
    collect_layers(pm, settings)  # what the daemon does at start: the plugin learns [delivery]
    async with open_store(settings.database["url"]) as store:
        reconciler = Reconciler(store, settings, outbox=outbox_collector(pm))
        await finish(reconciler, "k1", Kind.SUCCEEDED)
    # The process is gone right after the commit: no sender ran, no after-commit step either.
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        stored = db.execute(
            "SELECT consumer, message_id, event, delivered_at FROM outbox"
        ).fetchall()
        status = db.execute("SELECT status FROM trainings").fetchone()
    db.close()
    assert status == ("COMPLETED",)
    ((consumer, message_id, event, delivered_at),) = stored
    assert (consumer, event, delivered_at) == ("delivery", "training.completed", None)

    async with running(settings):

        async def delivered() -> bool:
            return bool(bot.acked())

        await wait_for(delivered, 5)
    assert bot.acked() == [(message_id, "training.completed", "k1")]


@pytest.mark.parametrize("secret", [None, "", "not-a-whsec", "whsec_%%%not-base64%%%"])
async def test_a_missing_or_malformed_secret_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret: str | None
) -> None:
    if secret is None:
        monkeypatch.delenv(delivery.SECRET_ENV)
    else:
        monkeypatch.setenv(delivery.SECRET_ENV, secret)
    daemon = Daemon(
        settings_for(tmp_path, "http://127.0.0.1:9/bot"), pm=build_manager(entry_points=False)
    )
    with capture_logs() as logs, pytest.raises(LayerStartError) as info:
        await daemon.run()
    message = str(info.value)
    assert message.startswith(
        f"layer delivery failed to start: ConfigError: {delivery.SECRET_ENV}: "
    )
    assert not daemon.ready
    if secret:
        assert secret not in message and secret not in str(logs)


def test_delivery_off_offers_no_layer_and_queues_nothing(tmp_path: Path) -> None:
    settings = config.parse({"database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"}}, env={})
    pm = build_manager(entry_points=False)
    assert "delivery" not in {e.layer.name for e in collect_layers(pm, settings)}
    assert delivery.trainguard_outbox(None, "training.completed") is None  # type: ignore[arg-type]


class HostileBot:
    """A raw HTTP/1.1 bot answering by the training in each request: ``trickle`` sends its
    answer a byte every half second for ever, ``huge`` a 300 MB body as fast as the socket
    takes it, any other 200 at once. Each stops when the client hangs up."""

    HUGE = 300 * 1024 * 1024

    def __init__(self) -> None:
        self.started: dict[str, trio.Event] = {"trickle": trio.Event(), "huge": trio.Event()}
        self.hung_up: dict[str, trio.Event] = {"trickle": trio.Event(), "huge": trio.Event()}
        self.huge_sent = 0
        #: request id of every quick 200, with whether the trickle was still answering then.
        self.quick: list[tuple[str, bool]] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        while True:  # one request after the other (keep-alive) until one is hostile
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(data) < length:
                data += await stream.receive_some(65536)
            body, data = data[:length], data[length:]
            rid = json.loads(body)["data"]["request_id"]
            if rid in self.hung_up:
                break
            self.quick.append((rid, not self.hung_up["trickle"].is_set()))
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        try:
            if rid == "trickle":
                self.started[rid].set()
                answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000000
                for byte in answer:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.5)
            else:
                self.started[rid].set()
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.HUGE)
                block = b"x" * (64 * 1024)
                while self.huge_sent < self.HUGE:
                    await stream.send_all(block)
                    self.huge_sent += len(block)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.hung_up[rid].set()


async def test_a_trickling_or_huge_answer_costs_one_slot_for_the_time_limit_and_a_few_kb(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """issue 9 item 9: httpx's timeout is per read, so a bot trickling its answer held the
    whole delivery pass for ever, and a 300 MB answer was read whole."""
    bot = HostileBot()
    listeners = await nursery.start(partial(trio.serve_tcp, bot.handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    settings = settings_for(tmp_path, f"http://127.0.0.1:{port}/bot", timeout_seconds=12.0)
    async with running(settings) as daemon:
        assert daemon.reconciler is not None
        for rid in ("trickle", "huge", "f1", "f2"):
            await finish(daemon.reconciler, rid, Kind.SUCCEEDED)
        with trio.fail_after(30):
            await bot.started["trickle"].wait()
            await bot.hung_up["huge"].wait()  # read a few KB of it, then hung up
        passes = daemon.metrics.registry.get_sample_value(
            "trainguard_layer_passes_total", {"layer": "delivery"}
        )
        # A training finished while the trickle is still being answered is sent at once.
        await finish(daemon.reconciler, "late", Kind.SUCCEEDED)

        async def late_sent() -> bool:
            return "late" in {rid for rid, _ in bot.quick}

        await wait_for(late_sent, 30)
        assert not bot.hung_up["trickle"].is_set(), "the trickle ended before 'late' was sent"
        assert daemon.metrics.registry.get_sample_value(
            "trainguard_layer_passes_total", {"layer": "delivery"}
        ) > (passes or 0)
        # The trickle is cut at the time limit and retried later, never acknowledged.
        with trio.fail_after(30):
            await bot.hung_up["trickle"].wait()

        async def trickle_failed() -> bool:
            rows = {r["request_id"]: r for r in await outbox(daemon)}
            return rows["trickle"]["attempts"] >= 1

        await wait_for(trickle_failed, 30)
        rows = {r["request_id"]: r for r in await outbox(daemon)}
    assert rows["trickle"]["delivered_at"] is None
    assert rows["trickle"]["last_error"] == "no complete answer within 12 s"
    assert all(rows[r]["delivered_at"] for r in ("huge", "f1", "f2", "late"))
    assert sorted(rid for rid, _ in bot.quick) == ["f1", "f2", "late"]
    assert all(trickling for _, trickling in bot.quick), bot.quick
    # What was read of the 300 MB: what the sockets' buffers took before the hang-up.
    print(f"huge answer: {bot.huge_sent // 1024} KiB sent of {bot.HUGE // 1024} KiB")
    assert bot.huge_sent < 64 * 1024 * 1024


async def test_two_instances_send_each_event_once_and_in_order(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Issue 11: two daemons on one database, both delivering: one sender per entry (its
    head claimed by one instance), a training's events still in order."""
    bot = Receiver()
    url = await serve(nursery, bot) + "/bot"
    settings = settings_for(tmp_path, url)
    async with running(settings) as a, running(settings) as b:
        assert a.reconciler is not None and b.reconciler is not None
        rids = [f"t{i}" for i in range(12)]
        for i, rid in enumerate(rids):  # transitions at either instance
            await finish((a, b)[i % 2].reconciler, rid, Kind.FAILED, Kind.SUCCEEDED)

        async def all_delivered() -> bool:
            rows = await outbox(a)
            return len(rows) == 24 and all(r["delivered_at"] for r in rows)

        await wait_for(all_delivered, 15)
        rows = await outbox(a)
        sent = metric(a, "events_delivered_total") + metric(b, "events_delivered_total")
    assert sent == 24
    assert sorted(m for m, _, _ in bot.acked()) == sorted(r["message_id"] for r in rows)
    assert len(bot.got) == 24  # nothing sent twice
    for rid in rids:
        assert [t for _, t, r in bot.acked() if r == rid] == [
            "training.fallback",
            "training.upgraded",
        ]
    assert all(r["claimed_by"] is None for r in rows)  # every claim given up with its outcome
