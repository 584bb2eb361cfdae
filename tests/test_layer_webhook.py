"""[WEBHOOK] the listener of a real in-process daemon, spoken to over real HTTP.

Only the webhook layer runs (no poller, no startup sweep), so whatever happens to a training
here was done by a webhook. Trainings are adopted with ``actions.track`` under made-up ids,
so that no simulated training sends webhooks of its own; bodies are signed by the test with
the simulator's key, and the daemon fetches the simulator's JWKS, as it would FAL's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from tests.conftest import daemon_settings
from trainguard import actions, http, signing
from trainguard.layers import webhook as layer
from trainguard.logs import WARN
from trainguard.metrics import WEBHOOK_OUTCOMES
from trainguard.plugins.hookspecs import hookimpl
from trainguard.plugins.manager import build_manager
from trainguard.store import Connection, Store, TrainingView, WebhookReceipt
from trainguard.supervisor import Daemon
from trainguard.testing.simulator import Simulator

USER_ID = "user-0001"


# -- webhook bodies as FAL sends them -------------------------------------------------------
def lora_url(request_id: str) -> str:
    return f"https://v3.fal.media/files/{request_id}/pytorch_lora_weights.safetensors"


def ok_body(request_id: str) -> bytes:
    output = {
        "diffusers_lora_file": {"url": lora_url(request_id), "file_size": 4096},
        "config_file": {"url": f"https://v3.fal.media/files/{request_id}/config.json"},
    }
    return _body(request_id, status="OK", payload=output)


def error_body(request_id: str) -> bytes:
    detail = [{"loc": ["body", "images_data_url"], "msg": "field required"}]
    return _body(
        request_id, status="ERROR", error="Invalid status code: 422", payload={"detail": detail}
    )


def payload_error_body(request_id: str) -> bytes:
    return _body(request_id, status="OK", payload=None, payload_error="not JSON serializable")


def _body(request_id: str, **fields: Any) -> bytes:
    return json.dumps(
        {"request_id": request_id, "gateway_request_id": request_id, **fields}
    ).encode()


def signed(
    key: Ed25519PrivateKey,
    body: bytes,
    request_id: str,
    *,
    timestamp: int | None = None,
) -> dict[str, str]:
    """The four X-Fal-Webhook-* headers of ``body`` as FAL would send them."""
    at = int(time.time()) if timestamp is None else timestamp
    return signing.sign_webhook(key, request_id, USER_ID, at, body)


# -- a daemon with only the webhook layer ---------------------------------------------------
@dataclass
class Harness:
    daemon: Daemon
    sim: Simulator
    client: httpx.AsyncClient
    url: str

    @property
    def store(self) -> Store:
        assert self.daemon.store is not None
        return self.daemon.store

    @property
    def address(self) -> tuple[str, int]:
        address = self.daemon.layers["webhook"].entry.layer.address  # type: ignore[attr-defined]
        assert address is not None
        return address

    def sign(self, body: bytes, request_id: str, **kw: Any) -> dict[str, str]:
        return signed(self.sim.private_key, body, request_id, **kw)

    async def post(self, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.client.post(self.url, content=body, headers=headers or {})

    async def deliver(self, body: bytes, request_id: str) -> httpx.Response:
        """POST ``body`` validly signed for ``request_id``."""
        return await self.post(body, self.sign(body, request_id))

    async def track(self, request_id: str | None = None) -> str:
        assert self.daemon.reconciler is not None
        rid = request_id or str(uuid.uuid4())
        await actions.track(
            self.daemon.settings,
            self.daemon.reconciler,
            request_id=rid,
            training_type="portrait",
            name=f"n-{rid[:8]}",
            trigger="ohwx person",
        )
        return rid

    async def training(self, request_id: str) -> TrainingView:
        view = await self.store.training(request_id)
        assert view is not None
        return view

    async def kinds(self, request_id: str) -> list[str]:
        return [e["kind"] for e in await self.store.events(request_id)]

    async def receipts(self, request_id: str | None = None) -> list[dict[str, Any]]:
        def get(conn: Any) -> list[dict[str, Any]]:
            query = WebhookReceipt.select().order_by(WebhookReceipt.id)
            if request_id is not None:
                query = query.where(WebhookReceipt.request_id == request_id)
            return [
                {
                    "request_id": r.request_id,
                    "body": bytes(r.body),
                    "verification": r.verification,
                    "reject_reason": r.reject_reason,
                    "outcome": r.outcome,
                    "processed": r.processed_at is not None,
                }
                for r in query
            ]

        return await self.store.read(get)

    def counted(self, outcome: str) -> float:
        value = self.daemon.metrics.registry.get_sample_value(
            "trainguard_webhooks_received_total", {"outcome": outcome}
        )
        return value or 0.0

    def signed_head(self, body: bytes, request_id: str) -> bytes:
        """The head of a raw HTTP/1.1 POST of ``body``, validly signed."""
        headers = {**self.sign(body, request_id), "Content-Length": str(len(body))}
        head = f"POST {httpx.URL(self.url).path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        return (head + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()

    async def untouched(self, request_id: str) -> bool:
        """The training is as ``track`` left it: SUBMITTED, nothing but its registration."""
        view = await self.training(request_id)
        return view.status == "SUBMITTED" and await self.kinds(request_id) == ["registered"]


Launch = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def launch(nursery: trio.Nursery, tmp_path: Path, sim: Simulator) -> AsyncIterator[Launch]:
    """Start the daemon (webhook layer only) with ``[webhook]`` / ``[fal]`` overrides."""
    async with httpx.AsyncClient(trust_env=False, timeout=10.0) as client:

        async def go(
            webhook: dict[str, Any] | None = None,
            fal: dict[str, Any] | None = None,
            plugins: Iterable[object] = (),
        ) -> Harness:
            extra = {"webhook": webhook or {}, "fal": fal or {}}
            settings = daemon_settings(tmp_path / "db.sqlite", sim, only=("webhook",), extra=extra)
            daemon = Daemon(settings, pm=build_manager(entry_points=False, extra=plugins))
            await nursery.start(daemon.run)
            return Harness(daemon, sim, client, settings.webhook["public_url"])

        yield go


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.05)


# -- the normal path ------------------------------------------------------------------------
async def test_a_valid_webhook_completes_the_training(launch: Launch) -> None:
    h = await launch()
    rid = await h.track()
    reply = await h.deliver(ok_body(rid), rid)
    assert (reply.status_code, reply.json()) == (200, {"detail": "ok"})
    view = await h.training(rid)
    assert (view.status, view.result_layer, view.is_fallback) == ("COMPLETED", "webhook", False)
    assert view.lora_url == lora_url(rid)
    (receipt,) = await h.receipts(rid)
    assert (receipt["verification"], receipt["outcome"], receipt["processed"]) == (
        "verified",
        "result",
        True,
    )
    assert receipt["body"] == ok_body(rid)  # the raw bytes, as they came
    assert h.counted("accepted") == 1


async def test_duplicates_get_200_and_no_second_transition(launch: Launch) -> None:
    h = await launch()
    rid = await h.track()
    body = ok_body(rid)
    headers = h.sign(body, rid)
    assert (await h.post(body, headers)).status_code == 200
    again = await h.post(body, headers)
    assert (again.status_code, again.json()) == (200, {"detail": "duplicate"})
    assert h.counted("duplicate") == 1
    # FAL's retry is signed anew (a later timestamp): another delivery of the same news.
    later = h.sign(body, rid, timestamp=int(headers[signing.HEADER_TIMESTAMP]) + 1)
    assert (await h.post(body, later)).status_code == 200
    assert (await h.kinds(rid)).count("result") == 1
    assert [r["outcome"] for r in await h.receipts(rid)] == ["result", "none"]
    assert (await h.training(rid)).status == "COMPLETED"


class HeldHook:
    """A plugin whose ``trainguard_training_finished`` waits until the test releases it."""

    def __init__(self) -> None:
        self.called = trio.Event()
        self.release = trio.Event()
        self.returned = trio.Event()
        self.finished: list[str] = []

    @hookimpl
    async def trainguard_training_finished(self, training: TrainingView, layer: str) -> None:
        self.called.set()
        await self.release.wait()
        self.finished.append(f"{training.request_id} {training.status} {layer}")
        self.returned.set()


async def test_fal_gets_its_200_before_the_plugin_hooks_run(launch: Launch) -> None:
    """Regression (issue 10): the 200 waited for the post-commit hooks (up to 10 s each,
    and past the 5 s write wait a committed webhook was even answered 503). Now the answer
    goes out once the receipt and the transition are committed, and the hooks run after."""
    hook = HeldHook()
    h = await launch(plugins=[hook])
    rid = await h.track()
    with trio.fail_after(2):  # the hook holds on until released below
        reply = await h.deliver(ok_body(rid), rid)
    assert (reply.status_code, reply.json()) == (200, {"detail": "ok"})
    assert (await h.training(rid)).status == "COMPLETED"  # committed before the answer
    with trio.fail_after(2):
        await hook.called.wait()  # the hook is called all the same, after the answer
    assert hook.finished == []
    hook.release.set()
    with trio.fail_after(2):
        await hook.returned.wait()
    assert hook.finished == [f"{rid} COMPLETED webhook"]
    assert h.counted("accepted") == 1


async def test_a_webhook_is_parsed_and_hashed_once_on_its_way_in(
    launch: Launch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 10): the receipt was read back and its body parsed again inside the
    transaction that wrote it, and the body hashed twice. Now the listener's parse is the
    one (a stored receipt's parse is not reached), and the dedupe key comes from the one
    digest."""
    from trainguard import reconcile

    def parse_again(body: bytes) -> Any:
        raise AssertionError("a fresh webhook's body was parsed a second time")

    monkeypatch.setattr(reconcile, "parse_webhook", parse_again)
    h = await launch()
    rid = await h.track()
    body = ok_body(rid)
    headers = h.sign(body, rid)
    assert (await h.post(body, headers)).status_code == 200
    assert (await h.training(rid)).status == "COMPLETED"

    def kept(conn: Connection) -> list[tuple[str, str, str | None]]:
        return [(r.body_sha256, r.dedupe_key, r.outcome) for r in WebhookReceipt.select()]

    digest = hashlib.sha256(body).hexdigest()
    key = hashlib.sha256(f"{headers[signing.HEADER_SIGNATURE]}\n{digest}".encode()).hexdigest()
    assert await h.store.read(kept) == [(digest, key, "result")]


# -- refusals -------------------------------------------------------------------------------
Built = tuple[str, str, bytes, dict[str, str]]  # method, URL, body, headers
Signer = Callable[[Harness, bytes, str], dict[str, str]]


@dataclass(frozen=True)
class Bad:
    """One refused request, built for a known training, and how it must be answered."""

    build: Callable[[Harness, str], Built]
    status: int
    outcome: str | None  # None: neither counted nor kept (not the webhook's path)


def _good(h: Harness, body: bytes, rid: str) -> dict[str, str]:
    return h.sign(body, rid)


def _request(
    body: Callable[[str], bytes] = ok_body,
    sign: Signer = _good,
    *,
    method: str = "POST",
    path: str = "",
) -> Callable[[Harness, str], Built]:
    def build(h: Harness, rid: str) -> Built:
        raw = body(rid)
        return method, h.url + path, raw, sign(h, raw, rid)

    return build


def _without(name: str) -> Signer:
    def sign(h: Harness, body: bytes, rid: str) -> dict[str, str]:
        headers = h.sign(body, rid)
        del headers[name]
        return headers

    return sign


def _at(offset: int) -> Signer:
    return lambda h, body, rid: h.sign(body, rid, timestamp=int(time.time()) + offset)


def _other_key(h: Harness, body: bytes, rid: str) -> dict[str, str]:
    return signed(Ed25519PrivateKey.generate(), body, rid)


def _other_body(h: Harness, body: bytes, rid: str) -> dict[str, str]:
    return h.sign(body + b" ", rid)


def _not_hex(h: Harness, body: bytes, rid: str) -> dict[str, str]:
    return {**h.sign(body, rid), signing.HEADER_SIGNATURE: "zz" * 64}


def _for_another(h: Harness, body: bytes, rid: str) -> dict[str, str]:
    return h.sign(body, str(uuid.uuid4()))  # validly signed, but the ids disagree


def _original_shape(rid: str) -> bytes:  # what the replaced system expected
    return _body(rid, status="completed", result={"lora_url": lora_url(rid)})


MAX_BODY = 4096
REFUSALS = {
    **{
        f"missing {name}": Bad(_request(sign=_without(name)), 400, "missing_header")
        for name in signing.REQUIRED_HEADERS
    },
    # 301 s would do; the margin covers the sub-second part of the timestamp and the trip.
    "timestamp 310 s old": Bad(_request(sign=_at(-310)), 400, "stale"),
    "timestamp 310 s ahead": Bad(_request(sign=_at(310)), 400, "stale"),
    "signed by another key": Bad(_request(sign=_other_key), 401, "bad_signature"),
    "signed over another body": Bad(_request(sign=_other_body), 401, "bad_signature"),
    "signature not hex": Bad(_request(sign=_not_hex), 401, "bad_signature"),
    "body not JSON": Bad(
        _request(lambda rid: b"status=OK&request_id=" + rid.encode()), 400, "malformed"
    ),
    "JSON without request_id": Bad(
        _request(lambda rid: b'{"status": "OK", "payload": {}}'), 400, "malformed"
    ),
    "status completed with result": Bad(_request(_original_shape), 400, "malformed"),
    "header id differs from the body's": Bad(_request(sign=_for_another), 400, "malformed"),
    "body too large": Bad(_request(lambda rid: ok_body(rid) + b" " * MAX_BODY), 413, "too_large"),
    "GET": Bad(_request(lambda rid: b"", method="GET"), 405, "wrong_method"),
    "wrong path": Bad(_request(path="/other"), 404, None),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
async def test_each_refusal_changes_nothing_and_is_kept_and_counted(
    launch: Launch, case: Bad
) -> None:
    h = await launch(webhook={"max_body_bytes": MAX_BODY})
    rid = await h.track()
    method, url, body, headers = case.build(h, rid)
    reply = await h.client.request(method, url, content=body, headers=headers)
    assert reply.status_code == case.status, reply.text
    assert await h.untouched(rid)
    kept = await h.receipts()
    if case.outcome is None:
        assert kept == []
        assert sum(h.counted(outcome) for outcome in WEBHOOK_OUTCOMES) == 0
        return
    (receipt,) = kept
    assert (receipt["verification"], receipt["outcome"]) == ("rejected", "rejected")
    assert receipt["reject_reason"].startswith(f"{case.outcome}: ")
    assert h.counted(case.outcome) == 1
    assert h.counted("accepted") == 0


async def test_a_streamed_body_past_the_limit_is_refused(launch: Launch) -> None:
    h = await launch(webhook={"max_body_bytes": MAX_BODY})
    rid = await h.track()
    body = ok_body(rid) + b" " * MAX_BODY

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: read until too much
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    reply = await h.client.post(h.url, content=chunks(), headers=h.sign(body, rid))
    assert reply.status_code == 413
    assert await h.untouched(rid)
    assert h.counted("too_large") == 1
    (receipt,) = await h.receipts(rid)
    assert receipt["reject_reason"] == f"too_large: body larger than {MAX_BODY} bytes"


async def test_rejected_receipts_are_bounded(launch: Launch) -> None:
    h = await launch(webhook={"rejected_kept": 3})
    rid = await h.track()
    bodies = [_body(rid, status="OK", payload={"n": n}) for n in range(7)]
    for body in bodies:
        assert (await h.post(body, _other_key(h, body, rid))).status_code == 401
    kept = await h.receipts()
    assert [r["body"] for r in kept] == bodies[-3:]  # the newest ones
    assert h.counted("bad_signature") == 7
    evicted = h.daemon.metrics.registry.get_sample_value(
        "trainguard_webhook_receipts_evicted_total", {"kind": "rejected"}
    )
    assert evicted == 4
    assert await h.untouched(rid)


# -- FAL's key server -----------------------------------------------------------------------
async def test_jwks_outage_stores_unverified_and_settles_when_keys_return(
    launch: Launch, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layer, "RETRY_SECONDS", 0.2)
    monkeypatch.setattr(layer, "FETCH_RETRY_SECONDS", 0.2)
    sim.faults.jwks_down = True  # before the daemon's first key fetch
    h = await launch()
    real, forged = await h.track(), await h.track()
    reply = await h.deliver(ok_body(real), real)
    assert reply.status_code == 202
    forged_body = ok_body(forged)
    assert (await h.post(forged_body, _other_key(h, forged_body, forged))).status_code == 202
    assert h.counted("unverified") == 2
    assert [r["verification"] for r in await h.receipts()] == ["unverified", "unverified"]
    await trio.sleep(0.5)  # retries while the keys are still away change nothing
    assert await h.untouched(real) and await h.untouched(forged)

    sim.faults.jwks_down = False

    async def settled() -> bool:
        return all(r["processed"] for r in await h.receipts())

    await wait_for(settled)
    view = await h.training(real)
    assert (view.status, view.result_layer) == ("COMPLETED", "webhook")
    assert [(r["verification"], r["outcome"]) for r in await h.receipts()] == [
        ("verified", "result"),
        ("rejected", "rejected"),
    ]
    assert await h.untouched(forged)


@dataclass
class JwksServer:
    """A stand-in for FAL's key server: requests wait while ``gate`` is not set."""

    keys: list[dict[str, str]]
    gate: trio.Event = field(default_factory=trio.Event)
    status: int = 200
    hits: int = 0

    async def __call__(self, scope: http.Scope, receive: http.Receive, send: http.Send) -> None:
        if scope["type"] == "lifespan":
            await http.lifespan(receive, send)
            return
        self.hits += 1
        await self.gate.wait()
        await http.respond(send, self.status, json.dumps(signing.jwks_document(self.keys)).encode())

    async def start(self, nursery: trio.Nursery) -> str:
        """Serve on a free loopback port; the JWKS URL. Lets every request through at the
        end of the test (a hanging one would hold up the listener's graceful shutdown)."""
        host, port = await nursery.start(http.serve_asgi, self, "127.0.0.1:0")
        nursery.start_soon(self._open_at_exit)
        return f"http://{host}:{port}/.well-known/jwks.json"

    async def _open_at_exit(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.gate.set()


FETCH_TIMEOUT = 0.5


async def test_a_hanging_key_server_is_tried_once_not_once_per_webhook(
    launch: Launch, nursery: trio.Nursery, sim: Simulator
) -> None:
    jwks = JwksServer(sim.jwks)  # never answers in time
    h = await launch(fal={"jwks_url": await jwks.start(nursery), "timeout_seconds": FETCH_TIMEOUT})
    rids = [await h.track() for _ in range(4)]
    answers: dict[str, int] = {}

    async def deliver(rid: str) -> None:
        answers[rid] = (await h.deliver(ok_body(rid), rid)).status_code

    started = trio.current_time()
    async with trio.open_nursery() as senders:
        for rid in rids:
            senders.start_soon(deliver, rid)
    assert set(answers.values()) == {202}  # all stored, none lost
    assert jwks.hits == 1  # the others did not queue up for a fetch of their own
    assert trio.current_time() - started < len(rids) * FETCH_TIMEOUT


async def test_a_refetch_never_holds_up_webhooks_the_cache_verifies(
    launch: Launch, nursery: trio.Nursery, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layer, "REFETCH_MIN_SECONDS", 1.0)
    jwks = JwksServer(sim.jwks)
    jwks.gate.set()
    h = await launch(fal={"jwks_url": await jwks.start(nursery), "timeout_seconds": 10.0})
    first, second, forged = await h.track(), await h.track(), await h.track()
    assert (await h.deliver(ok_body(first), first)).status_code == 200
    assert jwks.hits == 1
    await trio.sleep(1.05)  # a refetch is allowed again
    jwks.gate = trio.Event()
    forged_body = ok_body(forged)
    forged_headers = _other_key(h, forged_body, forged)
    forged_answers: list[int] = []

    async def send_forged() -> None:
        forged_answers.append((await h.post(forged_body, forged_headers)).status_code)

    async def refetching() -> bool:
        return jwks.hits == 2

    async with trio.open_nursery() as senders:
        senders.start_soon(send_forged)  # no cached key verifies it: a refetch starts, waits
        await wait_for(refetching)
        assert (await h.deliver(ok_body(second), second)).status_code == 200
        assert forged_answers == []  # the genuine one did not wait for the refetch
        jwks.status = 503
        jwks.gate.set()  # the refetch fails
    assert forged_answers == [401]
    # Right after a failed refetch, another forged webhook does not trigger one.
    assert (await h.post(forged_body, _other_key(h, forged_body, forged))).status_code == 401
    assert jwks.hits == 2
    assert await h.untouched(forged)


async def _key_servers(
    nursery: trio.Nursery, *keysets: list[dict[str, str]], status: int = 200
) -> tuple[list[JwksServer], list[str]]:
    servers = [JwksServer(keys, status=status) for keys in keysets]
    return servers, [await server.start(nursery) for server in servers]


async def test_every_key_host_that_answers_counts_and_a_hanging_one_blocks_none(
    launch: Launch, nursery: trio.Nursery, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layer, "OTHER_HOSTS_GRACE_SECONDS", 0.2)
    other_key, other_jwk = signing.generate_keypair()
    (alpha, rest, hanging), urls = await _key_servers(nursery, sim.jwks, [other_jwk], sim.jwks)
    alpha.gate.set()
    rest.gate.set()  # `hanging` never answers (within the 10 s limit of a fetch)
    h = await launch(fal={"jwks_url": urls, "timeout_seconds": 10.0})
    by_sim, by_other, forged = await h.track(), await h.track(), await h.track()
    started = trio.current_time()
    assert (await h.deliver(ok_body(by_sim), by_sim)).status_code == 200
    assert trio.current_time() - started < 10.0  # not held for the hanging host's limit
    body = ok_body(by_other)
    assert (await h.post(body, signed(other_key, body, by_other))).status_code == 200
    assert [(await h.training(r)).status for r in (by_sim, by_other)] == ["COMPLETED"] * 2
    assert (alpha.hits, rest.hits, hanging.hits) == (1, 1, 1)  # asked once, all at once
    body = ok_body(forged)
    assert (await h.post(body, _other_key(h, body, forged))).status_code == 401
    assert await h.untouched(forged)


async def test_a_failing_key_host_leaves_the_keys_of_the_other(
    launch: Launch, nursery: trio.Nursery, sim: Simulator
) -> None:
    other_key, other_jwk = signing.generate_keypair()
    (down, up), urls = await _key_servers(nursery, sim.jwks, [other_jwk])
    down.status = 503
    down.gate.set()
    up.gate.set()
    h = await launch(fal={"jwks_url": urls})
    by_other, by_sim = await h.track(), await h.track()
    body = ok_body(by_other)
    assert (await h.post(body, signed(other_key, body, by_other))).status_code == 200
    # Only the keys of hosts that answered verify: the down host's key is not known now,
    # and a host answering is not an outage (no 202 "unverified").
    assert (await h.deliver(ok_body(by_sim), by_sim)).status_code == 401
    assert h.counted("unverified") == 0
    assert await h.untouched(by_sim)


async def test_the_unverified_path_only_when_no_key_host_answers(
    launch: Launch, nursery: trio.Nursery, sim: Simulator
) -> None:
    (down, hanging), urls = await _key_servers(nursery, sim.jwks, sim.jwks)
    down.status = 503
    down.gate.set()
    h = await launch(fal={"jwks_url": urls, "timeout_seconds": FETCH_TIMEOUT})
    rid = await h.track()
    assert (await h.deliver(ok_body(rid), rid)).status_code == 202
    assert [r["verification"] for r in await h.receipts(rid)] == ["unverified"]
    assert (down.hits, hanging.hits) == (1, 1)


async def test_a_rotated_key_is_fetched_once_and_accepted(
    launch: Launch, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layer, "REFETCH_MIN_SECONDS", 1.0)
    h = await launch()
    before, after, forged = await h.track(), await h.track(), await h.track()
    assert (await h.deliver(ok_body(before), before)).status_code == 200
    await trio.sleep(1.05)
    old_key = sim.private_key
    sim.private_key, jwk = signing.generate_keypair()
    sim.jwks = [jwk]  # FAL rotated its key

    reply = await h.deliver(ok_body(after), after)
    assert reply.status_code == 200
    assert (await h.training(after)).status == "COMPLETED"
    assert sim.stats[("jwks", 200)] == 2  # one refetch
    # Neither the retired key nor a stranger's gets another refetch so soon.
    for key in (old_key, Ed25519PrivateKey.generate()):
        body = ok_body(forged)
        assert (await h.post(body, signed(key, body, forged))).status_code == 401
    assert sim.stats[("jwks", 200)] == 2
    assert await h.untouched(forged)


# -- what a webhook means -------------------------------------------------------------------
async def test_error_and_payload_error_webhooks_end_in_marked_fallbacks(launch: Launch) -> None:
    h = await launch()
    failed, unserialisable = await h.track(), await h.track()
    assert (await h.deliver(error_body(failed), failed)).status_code == 200
    assert (await h.deliver(payload_error_body(unserialisable), unserialisable)).status_code == 200
    for rid, kind in ((failed, "fal_failure"), (unserialisable, "payload_error")):
        view = await h.training(rid)
        assert (view.status, view.is_fallback, view.fallback_layer, view.fallback_kind) == (
            "COMPLETED",
            True,
            "webhook",
            kind,
        )
        assert view.result_layer is None
        assert await h.kinds(rid) == ["registered", "fallback"]
    assert "Invalid status code: 422" in ((await h.training(failed)).failure_detail or "")


async def test_the_gateway_id_in_the_header_is_genuine_and_applies_to_request_id(
    launch: Launch,
) -> None:
    """fal may put the body's gateway_request_id in X-Fal-Webhook-Request-Id (signed over
    it): accepted, applied to the body's request_id. Any other id stays refused."""
    h = await launch()
    rid, gateway = await h.track(), str(uuid.uuid4())
    body = json.dumps(
        {
            "request_id": rid,
            "gateway_request_id": gateway,
            "status": "OK",
            "payload": json.loads(ok_body(rid))["payload"],
        }
    ).encode()
    reply = await h.post(body, h.sign(body, gateway))
    assert (reply.status_code, reply.json()) == (200, {"detail": "ok"})
    view = await h.training(rid)
    assert (view.status, view.lora_url) == ("COMPLETED", lora_url(rid))
    (receipt,) = await h.receipts(rid)
    assert (receipt["verification"], receipt["outcome"]) == ("verified", "result")
    # The body's request_id in the header works as before (a later delivery: no change).
    assert (await h.post(body, h.sign(body, rid))).status_code == 200
    assert (await h.kinds(rid)).count("result") == 1
    # Signed over a third id: neither of the body's, refused with 400.
    other = str(uuid.uuid4())
    refused = await h.post(body, h.sign(body, other))
    assert refused.status_code == 400 and "gateway_request_id" in refused.json()["detail"]
    assert h.counted("malformed") == 1
    # The gateway id header, but the signature made over the request id: not genuine.
    forged = {**h.sign(body, rid), signing.HEADER_REQUEST_ID: gateway}
    assert (await h.post(body, forged)).status_code == 401
    assert h.counted("accepted") == 2 and h.counted("bad_signature") == 1


def _user(user_id: str) -> Signer:
    def sign(h: Harness, body: bytes, rid: str) -> dict[str, str]:
        return signing.sign_webhook(h.sim.private_key, rid, user_id, int(time.time()), body)

    return sign


async def test_another_fal_accounts_signed_webhook_gets_403_and_changes_nothing(
    launch: Launch,
) -> None:
    """fal signs every customer's webhooks with the same keys: only the user id header,
    checked once the signature verified, says they are ours."""
    with capture_logs() as logs:
        h = await launch(webhook={"allowed_user_ids": ["someone", USER_ID]})
    assert not [e for e in logs if "allowed_user_ids" in e["event"]]  # no warning then
    assert h.counted("foreign_user") == 0
    assert (
        h.daemon.metrics.registry.get_sample_value(
            "trainguard_webhooks_received_total", {"outcome": "foreign_user"}
        )
        == 0.0
    )  # exported from the start
    rid = await h.track()
    body = ok_body(rid)
    reply = await h.post(body, _user("user-9999")(h, body, rid))
    assert (reply.status_code, reply.json()) == (
        403,
        {"detail": "the fal user id is not an allowed one"},
    )
    assert h.counted("foreign_user") == 1
    assert await h.untouched(rid)
    (kept,) = await h.receipts(rid)
    assert kept["verification"] == "rejected" and kept["reject_reason"].startswith("foreign_user")
    # An unsigned (badly signed) request does not learn whether its user id is allowed.
    assert (await h.post(body, {**_other_key(h, body, rid)})).status_code == 401
    forged = {**h.sign(body, rid), signing.HEADER_USER_ID: "user-9999"}
    assert (await h.post(body, forged)).status_code == 401
    # Ours: accepted.
    assert (await h.deliver(body, rid)).status_code == 200
    assert (await h.training(rid)).status == "COMPLETED"


async def test_a_foreign_webhook_stored_while_the_keys_were_away_is_refused_later(
    launch: Launch, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layer, "RETRY_SECONDS", 0.2)
    monkeypatch.setattr(layer, "FETCH_RETRY_SECONDS", 0.2)
    sim.faults.jwks_down = True
    h = await launch(webhook={"allowed_user_ids": [USER_ID]})
    ours, theirs = await h.track(), await h.track()
    assert (await h.deliver(ok_body(ours), ours)).status_code == 202
    body = ok_body(theirs)
    assert (await h.post(body, _user("user-9999")(h, body, theirs))).status_code == 202
    sim.faults.jwks_down = False

    async def settled() -> bool:
        return all(r["processed"] for r in await h.receipts())

    await wait_for(settled)
    assert (await h.training(ours)).status == "COMPLETED"
    assert await h.untouched(theirs)
    (refused,) = await h.receipts(theirs)
    assert refused["verification"] == "rejected"
    assert refused["reject_reason"].startswith("foreign_user")


async def test_an_empty_allow_list_accepts_any_account_with_a_warning(launch: Launch) -> None:
    with capture_logs() as logs:
        h = await launch()
    warned = [e for e in logs if "allowed_user_ids is empty" in e["event"]]
    assert len(warned) == 1 and warned[0]["event"].startswith(f"{layer.TAG} {WARN}")
    rid = await h.track()
    body = ok_body(rid)
    assert (await h.post(body, _user("any-account")(h, body, rid))).status_code == 200


async def test_a_webhook_for_an_unknown_training_is_kept_and_applied_on_adoption(
    launch: Launch,
) -> None:
    h = await launch()
    rid = str(uuid.uuid4())
    reply = await h.deliver(ok_body(rid), rid)
    assert reply.status_code == 200
    assert h.counted("unknown_training") == 1
    (receipt,) = await h.receipts(rid)
    assert (receipt["verification"], receipt["outcome"], receipt["processed"]) == (
        "verified",
        "unknown_training",
        False,
    )
    await h.track(rid)  # adopted: the stored webhook is applied at once
    view = await h.training(rid)
    assert (view.status, view.result_layer, view.lora_url) == (
        "COMPLETED",
        "webhook",
        lora_url(rid),
    )
    assert [r["processed"] for r in await h.receipts(rid)] == [True]


async def test_unsigned_bodies_are_accepted_when_verification_is_off(launch: Launch) -> None:
    h = await launch(webhook={"verify_signatures": False})
    rid = await h.track()
    assert (await h.post(ok_body(rid))).status_code == 200
    assert (await h.training(rid)).status == "COMPLETED"
    (receipt,) = await h.receipts(rid)
    assert (receipt["verification"], receipt["outcome"]) == ("skipped", "result")
    # Unsigned bodies are judged by their shape alone, so the shape check must hold up.
    for hostile in (b"[" * 100_000, b'{"request_id": 1}', b"\xff\xfe"):
        assert (await h.post(hostile)).status_code == 400
    assert h.counted("malformed") == 3


# -- hostile input --------------------------------------------------------------------------
HEX = "0123456789abcdef"
EXAMPLES_PER_KIND = 5
BENIGN_NAMES = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20).map(
    lambda s: "x-junk-" + s
)
PRINTABLE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60)
CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "application/json",
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
        ]
    ),
    PRINTABLE,
)


@dataclass(frozen=True)
class Probe:
    """One request: ``kind`` says how it departs from a valid webhook (``valid``: it does
    not; it is then for a training nobody knows, so that it changes no training either)."""

    kind: str
    target: int  # which known training it claims to be for
    detail: Any = None
    content_type: str | None = None
    junk: tuple[tuple[str, str], ...] = ()


def _details(known: int) -> dict[str, st.SearchStrategy[Any]]:
    names = st.sampled_from(signing.REQUIRED_HEADERS)
    return {
        "valid": st.uuids().map(str),
        "random_body": st.tuples(st.binary(max_size=600), st.booleans()),
        "truncated": st.tuples(st.floats(0, 1, exclude_max=True), st.booleans()),
        "replayed": st.tuples(st.integers(301, 10**9), st.booleans()),
        "repeated_header": st.tuples(names, st.one_of(st.none(), PRINTABLE)),
        "long_header": st.tuples(names, st.integers(layer.MAX_HEADER_CHARS, 3000)),
        "dropped_header": names,
        "bad_signature": st.one_of(PRINTABLE, st.text(HEX, min_size=128, max_size=128)),
        "other_training": st.integers(1, known - 1),
        "method": st.sampled_from(["GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"]),
        "raw_junk_header": st.tuples(st.binary(min_size=1, max_size=30), st.binary(max_size=60)),
        "oversized_header": st.integers(17_000, 100_000),
    }


def probes(kind: str, known: int) -> st.SearchStrategy[Probe]:
    """Requests of one ``kind`` for ``known`` trainings, with random extra headers."""
    return st.builds(
        Probe,
        kind=st.just(kind),
        target=st.integers(0, known - 1),
        detail=_details(known)[kind],
        content_type=CONTENT_TYPES,
        junk=st.lists(st.tuples(BENIGN_NAMES, PRINTABLE), max_size=3).map(tuple),
    )


def build_request(probe: Probe, key: Ed25519PrivateKey, rids: list[str], path: str) -> bytes:
    """The raw HTTP/1.1 request of ``probe``, signed now."""
    rid = probe.detail if probe.kind == "valid" else rids[probe.target]
    body = ok_body(rid)
    sign_body, sign_id, method, now = body, rid, "POST", int(time.time())
    extra: list[tuple[bytes, bytes]] = []
    if probe.kind == "random_body":
        body, keep_signature = probe.detail
        sign_body = body if keep_signature else ok_body(rid)
    elif probe.kind == "truncated":
        fraction, over_the_cut = probe.detail
        body = body[: int(len(body) * fraction)]
        sign_body = body if over_the_cut else sign_body
    elif probe.kind == "replayed":
        age, ahead = probe.detail
        now = now + age if ahead else now - age
    elif probe.kind == "other_training":
        sign_id = rids[(probe.target + probe.detail) % len(rids)]
    elif probe.kind == "method":
        method = probe.detail
    headers = signed(key, sign_body, sign_id, timestamp=now)
    if probe.kind == "repeated_header":
        name, value = probe.detail
        extra.append((name.encode(), (headers[name] if value is None else value).encode()))
    elif probe.kind == "long_header":
        name, length = probe.detail  # the value repeated: still digits, or hex digits
        headers[name] = (headers[name] * length)[: length + 1]
    elif probe.kind == "dropped_header":
        del headers[probe.detail]
    elif probe.kind == "bad_signature":
        headers[signing.HEADER_SIGNATURE] = probe.detail
    elif probe.kind == "raw_junk_header":
        headers[signing.HEADER_SIGNATURE] = "00" * 64
        extra.append(probe.detail)
    elif probe.kind == "oversized_header":  # a head this big in one read gets to the app
        headers[signing.HEADER_SIGNATURE] = "00" * 64
        extra.append((b"x-junk", b"j" * probe.detail))
    if probe.content_type is not None:
        headers["Content-Type"] = probe.content_type
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    lines += [f"{k}: {v}".encode() for k, v in (*headers.items(), *probe.junk)]
    lines += [k + b": " + v for k, v in extra]
    lines.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def exchange(address: tuple[str, int], request: bytes) -> int | None:
    """Send one raw request; the status code of the answer, or None if none came."""
    with socket.create_connection(address, timeout=10) as sock:
        with contextlib.suppress(OSError):  # answered and closed before it all went out
            sock.sendall(request)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    status_line = answer.split(b"\r\n", 1)[0].split()
    return int(status_line[1]) if len(status_line) > 1 else None


async def test_hostile_requests_get_4xx_and_change_nothing(launch: Launch) -> None:
    h = await launch()
    rids = [await h.track() for _ in range(3)]
    path = httpx.URL(h.url).path

    def all_untouched() -> bool:
        return all(trio.from_thread.run(h.untouched, rid) for rid in rids)

    def check(probe: Probe) -> None:
        status = exchange(h.address, build_request(probe, h.sim.private_key, rids, path))
        if probe.kind == "valid":
            assert status == 200
        else:
            assert status is not None and 400 <= status < 500, status
        assert all_untouched()

    def every_kind() -> None:  # hypothesis runs here, in a thread; the daemon runs in trio
        for kind in _details(len(rids)):
            examples = hsettings(
                max_examples=EXAMPLES_PER_KIND,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            )
            examples(given(probes(kind, len(rids)))(check))()

    await trio.to_thread.run_sync(every_kind)
    for outcome in ("accepted", "unverified"):
        assert h.counted(outcome) == 0
    # Still serving, and still judging: a genuine webhook goes through.
    assert (await h.deliver(ok_body(rids[0]), rids[0])).status_code == 200
    assert (await h.training(rids[0])).status == "COMPLETED"


# -- slow clients ---------------------------------------------------------------------------
async def test_a_dribbled_body_is_cut_off_while_others_are_served(
    launch: Launch, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layer, "BODY_TIMEOUT_SECONDS", 1.0)
    h = await launch()
    slow, other = await h.track(), await h.track()
    body = ok_body(slow)
    stream = await trio.open_tcp_stream(*h.address)
    answer = b""
    async with stream, trio.open_nursery() as nursery:
        await stream.send_all(h.signed_head(body, slow))
        started = trio.current_time()

        async def dribble() -> None:  # each byte well within hypercorn's per-read timeout
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                for byte in body:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.1)

        nursery.start_soon(dribble)
        await trio.sleep(0.3)
        assert (await h.deliver(ok_body(other), other)).status_code == 200  # not held up
        with trio.fail_after(4), contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some():  # until the listener hangs up
                answer += chunk
        elapsed = trio.current_time() - started
        nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert 1.0 <= elapsed < 3.0
    assert (await h.training(other)).status == "COMPLETED"
    assert await h.untouched(slow)
    assert h.counted("timeout") == 1
    (receipt,) = await h.receipts(slow)
    assert receipt["verification"] == "rejected" and receipt["reject_reason"].startswith(
        "timeout: "
    )


async def test_a_delivery_cut_off_mid_body_leaves_nothing_behind(launch: Launch) -> None:
    h = await launch()
    cut, other = await h.track(), await h.track()
    body = ok_body(cut)
    stream = await trio.open_tcp_stream(*h.address)
    answer = b""
    async with stream:
        await stream.send_all(h.signed_head(body, cut) + body[: len(body) // 2])
        await stream.send_eof()  # the sender gives up half-way
        with trio.fail_after(3):
            while chunk := await stream.receive_some():
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")  # from the HTTP layer: the body is incomplete
    assert (await h.deliver(ok_body(other), other)).status_code == 200
    await trio.sleep(0.2)  # time for a wrongly kept half body to be written
    assert [r["request_id"] for r in await h.receipts()] == [other]
    assert await h.untouched(cut)


# -- a locked database ----------------------------------------------------------------------
async def test_a_locked_database_gets_503_keeps_the_listener_and_shows_on_readyz(
    launch: Launch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 9, item 10): with another process holding SQLite's write lock, the
    webhook layer crashed on "database is locked" (its port refused while it restarted) and
    ``/readyz`` stayed 200. Now a webhook gets 503 (FAL retries), the listener stays, and
    ``/readyz`` answers 503 while the writer is stuck."""
    import sqlite3

    from trainguard import dialect

    monkeypatch.setattr(dialect, "BUSY_TIMEOUT_MS", 300)
    monkeypatch.setattr(layer, "RETRY_SECONDS", 0.1)
    h = await launch()
    assert h.daemon.ops_address is not None
    ready_url = "http://{}:{}/readyz".format(*h.daemon.ops_address)
    rid = await h.track()
    unknown = str(uuid.uuid4())
    assert (await h.client.get(ready_url)).status_code == 200

    holder = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        for _ in range(3):
            reply = await h.deliver(ok_body(rid), rid)
            assert reply.status_code == 503, reply.text
            assert (await h.deliver(ok_body(unknown), unknown)).status_code == 503
            # a refused request is still refused (its forensics copy is best effort)
            assert (await h.post(ok_body(rid), {})).status_code == 400
            assert (await h.client.get(ready_url)).status_code == 503
            await trio.sleep(0.3)  # the retry pass runs against the locked database too
        assert h.counted("unavailable") == 6
        running = h.daemon.layers["webhook"]
        assert running.running
        restarts = h.daemon.metrics.registry.get_sample_value(
            "trainguard_layer_restarts_total", {"layer": "webhook"}
        )
        assert restarts == 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    assert (await h.deliver(ok_body(rid), rid)).status_code == 200
    assert (await h.training(rid)).status == "COMPLETED"

    async def ready() -> bool:
        return (await h.client.get(ready_url)).status_code == 200

    await wait_for(ready, timeout=10.0)


async def test_a_corrected_clock_accepts_genuine_webhooks_at_once(
    launch: Launch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 9, item 3): a daemon whose clock was 10 minutes behind, then
    corrected, refused every genuine webhook as stale until it restarted."""
    from types import SimpleNamespace

    from trainguard import clock as clock_mod

    step = {"by": -600.0}
    monkeypatch.setattr(clock_mod, "time", SimpleNamespace(time=lambda: time.time() + step["by"]))
    h = await launch()
    rid = await h.track()
    reply = await h.deliver(ok_body(rid), rid)
    assert (reply.status_code, h.counted("stale")) == (400, 1)  # our clock is behind
    step["by"] = 0.0  # NTP steps it right
    assert (await h.deliver(ok_body(rid), rid)).status_code == 200
    assert (await h.training(rid)).status == "COMPLETED"


# -- unknown trainings ----------------------------------------------------------------------
async def test_unknown_training_receipts_are_bounded_in_count_and_time(
    launch: Launch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 9, item 6): signed webhooks for request ids we never submitted were
    kept forever. Now the newest ``unknown_receipts_kept`` are kept, each at most
    ``unknown_receipt_seconds``; the rest are evicted and counted."""
    monkeypatch.setattr(layer, "PRUNE_SECONDS", 0.1)
    h = await launch(webhook={"unknown_receipts_kept": 5, "unknown_receipt_seconds": 1.0})
    ids = [str(uuid.uuid4()) for _ in range(8)]
    for rid in ids:
        assert (await h.deliver(ok_body(rid), rid)).status_code == 200
    kept = [r["request_id"] for r in await h.receipts()]
    assert kept == ids[-5:]

    def evicted() -> float:
        value = h.daemon.metrics.registry.get_sample_value(
            "trainguard_webhook_receipts_evicted_total", {"kind": "unknown_training"}
        )
        return value or 0.0

    assert evicted() == 3
    late = await h.track(ids[-1])  # one that arrives within the window is still applied
    assert (await h.training(late)).status == "COMPLETED"

    async def all_expired() -> bool:
        return await h.receipts() == [] or all(r["processed"] for r in await h.receipts())

    await wait_for(all_expired, timeout=10.0)
    assert evicted() == 7  # 3 over the count, 4 past the window


@pytest.mark.parametrize(
    "bounds", [{"unverified_kept": 3}, {"unverified_kept_bytes": 3 * 1200 + 100}]
)
async def test_what_is_kept_unverified_is_bounded_and_the_rest_gets_503(
    launch: Launch, sim: Simulator, monkeypatch: pytest.MonkeyPatch, bounds: dict[str, int]
) -> None:
    """Regression (issue 9, item 8): while the key server was down, 1,000 forged 100 kB
    webhooks got 202 and were stored. Now the first ones are kept (count and bytes bounded),
    the rest get 503 — forged or genuine alike, so the status tells a forger nothing — and
    FAL's retry of a genuine one succeeds once the keys are back."""
    monkeypatch.setattr(layer, "RETRY_SECONDS", 0.2)
    monkeypatch.setattr(layer, "FETCH_RETRY_SECONDS", 0.2)
    sim.faults.jwks_down = True
    h = await launch(webhook=bounds)
    padding = {"padding": "p" * 1000}  # each body about 1.2 kB
    forged_rid = await h.track()
    statuses = []
    for n in range(6):
        body = _body(forged_rid, status="OK", payload={"n": n, **padding})
        statuses.append((await h.post(body, _other_key(h, body, forged_rid))).status_code)
    real = await h.track()
    genuine = _body(real, status="OK", payload={**json.loads(ok_body(real))["payload"], **padding})
    statuses.append((await h.deliver(genuine, real)).status_code)
    assert statuses == [202, 202, 202, 503, 503, 503, 503]
    assert (h.counted("unverified"), h.counted("unverified_full")) == (3, 4)
    assert len(await h.receipts()) == 3
    assert await h.untouched(real)

    sim.faults.jwks_down = False

    async def settled() -> bool:
        return all(r["processed"] for r in await h.receipts())

    await wait_for(settled)
    assert (await h.deliver(genuine, real)).status_code == 200  # FAL's retry
    assert (await h.training(real)).status == "COMPLETED"
    assert await h.untouched(forged_rid)


# -- refused requests -----------------------------------------------------------------------
async def test_a_refused_body_is_kept_as_a_prefix_and_digest_within_a_byte_cap(
    launch: Launch,
) -> None:
    """Regression (issue 9, item 7): each refused request kept its whole body (up to 1 MiB),
    so garbage grew the database without bound. Now only the first 4 KiB and the digest of
    the whole body are kept, and the kept bytes are capped too."""

    from trainguard.inbox import REFUSED_BODY_KEPT

    h = await launch(webhook={"rejected_kept_bytes": 2 * REFUSED_BODY_KEPT + 100})
    rid = await h.track()
    bodies = [_body(rid, status="OK", payload={"n": n, "junk": "j" * 900_000}) for n in range(4)]
    for body in bodies:
        assert (await h.post(body, _other_key(h, body, rid))).status_code == 401

    def kept(conn: Any) -> list[tuple[int, int | None, str | None]]:
        query = WebhookReceipt.select().order_by(WebhookReceipt.id)
        return [(len(bytes(r.body)), r.body_size, r.body_sha256) for r in query]

    rows = await h.store.read(kept)
    assert rows == [
        (REFUSED_BODY_KEPT, len(body), hashlib.sha256(body).hexdigest()) for body in bodies[-2:]
    ]
    assert h.counted("bad_signature") == 4
    assert await h.untouched(rid)


async def test_refused_requests_beyond_the_writes_in_flight_are_answered_not_kept(
    launch: Launch, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layer, "REFUSED_KEPT_IN_FLIGHT", 0)
    h = await launch()
    rid = await h.track()
    body = ok_body(rid)
    assert (await h.post(body, _other_key(h, body, rid))).status_code == 401
    assert await h.receipts() == []
    dropped = h.daemon.metrics.registry.get_sample_value(
        "trainguard_webhook_receipts_evicted_total", {"kind": "rejected_not_kept"}
    )
    assert dropped == 1


async def test_one_stored_receipt_that_cannot_be_applied_never_holds_back_the_others(
    launch: Launch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored webhook whose apply keeps failing (say FAL's output holds text the database
    cannot take) must not stop the retry of the ones stored after it, nor the layer."""
    from trainguard.reconcile import Reconciler

    monkeypatch.setattr(layer, "RETRY_SECONDS", 0.1)
    failing: set[str] = set()
    real_apply = Reconciler._apply

    def apply(self: Reconciler, conn: Any, obs: Any, now: float) -> Any:
        if obs.request_id in failing:
            raise ValueError("cannot store this output")
        return real_apply(self, conn, obs, now)

    monkeypatch.setattr(Reconciler, "_apply", apply)
    h = await launch()
    poison, good = await h.track(), await h.track()
    failing |= {poison, good}
    for rid in (poison, good):
        assert (await h.deliver(ok_body(rid), rid)).status_code == 200  # stored, not applied
    failing.discard(good)

    async def applied() -> bool:
        return (await h.training(good)).status == "COMPLETED"

    await wait_for(applied)
    assert await h.untouched(poison)
    assert h.daemon.layers["webhook"].running


async def test_a_refused_request_keeps_only_fals_four_headers(launch: Launch) -> None:
    """Made-up ``X-Fal-Webhook-*`` headers (up to the server's header limit) would bypass the
    4 KiB body prefix; a refused request keeps only FAL's four."""
    h = await launch()
    rid = await h.track()
    body = ok_body(rid)
    junk = {f"X-Fal-Webhook-Junk-{i}": "j" * 200 for i in range(40)}
    assert (await h.post(body, {**_other_key(h, body, rid), **junk})).status_code == 401

    def kept_headers(conn: Any) -> list[dict[str, str]]:
        return [json.loads(r.headers_json) for r in WebhookReceipt.select()]

    (headers,) = await h.store.read(kept_headers)
    assert set(headers) == {
        n.lower()
        for n in (
            signing.HEADER_REQUEST_ID,
            signing.HEADER_USER_ID,
            signing.HEADER_TIMESTAMP,
            signing.HEADER_SIGNATURE,
        )
    }
