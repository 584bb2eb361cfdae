"""The FAL simulator against fal-api.md, over real HTTP on loopback."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from trainguard import signing
from trainguard.testing.simulator import (
    LORA_FILE_SIZE,
    OUTCOMES,
    PAYLOAD_ERROR_TEXT,
    Faults,
    SimConfig,
    Simulator,
    parse_fault,
)

FAST = "fal-ai/flux-lora-fast-training"
PORTRAIT = "fal-ai/flux-lora-portrait-trainer"
PRO = "fal-ai/flux-pro-trainer"
AUTH = {"Authorization": "Key test-key"}
IMAGES = {"images_data_url": "https://example.invalid/images.zip"}
PRO_INPUT = {"data_url": "https://example.invalid/d.zip", "finetune_comment": "ann"}
RETRIES = (0.05, 0.05, 0.05)


def _config(**overrides: Any) -> SimConfig:
    settings: dict[str, Any] = {
        "queue_seconds": 0.1,
        "run_seconds": 0.2,
        "webhook_retry_delays": RETRIES,
        "seed": 7,
    }
    settings.update(overrides)
    return SimConfig(**settings)


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """A webhook endpoint: records every POST, answers with scripted codes (then 200).

    With ``keys`` set it also verifies signatures and answers 401 to a bad one.
    """

    def __init__(self) -> None:
        self.answers: list[int] = []
        self.keys: list[Ed25519PublicKey] | None = None
        self.deliveries: list[Delivery] = []
        self._send, self._receive = trio.open_memory_channel[Delivery](math.inf)
        self.url = ""

    async def app(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()  # startup
            await send({"type": "lifespan.startup.complete"})
            await receive()  # shutdown
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        delivery = Delivery({k.decode(): v.decode() for k, v in scope["headers"]}, body)
        self.deliveries.append(delivery)
        self._send.send_nowait(delivery)
        status = self.answers.pop(0) if self.answers else 200
        if self.keys is not None:
            try:
                signing.verify_webhook(delivery.headers, body, self.keys, now=time.time())
            except signing.WebhookRejected:
                status = 401
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        config = hypercorn.config.Config()
        config.bind = ["127.0.0.1:0"]
        config.errorlog = None
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(hypercorn.trio.serve, self.app, config)
            self.url = f"{binds[0]}/webhook"
            task_status.started(self.url)

    async def next(self, within: float = 3.0) -> Delivery:
        with trio.fail_after(within):
            return await self._receive.receive()


@pytest.fixture
async def sim(nursery: trio.Nursery) -> Simulator:
    simulator = Simulator(_config())
    await nursery.start(simulator.serve)
    return simulator


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> Receiver:
    hook = Receiver()
    await nursery.start(hook.serve)
    return hook


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(headers=AUTH, timeout=5) as http:
        yield http


async def _submit(
    client: httpx.AsyncClient,
    sim: Simulator,
    endpoint: str = FAST,
    payload: dict[str, Any] | None = None,
    webhook: str | None = None,
) -> dict[str, Any]:
    params = {"fal_webhook": webhook} if webhook else None
    answer = await client.post(
        f"{sim.base_url}/{endpoint}", json=IMAGES if payload is None else payload, params=params
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


async def _wait_completed(client: httpx.AsyncClient, status_url: str) -> dict[str, Any]:
    with trio.fail_after(3):
        while True:
            answer = await client.get(status_url, params={"logs": 1})
            if answer.status_code == 200:
                assert answer.json()["status"] == "COMPLETED"
                return answer.json()
            assert answer.status_code == 202
            await trio.sleep(0.02)


async def _eventually(predicate: Callable[[], bool]) -> None:
    for _ in range(150):
        if predicate():
            return
        await trio.sleep(0.02)
    raise AssertionError("condition not reached within 3 s")


async def _jwks_keys(client: httpx.AsyncClient, sim: Simulator) -> list[Ed25519PublicKey]:
    answer = await client.get(sim.jwks_url)
    assert answer.status_code == 200
    return signing.parse_jwks(answer.json())


async def test_submit_answer_and_subpath_rule(sim: Simulator, client: httpx.AsyncClient) -> None:
    submitted = await _submit(client, sim, f"{FAST}/some/subpath")
    request_id = submitted["request_id"]
    assert uuid.UUID(request_id).version == 4
    base = f"{sim.base_url}/{FAST}/requests/{request_id}"
    assert submitted["response_url"] == base
    assert submitted["status_url"] == f"{base}/status"
    assert submitted["cancel_url"] == f"{base}/cancel"
    assert submitted["gateway_request_id"] == request_id
    assert submitted["queue_position"] == 0
    assert sim.truth[request_id].endpoint == f"{FAST}/some/subpath"
    # Status under the subpath is not a route: the well-known mistake gets a 404.
    wrong = f"{sim.base_url}/{FAST}/some/subpath/requests/{request_id}/status"
    assert (await client.get(wrong)).status_code == 404
    # The same id under another app is unknown too.
    other = f"{sim.base_url}/{PRO}/requests/{request_id}/status"
    assert (await client.get(other)).status_code == 404
    # A second submission while the first is queued stands behind it.
    assert (await _submit(client, sim))["queue_position"] == 1


async def test_submit_answers_carry_the_request_id_header(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    answer = await client.post(f"{sim.base_url}/{FAST}", json=IMAGES)
    assert answer.status_code == 200
    assert answer.headers["x-fal-request-id"] == answer.json()["request_id"]


async def test_the_pro_trainer_refuses_a_submit_without_its_required_fields(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    for payload, absent in (
        ({"data_url": "https://example.invalid/d.zip"}, ["finetune_comment"]),
        ({"finetune_comment": "ann"}, ["data_url"]),
        ({}, ["data_url", "finetune_comment"]),
    ):
        answer = await client.post(f"{sim.base_url}/{PRO}", json=payload)
        assert answer.status_code == 422
        assert answer.json() == {
            "detail": [
                {"loc": ["body", name], "msg": "field required", "type": "value_error.missing"}
                for name in absent
            ]
        }
    assert sim.truth == {}  # nothing queued
    assert sim.stats[("submit", 422)] == 3
    accepted = await _submit(client, sim, PRO, PRO_INPUT)
    assert sim.truth[accepted["request_id"]].input == PRO_INPUT


async def _events(client: httpx.AsyncClient, url: str, **params: Any) -> list[dict[str, Any]]:
    """The ``data:`` objects of a server-sent event stream, read to its end."""
    events = []
    with trio.fail_after(5):
        async with client.stream("GET", url, params=params) as answer:
            assert answer.status_code == 200
            assert answer.headers["content-type"] == "text/event-stream"
            async for line in answer.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line.removeprefix("data: ")))
                else:
                    assert line == ""  # events are separated by a blank line
    return events


async def test_status_stream_sends_each_change_until_completed(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    first = await _submit(client, sim)
    second = await _submit(client, sim)  # queued behind the first
    stream_url = f"{second['status_url']}/stream"
    events = await _events(client, stream_url)
    statuses = [e["status"] for e in events]
    assert statuses[0] == "IN_QUEUE" and statuses[-1] == "COMPLETED"
    assert statuses.count("COMPLETED") == 1 and "IN_PROGRESS" in statuses
    positions = [e["queue_position"] for e in events if e["status"] == "IN_QUEUE"]
    assert positions[0] == 1 and positions == sorted(positions, reverse=True)
    assert len(events) == len({json.dumps(e, sort_keys=True) for e in events})  # only changes
    assert all(e["request_id"] == second["request_id"] for e in events)
    assert events[-1] == (await client.get(second["status_url"])).json()  # the same object
    # With logs: the log lines grow from event to event, ending as the status route's.
    with_logs = await _events(client, f"{first['status_url']}/stream", logs=1)
    assert [e["status"] for e in with_logs] == ["COMPLETED"]  # already done: one event
    completed = (await client.get(first["status_url"], params={"logs": 1})).json()
    assert with_logs[-1]["logs"] == completed["logs"]
    unknown = f"{sim.base_url}/{FAST}/requests/{uuid.uuid4()}/status/stream"
    assert (await client.get(unknown)).status_code == 404
    async with httpx.AsyncClient(timeout=5) as bare:
        assert (await bare.get(stream_url)).status_code == 401


async def test_status_stream_of_a_never_ending_training_stops_when_the_client_leaves(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    stuck = await _submit(client, sim, payload={**IMAGES, "sim_outcome": "never"})
    url = httpx.URL(f"{stuck['status_url']}/stream")
    received = b""
    with trio.fail_after(5):  # a bare socket: read two events, then hang up mid-stream
        async with await trio.open_tcp_stream(url.host, url.port or 80) as conn:
            await conn.send_all(
                f"GET {url.raw_path.decode()} HTTP/1.1\r\nHost: {url.netloc.decode()}\r\n"
                f"Authorization: {AUTH['Authorization']}\r\n\r\n".encode()
            )
            while received.count(b"}\n\n") < 2:  # two whole events (in HTTP chunks)
                received += await conn.receive_some(65536)
            assert sim.open_streams == 1
    seen = [
        json.loads(line[6:])["status"] for line in received.split(b"\n") if line[:6] == b"data: "
    ]
    assert seen == ["IN_QUEUE", "IN_PROGRESS"]
    await _eventually(lambda: sim.open_streams == 0)  # the simulator stopped sending


async def test_auth_required_and_unknown_routes(sim: Simulator) -> None:
    async with httpx.AsyncClient(timeout=5) as bare:
        for headers in ({}, {"Authorization": "Bearer x"}, {"Authorization": "Key"}):
            answer = await bare.post(f"{sim.base_url}/{FAST}", json=IMAGES, headers=headers)
            assert answer.status_code == 401
            assert "detail" in answer.json()
        assert sim.truth == {}
        assert (await bare.get(f"{sim.base_url}/nothing/here")).status_code == 404
        # JWKS is public: no key needed.
        assert (await bare.get(sim.jwks_url)).status_code == 200
    assert sim.stats[("submit", 401)] == 3
    assert sim.stats[("unknown", 404)] == 1


async def test_status_flow_logs_and_result(sim: Simulator, client: httpx.AsyncClient) -> None:
    submitted = await _submit(client, sim, payload={**IMAGES, "steps": 500})
    status_url, response_url = submitted["status_url"], submitted["response_url"]

    queued = await client.get(status_url)
    assert queued.status_code == 202
    assert queued.json()["status"] == "IN_QUEUE"
    assert queued.json()["queue_position"] == 0
    assert queued.json()["logs"] is None
    early = await client.get(response_url)
    assert early.status_code == 400
    assert early.json()["detail"] == "Request is still in progress"

    await trio.sleep(0.2)  # queue 0.1 s, then half of the 0.2 s run
    running = await client.get(status_url, params={"logs": 1})
    assert running.status_code == 202
    assert running.json()["status"] == "IN_PROGRESS"
    logs = running.json()["logs"]
    assert 1 <= len(logs) < 10
    assert set(logs[0]) == {"message", "level", "source", "timestamp"}
    assert logs[0]["message"] == "step 50/500" and logs[0]["level"] == "INFO"
    assert (await client.get(status_url, params={"logs": 0})).json()["logs"] is None
    assert (await client.get(response_url)).status_code == 400

    done = await _wait_completed(client, status_url)
    assert len(done["logs"]) > len(logs)
    assert [entry["message"] for entry in done["logs"][-2:]] == [
        "step 500/500",
        "Training completed",
    ]
    assert done["metrics"]["inference_time"] == pytest.approx(0.2)
    assert "error" not in done
    result = await client.get(response_url)
    assert result.status_code == 200
    assert result.json() == sim.truth[submitted["request_id"]].output
    assert sim.stats[("status", 202)] >= 3 and sim.stats[("result", 200)] == 1


async def test_outputs_per_trainer_and_files(sim: Simulator, client: httpx.AsyncClient) -> None:
    fast = await _submit(client, sim, FAST)
    portrait = await _submit(client, sim, PORTRAIT)
    pro = await _submit(client, sim, PRO, {**PRO_INPUT, "data_url": "https://example.invalid/d"})
    for submitted in (fast, portrait, pro):
        await _wait_completed(client, submitted["status_url"])

    fast_out = (await client.get(fast["response_url"])).json()
    assert set(fast_out) == {"diffusers_lora_file", "config_file", "debug_preprocessed_output"}
    assert fast_out["debug_preprocessed_output"] is None
    portrait_out = (await client.get(portrait["response_url"])).json()
    assert set(portrait_out) == {"diffusers_lora_file", "config_file"}
    pro_out = (await client.get(pro["response_url"])).json()
    assert set(pro_out) == {"finetune_id"}
    uuid.UUID(pro_out["finetune_id"])

    lora = portrait_out["diffusers_lora_file"]
    assert lora["file_name"] == "pytorch_lora_weights.safetensors"
    assert lora["url"] == (
        f"{sim.base_url}/files/{portrait['request_id']}/pytorch_lora_weights.safetensors"
    )
    assert lora["file_size"] == LORA_FILE_SIZE
    for file in (lora, portrait_out["config_file"]):
        got = await client.get(file["url"])
        assert got.status_code == 200
        assert len(got.content) == file["file_size"]
        assert got.headers["content-type"] == file["content_type"]
        assert (await client.get(file["url"])).content == got.content  # deterministic
        head = await client.head(file["url"])
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == file["file_size"]
    config = json.loads((await client.get(portrait_out["config_file"]["url"])).content)
    assert config["steps"] == 2500 and config["endpoint"] == PORTRAIT
    # Another training's files are different bytes; unknown ones are 404.
    fast_lora = await client.get(fast_out["diffusers_lora_file"]["url"])
    assert fast_lora.content != (await client.get(lora["url"])).content
    unknown = f"{sim.base_url}/files/{uuid.uuid4()}/pytorch_lora_weights.safetensors"
    assert (await client.get(unknown)).status_code == 404
    assert (await client.head(unknown)).status_code == 404


async def test_files_not_served_before_completion(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    submitted = await _submit(client, sim, payload={**IMAGES, "sim_outcome": "ok"})
    output = sim.truth[submitted["request_id"]].output
    assert output is not None
    assert (await client.get(output["diffusers_lora_file"]["url"])).status_code == 404
    await _wait_completed(client, submitted["status_url"])
    assert (await client.get(output["diffusers_lora_file"]["url"])).status_code == 200


async def test_webhook_verifies_with_published_keys(
    sim: Simulator, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    submitted = await _submit(client, sim, PORTRAIT, webhook=receiver.url)
    delivery = await receiver.next()
    truth = sim.truth[submitted["request_id"]]
    assert delivery.json() == {
        "request_id": truth.request_id,
        "gateway_request_id": truth.request_id,
        "status": "OK",
        "payload": truth.output,
    }
    keys = await _jwks_keys(client, sim)
    signing.verify_webhook(delivery.headers, delivery.body, keys, now=time.time())
    assert delivery.headers["x-fal-webhook-request-id"] == truth.request_id
    flipped = bytearray(delivery.body)
    flipped[len(flipped) // 2] ^= 0x20
    with pytest.raises(signing.WebhookRejected) as caught:
        signing.verify_webhook(delivery.headers, bytes(flipped), keys, now=time.time())
    assert caught.value.code == "bad_signature"
    await _eventually(lambda: truth.webhook_acks == 1)
    assert truth.webhook_attempts == 1
    assert truth.webhook_signatures == ["good"]
    # No fal_webhook, no delivery: the input's webhook_url does nothing.
    await _submit(client, sim, payload={**IMAGES, "webhook_url": receiver.url})
    await trio.sleep(0.5)
    assert len(receiver.deliveries) == 1


async def test_gateway_id_header_knob(nursery: trio.Nursery, receiver: Receiver) -> None:
    sim = Simulator(_config(faults=Faults(gateway_id_header=1.0)))
    await nursery.start(sim.serve)
    async with httpx.AsyncClient(headers=AUTH, timeout=5) as client:
        submitted = await _submit(client, sim, PORTRAIT, webhook=receiver.url)
        keys = await _jwks_keys(client, sim)
    request_id, gateway_id = submitted["request_id"], submitted["gateway_request_id"]
    assert gateway_id != request_id and uuid.UUID(gateway_id).version == 4
    delivery = await receiver.next()
    assert delivery.json()["request_id"] == request_id
    assert delivery.json()["gateway_request_id"] == gateway_id
    assert delivery.headers["x-fal-webhook-request-id"] == gateway_id
    signing.verify_webhook(delivery.headers, delivery.body, keys, now=time.time())


async def test_failed_training(
    sim: Simulator, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    submitted = await _submit(
        client, sim, payload={**IMAGES, "sim_outcome": "fail"}, webhook=receiver.url
    )
    done = await _wait_completed(client, submitted["status_url"])
    assert done["logs"][-1]["level"] == "ERROR"
    result = await client.get(submitted["response_url"])
    assert result.status_code == 422
    detail = result.json()["detail"]
    assert isinstance(detail, list) and detail[0]["loc"][0] == "body"
    delivery = await receiver.next()
    assert delivery.json() == {
        "request_id": submitted["request_id"],
        "gateway_request_id": submitted["request_id"],
        "status": "ERROR",
        "error": "Invalid status code: 422",
        "payload": {"detail": detail},
    }
    truth = sim.truth[submitted["request_id"]]
    assert truth.outcome == "fail" and truth.output is None


async def test_missing_required_field_fails_like_the_runner(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    submitted = await _submit(client, sim, PORTRAIT, {"trigger_phrase": "tok"})
    await _wait_completed(client, submitted["status_url"])
    result = await client.get(submitted["response_url"])
    assert result.status_code == 422
    assert result.json()["detail"][0]["loc"] == ["body", "images_data_url"]
    assert result.json()["detail"][0]["msg"] == "field required"


async def test_failure_on_status_is_optional(client: httpx.AsyncClient) -> None:
    """Some failed trainings carry error on COMPLETED, some do not (seeded)."""
    simulator = Simulator(_config(queue_seconds=0, run_seconds=0))
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.serve)
        shown = set()
        for _ in range(12):
            submitted = await _submit(client, simulator, payload={**IMAGES, "sim_outcome": "fail"})
            done = await _wait_completed(client, submitted["status_url"])
            shown.add(done.get("error"))
        nursery.cancel_scope.cancel()
    assert shown == {None, "Invalid status code: 422"}


async def test_webhook_retried_then_acknowledged(
    sim: Simulator, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.answers = [500, 503]
    submitted = await _submit(client, sim, webhook=receiver.url)
    bodies = [(await receiver.next()).body for _ in range(3)]
    assert bodies[0] == bodies[1] == bodies[2]
    truth = sim.truth[submitted["request_id"]]
    await _eventually(lambda: truth.webhook_acks == 1)
    assert (truth.webhook_attempts, truth.webhook_gave_up) == (3, False)


async def test_webhook_given_up_after_all_retries(
    sim: Simulator, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.answers = [500] * 10
    submitted = await _submit(client, sim, webhook=receiver.url)
    truth = sim.truth[submitted["request_id"]]
    await _eventually(lambda: truth.webhook_gave_up)
    assert truth.webhook_attempts == len(RETRIES) + 1 == len(receiver.deliveries)
    assert truth.webhook_acks == 0


async def test_webhook_to_a_closed_port_is_retried(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        closed_url = f"http://127.0.0.1:{probe.getsockname()[1]}/hook"
    submitted = await _submit(client, sim, webhook=closed_url)
    truth = sim.truth[submitted["request_id"]]
    await _eventually(lambda: truth.webhook_gave_up)
    assert truth.webhook_attempts == len(RETRIES) + 1


async def test_duplicate_webhook(
    sim: Simulator, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    sim.faults.duplicate_webhook = 1.0
    submitted = await _submit(client, sim, webhook=receiver.url)
    first, second = await receiver.next(), await receiver.next()
    assert first.body == second.body
    assert first.json()["request_id"] == submitted["request_id"]
    keys = await _jwks_keys(client, sim)
    for delivery in (first, second):
        signing.verify_webhook(delivery.headers, delivery.body, keys, now=time.time())
    truth = sim.truth[submitted["request_id"]]
    await _eventually(lambda: truth.webhook_acks == 2)
    assert truth.webhook_attempts == 2


async def test_drop_webhook(sim: Simulator, client: httpx.AsyncClient, receiver: Receiver) -> None:
    sim.faults.drop_webhook = 1.0
    submitted = await _submit(client, sim, webhook=receiver.url)
    await _wait_completed(client, submitted["status_url"])
    await trio.sleep(0.2)
    truth = sim.truth[submitted["request_id"]]
    assert receiver.deliveries == []
    assert truth.webhook_dropped and truth.webhook_attempts == 0
    # The result is still there for a poller to find.
    assert (await client.get(submitted["response_url"])).json() == truth.output


async def test_bad_signature_then_good_after_runtime_flip(
    sim: Simulator, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.keys = await _jwks_keys(client, sim)
    sim.faults.bad_signature = 1.0
    submitted = await _submit(client, sim, webhook=receiver.url)
    rejected = await receiver.next()
    with pytest.raises(signing.WebhookRejected) as caught:
        signing.verify_webhook(rejected.headers, rejected.body, receiver.keys, now=time.time())
    assert caught.value.code == "bad_signature"
    sim.faults.bad_signature = 0.0
    accepted = await receiver.next()
    assert accepted.body == rejected.body
    signing.verify_webhook(accepted.headers, accepted.body, receiver.keys, now=time.time())
    truth = sim.truth[submitted["request_id"]]
    await _eventually(lambda: truth.webhook_acks == 1)
    assert truth.webhook_signatures == ["bad", "good"]


async def test_delayed_webhooks_arrive_out_of_order(
    sim: Simulator, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    sim.faults.delay_webhook_seconds = 1.0
    submitted = [(await _submit(client, sim, webhook=receiver.url))["request_id"] for _ in range(6)]
    arrived = [(await receiver.next(within=3)).json()["request_id"] for _ in range(6)]
    assert sorted(arrived) == sorted(submitted)
    assert arrived != submitted


async def test_missing_lora(sim: Simulator, client: httpx.AsyncClient, receiver: Receiver) -> None:
    sim.faults.missing_lora = 1.0
    fast = await _submit(client, sim, FAST, webhook=receiver.url)
    pro = await _submit(client, sim, PRO, {**PRO_INPUT, "sim_outcome": "no_lora"})
    await _wait_completed(client, fast["status_url"])
    await _wait_completed(client, pro["status_url"])

    fast_out = (await client.get(fast["response_url"])).json()
    assert "diffusers_lora_file" not in fast_out and "config_file" in fast_out
    assert sim.truth[fast["request_id"]].outcome == "no_lora"
    lora_url = f"{sim.base_url}/files/{fast['request_id']}/pytorch_lora_weights.safetensors"
    assert (await client.get(lora_url)).status_code == 404
    assert (await client.get(fast_out["config_file"]["url"])).status_code == 200
    assert (await client.get(pro["response_url"])).json() == {}
    delivery = await receiver.next()
    assert delivery.json()["status"] == "OK" and delivery.json()["payload"] == fast_out


async def test_payload_error(sim: Simulator, client: httpx.AsyncClient, receiver: Receiver) -> None:
    submitted = await _submit(
        client, sim, payload={**IMAGES, "sim_outcome": "payload_error"}, webhook=receiver.url
    )
    delivery = (await receiver.next()).json()
    assert delivery["status"] == "OK"
    assert delivery["payload"] is None
    assert delivery["payload_error"] == PAYLOAD_ERROR_TEXT
    result = await client.get(submitted["response_url"])
    assert result.status_code == 200
    assert "diffusers_lora_file" in result.json()
    assert result.json() == sim.truth[submitted["request_id"]].output


async def test_never_finish_then_cancel(
    sim: Simulator, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    sim.faults.never_finish = 1.0
    submitted = await _submit(client, sim, webhook=receiver.url)
    truth = sim.truth[submitted["request_id"]]
    assert truth.outcome == "never" and truth.completed_at is None
    await trio.sleep(0.6)  # twice the whole planned duration
    status = await client.get(submitted["status_url"], params={"logs": 1})
    assert status.status_code == 202 and status.json()["status"] == "IN_PROGRESS"
    assert status.json()["logs"][-1]["message"] == "step 900/1000"
    assert (await client.get(submitted["response_url"])).status_code == 400
    assert receiver.deliveries == []

    cancelled = await client.put(submitted["cancel_url"])
    assert (cancelled.status_code, cancelled.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    done = await _wait_completed(client, submitted["status_url"])
    assert done["error_type"] == "client_cancelled"
    result = await client.get(submitted["response_url"])
    assert result.status_code == 499
    assert result.json()["error_type"] == result.headers["x-fal-error-type"] == "client_cancelled"
    delivery = (await receiver.next()).json()
    assert delivery["status"] == "ERROR" and delivery["error"] == "Invalid status code: 499"
    assert truth.outcome == "cancelled" and truth.output is None


async def test_cancel_rules(sim: Simulator, client: httpx.AsyncClient) -> None:
    # fal-api.md, cancel: "A queued request is removed".
    queued = await _submit(client, sim, webhook=None)
    answer = await client.put(queued["cancel_url"])
    assert (answer.status_code, answer.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    assert (await client.get(queued["status_url"])).status_code == 404
    assert (await client.get(queued["response_url"])).status_code == 404
    again = await client.put(queued["cancel_url"])
    assert (again.status_code, again.json()) == (404, {"status": "NOT_FOUND"})
    truth = sim.truth[queued["request_id"]]
    assert (truth.outcome, truth.cancel_requested, truth.cancel_ignored) == (
        "cancelled",
        True,
        False,
    )

    finished = await _submit(client, sim)
    await _wait_completed(client, finished["status_url"])
    late = await client.put(finished["cancel_url"])
    assert (late.status_code, late.json()) == (400, {"status": "ALREADY_COMPLETED"})
    assert sim.truth[finished["request_id"]].outcome == "ok"

    unknown = f"{sim.base_url}/{FAST}/requests/{uuid.uuid4()}/cancel"
    gone = await client.put(unknown)
    assert (gone.status_code, gone.json()) == (404, {"status": "NOT_FOUND"})
    for suffix in ("", "/status"):
        missing = f"{sim.base_url}/{FAST}/requests/{uuid.uuid4()}{suffix}"
        assert (await client.get(missing)).status_code == 404


async def test_result_expiry(sim: Simulator, client: httpx.AsyncClient) -> None:
    sim.faults.result_expiry_seconds = 0.3
    submitted = await _submit(client, sim)
    await _wait_completed(client, submitted["status_url"])
    result = await client.get(submitted["response_url"])
    assert result.status_code == 200
    lora_url = result.json()["diffusers_lora_file"]["url"]
    assert (await client.get(lora_url)).status_code == 200
    await trio.sleep(0.35)
    assert (await client.get(submitted["response_url"])).status_code == 404
    assert (await client.get(submitted["status_url"])).status_code == 404
    assert (await client.get(lora_url)).status_code == 404
    assert (await client.head(lora_url)).status_code == 404
    assert (await client.put(submitted["cancel_url"])).json() == {"status": "NOT_FOUND"}
    # Expiry is a live knob: turning it off brings the stored result back.
    sim.faults.result_expiry_seconds = None
    assert (await client.get(submitted["response_url"])).status_code == 200


async def test_api_error_rate(sim: Simulator, client: httpx.AsyncClient) -> None:
    """fal-api.md, transient: 429 with Retry-After and untyped gateway pages, never fal's
    typed errors (those are final on a finished request's result)."""
    submitted = await _submit(client, sim)
    sim.faults.api_error_rate = 1.0
    codes = []
    for _ in range(40):
        answer = await client.get(submitted["status_url"])
        codes.append(answer.status_code)
        if answer.status_code == 429:
            assert int(answer.headers["retry-after"]) >= 1
            continue
        assert "x-fal-error-type" not in answer.headers
        kind = answer.headers["content-type"]
        assert kind in ("text/html", "text/plain"), kind
        if answer.status_code == 503:
            assert (kind, answer.text) == ("text/plain", "Service Unavailable")
        else:
            assert kind == "text/html"
            assert ("Bad Gateway" if answer.status_code == 502 else "Time-out") in answer.text
    assert set(codes) == {429, 502, 503, 504}
    sim.faults.api_error_rate = 0.0
    assert (await client.get(submitted["status_url"])).status_code in (200, 202)


async def test_api_errors_are_reproducible(client: httpx.AsyncClient) -> None:
    sequences = []
    for _ in range(2):
        simulator = Simulator(_config(faults=Faults(api_error_rate=0.5), seed=3))
        async with trio.open_nursery() as nursery:
            await nursery.start(simulator.serve)
            url = f"{simulator.base_url}/{FAST}/requests/{uuid.uuid4()}/status"
            sequences.append([(await client.get(url)).status_code for _ in range(20)])
            nursery.cancel_scope.cancel()
    assert sequences[0] == sequences[1]
    assert 404 in sequences[0] and len(set(sequences[0])) > 2


async def test_outcome_draws_are_seeded(client: httpx.AsyncClient) -> None:
    runs = []
    for _ in range(2):
        faults = Faults(fail_training=0.3, missing_lora=0.3, payload_error=0.2)
        simulator = Simulator(_config(faults=faults, seed=11))
        async with trio.open_nursery() as nursery:
            await nursery.start(simulator.serve)
            for _ in range(15):
                await _submit(client, simulator)
            runs.append([truth.outcome for truth in simulator.truth.values()])
            nursery.cancel_scope.cancel()
    assert runs[0] == runs[1]
    assert {"ok", "fail", "no_lora", "payload_error"} <= set(runs[0])


async def test_sim_outcome_override_and_validation(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    sim.faults.fail_training = 1.0
    for outcome in OUTCOMES:
        submitted = await _submit(client, sim, payload={**IMAGES, "sim_outcome": outcome})
        assert sim.truth[submitted["request_id"]].outcome == outcome
    bad = await client.post(f"{sim.base_url}/{FAST}", json={"sim_outcome": "maybe"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["body", "sim_outcome"]
    not_json = await client.post(f"{sim.base_url}/{FAST}", content=b"[1, 2")
    assert not_json.status_code == 422


async def test_api_timeout(sim: Simulator, client: httpx.AsyncClient) -> None:
    submitted = await _submit(client, sim)
    sim.faults.api_timeout_rate = 1.0
    sim.faults.api_timeout_seconds = 0.3
    with pytest.raises(httpx.ReadTimeout):
        await client.get(submitted["status_url"], timeout=0.1)
    started = trio.current_time()
    answer = await client.get(submitted["status_url"], timeout=2)
    assert trio.current_time() - started >= 0.3
    assert answer.status_code in (200, 202)


async def test_api_down_and_jwks_down_at_runtime(sim: Simulator, client: httpx.AsyncClient) -> None:
    submitted = await _submit(client, sim)
    sim.faults.api_down = True
    sim.faults.jwks_down = True
    for answer in (
        await client.get(submitted["status_url"]),
        await client.post(f"{sim.base_url}/{FAST}", json=IMAGES),
    ):  # an untyped gateway page: transient everywhere
        assert (answer.status_code, answer.text) == (503, "Service Unavailable")
        assert "x-fal-error-type" not in answer.headers
    jwks = await client.get(sim.jwks_url)
    assert jwks.status_code == 503
    assert jwks.headers["x-fal-error-type"] == jwks.json()["error_type"]
    assert len(sim.truth) == 1
    sim.faults.api_down = False
    assert (await client.get(submitted["status_url"])).status_code in (200, 202)
    assert (await client.get(sim.jwks_url)).status_code == 503
    sim.faults.jwks_down = False
    assert len(await _jwks_keys(client, sim)) == 1


async def test_a_running_request_may_ignore_the_cancel_and_finish_with_its_result(
    sim: Simulator, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    """fal-api.md, cancel: a running one only receives a signal; it may still finish."""
    sim.config.run_seconds = 0.5
    payload = {**IMAGES, "sim_cancel": "ignore"}
    submitted = await _submit(client, sim, payload=payload, webhook=receiver.url)
    with trio.fail_after(3):
        while (await client.get(submitted["status_url"])).json()["status"] != "IN_PROGRESS":
            await trio.sleep(0.02)
    answer = await client.put(submitted["cancel_url"])
    assert (answer.status_code, answer.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    done = await _wait_completed(client, submitted["status_url"])
    assert "error" not in done
    truth = sim.truth[submitted["request_id"]]
    result = await client.get(submitted["response_url"])
    assert (result.status_code, result.json()) == (200, truth.output)
    assert (await receiver.next()).json()["status"] == "OK"
    assert (truth.outcome, truth.cancel_requested, truth.cancel_ignored) == ("ok", True, True)

    # The knob does it for requests that do not say; "honour" in the input wins over it.
    sim.faults.ignore_cancel = 1.0
    honoured = await _submit(client, sim, payload={**IMAGES, "sim_cancel": "honour"})
    ignored = await _submit(client, sim)
    with trio.fail_after(3):
        while (await client.get(ignored["status_url"])).json()["status"] != "IN_PROGRESS":
            await trio.sleep(0.02)
    for submitted in (honoured, ignored):
        assert (await client.put(submitted["cancel_url"])).status_code == 202
    assert sim.truth[honoured["request_id"]].outcome == "cancelled"
    assert sim.truth[ignored["request_id"]].cancel_ignored
    bad = await client.post(f"{sim.base_url}/{FAST}", json={**IMAGES, "sim_cancel": "maybe"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "sim_cancel"]


@pytest.mark.parametrize(
    ("outcome", "code", "error_type", "webhook_error"),
    [
        ("error500", 500, None, "Invalid status code: 500"),
        ("typed_error", 504, "request_timeout", "Invalid status code: 504"),
    ],
)
async def test_final_errors_of_a_finished_request(
    sim: Simulator,
    client: httpx.AsyncClient,
    receiver: Receiver,
    outcome: str,
    code: int,
    error_type: str | None,
    webhook_error: str,
) -> None:
    """fal-api.md, result: done but failed answers the model's own status and body, 4xx or
    5xx; infrastructure errors come typed (X-Fal-Error-Type) and are final there."""
    payload = {**IMAGES, "sim_outcome": outcome}
    submitted = await _submit(client, sim, payload=payload, webhook=receiver.url)
    await _wait_completed(client, submitted["status_url"])
    result = await client.get(submitted["response_url"])
    assert result.status_code == code and result.json()["detail"]
    assert result.headers.get("x-fal-error-type") == error_type
    assert result.json().get("error_type") == error_type
    delivery = (await receiver.next()).json()
    assert (delivery["status"], delivery["error"]) == ("ERROR", webhook_error)


@pytest.mark.parametrize(
    ("wording", "code", "body"),
    [
        ("in_progress", 400, {"detail": "Request is still in progress"}),
        ("not_completed", 400, {"detail": "Request is not completed"}),
        ("not_found", 404, {"detail": "Request not found"}),
        ("bare_422", 422, None),
    ],
)
async def test_not_ready_wordings(
    sim: Simulator, client: httpx.AsyncClient, wording: str, code: int, body: Any
) -> None:
    sim.faults.not_ready_answer = wording
    submitted = await _submit(client, sim)
    answer = await client.get(submitted["response_url"])
    assert answer.status_code == code
    assert (answer.json() if answer.content else None) == body
    await _wait_completed(client, submitted["status_url"])
    assert (await client.get(submitted["response_url"])).status_code == 200


async def test_mixed_not_ready_wordings_and_result_gateway_pages(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    sim.faults.not_ready_answer = "mixed"
    submitted = await _submit(client, sim)
    codes = {(await client.get(submitted["response_url"])).status_code for _ in range(30)}
    assert codes == {400, 404, 422}
    await _wait_completed(client, submitted["status_url"])
    sim.faults.result_gateway_error = 1.0
    pages = [await client.get(submitted["response_url"]) for _ in range(20)]
    assert {page.status_code for page in pages} == {502, 503}
    assert all("x-fal-error-type" not in page.headers for page in pages)
    assert (await client.get(submitted["status_url"])).status_code == 200  # result only


def test_fault_parsing() -> None:
    assert parse_fault("fail_training=0.25") == ("fail_training", 0.25)
    assert parse_fault("not_ready_answer=mixed") == ("not_ready_answer", "mixed")
    with pytest.raises(ValueError, match="one of"):
        parse_fault("not_ready_answer=later")
    with pytest.raises(ValueError, match="one of"):
        Faults(not_ready_answer="later")
    assert parse_fault("jwks_down=true") == ("jwks_down", True)
    assert parse_fault("api_down=off") == ("api_down", False)
    assert parse_fault("result_expiry_seconds=none") == ("result_expiry_seconds", None)
    for spec, match in [
        ("fail_training", "NAME=VALUE"),
        ("nope=1", "unknown fault"),
        ("jwks_down=maybe", "true or false"),
        ("drop_webhook=lots", "takes a number"),
        ("delay_webhook_seconds=inf", "finite"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_fault(spec)
    with pytest.raises(ValueError, match="probability"):
        Faults(drop_webhook=1.5)
    with pytest.raises(ValueError, match="negative"):
        Faults(api_timeout_seconds=-1)
    with pytest.raises(ValueError, match="certfile"):
        SimConfig(tls=True)
