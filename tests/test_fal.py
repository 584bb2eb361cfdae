"""Tests for daemon.fal: classification, URLs, retries, timeouts, rate limiting, key hygiene."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from email.utils import formatdate
from functools import partial
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trainguard.fal import (
    Answer,
    FalClient,
    FalRequestError,
    Kind,
    RateLimiter,
    Submitted,
    progress_from_logs,
    queue_urls,
)

KEY = "key-id-1234:super-secret-5678"
QUEUE = "https://queue.fal.run"
ENDPOINT = "fal-ai/flux-lora-fast-training"
RID = "764cabcf-b745-4b3e-ae38-1200304cf45b"
STATUS_URL, RESPONSE_URL, CANCEL_URL = queue_urls(QUEUE, ENDPOINT, RID)
MEDIA_URL = "https://v3.fal.media/files/x/pytorch_lora_weights.safetensors"
LORA = {"diffusers_lora_file": {"url": MEDIA_URL}, "config_file": {"url": "https://v3.fal.media/c"}}

# A scripted answer: a fresh httpx.Response per call, or an exception to raise.
Step = Callable[[], httpx.Response] | Exception


def r(code: int, body: Any = None, *, content: bytes | None = None, **headers: str) -> Step:
    """A scripted response; ``body`` is sent as JSON unless raw ``content`` is given."""
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    if content is not None:
        return partial(httpx.Response, code, content=content, headers=hdrs)
    return partial(httpx.Response, code, json=body, headers=hdrs)


class Fake:
    """A scripted FAL endpoint: answers in order (the last one repeats), requests recorded."""

    def __init__(self, *script: Step) -> None:
        self.script = script
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.script[min(len(self.requests), len(self.script)) - 1]
        if isinstance(step, Exception):
            raise step
        return step()


def make_client(handler: Any, **overrides: Any) -> FalClient:
    options: dict[str, Any] = {
        "queue_url": QUEUE,
        "key": KEY,
        "rate_limiter": RateLimiter(10_000, burst=1_000),
        "timeout": 30.0,
        "retries": 0,
        "transport": httpx.MockTransport(handler) if handler else None,
    }
    options.update(overrides)
    return FalClient(**options)


async def ask(op: str, *script: Step, **overrides: Any) -> tuple[Answer, Fake]:
    fake = Fake(*script)
    async with make_client(fake, **overrides) as client:
        url = {
            "status": STATUS_URL,
            "result": RESPONSE_URL,
            "cancel": CANCEL_URL,
            "probe": MEDIA_URL,
        }[op]
        answer = await getattr(client, op)(url)
    assert answer.op == op
    return answer, fake


# ---------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("step", "kind", "detail"),
    [
        (r(202, {"status": "IN_QUEUE", "queue_position": 3}), Kind.PENDING, None),
        (r(202, {"status": "IN_PROGRESS", "logs": []}), Kind.PENDING, None),
        (r(200, {"status": "COMPLETED", "logs": [], "metrics": {}}), Kind.COMPLETED, None),
        (r(200, {"status": "COMPLETED", "error": None}), Kind.COMPLETED, None),
        (
            r(200, {"status": "COMPLETED", "error": "Invalid status code: 422"}),
            Kind.FAILED,
            "Invalid status code: 422",
        ),
        (r(404, {"detail": "Request not found"}), Kind.NOT_FOUND, "HTTP 404: Request not found"),
        (r(400, {"detail": "bad request id"}), Kind.FAILED, "HTTP 400: bad request id"),
        (r(422, {"detail": "nope"}), Kind.FAILED, "HTTP 422: nope"),
        (r(401, {"detail": "Invalid key"}), Kind.TRANSIENT, "HTTP 401: Invalid key"),
        (r(403, {"detail": "Forbidden"}), Kind.TRANSIENT, "HTTP 403: Forbidden"),
        (r(408, {"detail": "timeout"}), Kind.TRANSIENT, "HTTP 408: timeout"),
        (r(409, {}), Kind.TRANSIENT, "HTTP 409: {}"),
        (r(429, {"detail": "slow down"}), Kind.TRANSIENT, "HTTP 429: slow down"),
        (r(500, {"detail": "oops"}), Kind.TRANSIENT, "HTTP 500: oops"),
        (r(502, content=b"<html>nginx</html>"), Kind.TRANSIENT, "HTTP 502: <html>nginx</html>"),
        (r(503, content=b""), Kind.TRANSIENT, "HTTP 503"),
        (r(504, {"detail": "gateway"}), Kind.TRANSIENT, "HTTP 504: gateway"),
        (r(301, content=b"", location="https://elsewhere"), Kind.TRANSIENT, "HTTP 301"),
        (
            r(200, content=b"<html>not json</html>"),
            Kind.TRANSIENT,
            "status answer without a status: HTTP 200: <html>not json</html>",
        ),
        (r(200, [1, 2]), Kind.TRANSIENT, "status answer without a status: HTTP 200: [1,2]"),
        (
            r(200, {"status": "FAILED"}),
            Kind.TRANSIENT,
            'unknown status \'FAILED\': HTTP 200: {"status":"FAILED"}',
        ),
    ],
)
async def test_status_classification(step: Step, kind: Kind, detail: str | None) -> None:
    answer, fake = await ask("status", step)
    assert (answer.kind, answer.detail) == (kind, detail)
    assert len(fake.requests) == 1


async def test_status_fields_and_logs_query() -> None:
    logs = [
        {"message": "loading", "level": "INFO"},
        "not a dict",
        {"message": "step 1200/2500", "level": "INFO"},
    ]
    answer, fake = await ask("status", r(202, {"status": "IN_PROGRESS", "logs": logs}))
    assert answer.kind is Kind.PENDING
    assert answer.status == "IN_PROGRESS"
    assert answer.http_status == 202
    assert answer.logs == [logs[0], logs[2]]
    assert answer.progress == 48
    assert fake.requests[0].url.params["logs"] == "1"

    answer, _ = await ask("status", r(202, {"status": "IN_QUEUE", "queue_position": 7}))
    assert (answer.status, answer.queue_position, answer.logs, answer.progress) == (
        "IN_QUEUE",
        7,
        None,
        None,
    )

    fake = Fake(r(202, {"status": "IN_QUEUE", "queue_position": True}))
    async with make_client(fake) as client:
        answer = await client.status(STATUS_URL, logs=False)
    assert "logs" not in fake.requests[0].url.params
    assert answer.queue_position is None  # a bool is not a position


async def test_error_type_from_body_then_header() -> None:
    answer, _ = await ask(
        "status",
        r(503, {"detail": "no runner", "error_type": "runner_scheduling_failure"}),
    )
    assert answer.error_type == "runner_scheduling_failure"
    answer, _ = await ask(
        "status", r(504, {"detail": "timed out"}, x_fal_error_type="request_timeout")
    )
    assert answer.error_type == "request_timeout"
    answer, _ = await ask(
        "status",
        r(200, {"status": "COMPLETED", "error": "boom", "error_type": "internal_error"}),
    )
    assert (answer.kind, answer.detail, answer.error_type) == (
        Kind.FAILED,
        "boom",
        "internal_error",
    )


VALIDATION = {
    "detail": [
        {"loc": ["body", "images_data_url"], "msg": "field required", "type": "missing"},
        {"loc": ["body", "steps"], "msg": "must be > 0", "type": "value_error"},
    ]
}


@pytest.mark.parametrize(
    ("step", "kind", "detail"),
    [
        (r(200, LORA), Kind.SUCCEEDED, None),
        (r(400, {"detail": "Request is still in progress"}), Kind.PENDING, None),
        (r(400, {"detail": "REQUEST IS STILL IN PROGRESS"}), Kind.PENDING, None),
        (r(409, {"detail": "Request is still in progress"}), Kind.PENDING, None),
        (
            r(422, VALIDATION),
            Kind.FAILED,
            "HTTP 422: body.images_data_url: field required; body.steps: must be > 0",
        ),
        (r(400, {"detail": "bad input"}), Kind.FAILED, "HTTP 400: bad input"),
        (r(400, {"detail": {"code": 1}}), Kind.FAILED, 'HTTP 400: {"code":1}'),
        (r(404, {"detail": "not found"}), Kind.NOT_FOUND, "HTTP 404: not found"),
        # Once COMPLETED, FAL's or the app's own error answer is final (fal-api.md, result):
        (r(503, {"detail": "busy"}), Kind.FAILED, "HTTP 503: busy"),
        (r(500, {"detail": "CUDA out of memory"}), Kind.FAILED, "HTTP 500: CUDA out of memory"),
        (
            r(504, {"detail": "Request timed out", "error_type": "request_timeout"}),
            Kind.FAILED,
            "HTTP 504: Request timed out",
        ),
        (
            r(502, content=b"upstream died", x_fal_error_type="runner_incomplete_response"),
            Kind.FAILED,
            "HTTP 502: upstream died",
        ),
        # ... but a gateway's untyped page is transient (bounded by reconcile once COMPLETED).
        (
            r(502, content=b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>"),
            Kind.TRANSIENT,
            "HTTP 502: <html><body><h1>502 Bad Gateway</h1>nginx</body></html>",
        ),
        (
            r(503, content=b"Service Unavailable"),
            Kind.TRANSIENT,
            "HTTP 503: Service Unavailable",
        ),
        (r(500, {"message": "oops"}), Kind.TRANSIENT, 'HTTP 500: {"message":"oops"}'),
        (r(429, {"detail": "slow down"}, retry_after="3"), Kind.TRANSIENT, "HTTP 429: slow down"),
        (r(408, content=b""), Kind.TRANSIENT, "HTTP 408"),
        (r(200, [1]), Kind.TRANSIENT, "output is not a JSON object: HTTP 200: [1]"),
        (r(200, content=b"{trunc"), Kind.TRANSIENT, "undecodable JSON: HTTP 200: {trunc"),
        (r(202, {"status": "IN_PROGRESS"}), Kind.PENDING, None),
        (
            r(201, {"lora": "x"}),
            Kind.TRANSIENT,
            'result answer without the output: HTTP 201: {"lora":"x"}',
        ),
    ],
)
async def test_result_classification(step: Step, kind: Kind, detail: str | None) -> None:
    answer, _ = await ask("result", step)
    assert answer.kind is kind
    if kind is Kind.PENDING:
        assert "in progress" in (answer.detail or "").lower().replace("_", " ")
    else:
        assert answer.detail == detail
    assert answer.output == (LORA if kind is Kind.SUCCEEDED else None)


@pytest.mark.parametrize(
    ("step", "kind", "detail"),
    [
        (r(202, {"status": "CANCELLATION_REQUESTED"}), Kind.SUCCEEDED, None),
        (r(400, {"status": "ALREADY_COMPLETED"}), Kind.FAILED, "ALREADY_COMPLETED"),
        (r(404, {"status": "NOT_FOUND"}), Kind.NOT_FOUND, 'HTTP 404: {"status":"NOT_FOUND"}'),
        (r(400, {"status": "NOT_FOUND"}), Kind.NOT_FOUND, 'HTTP 400: {"status":"NOT_FOUND"}'),
        (r(422, {"detail": "no"}), Kind.FAILED, "HTTP 422: no"),
        (r(502, content=b"bad gateway"), Kind.TRANSIENT, "HTTP 502: bad gateway"),
        (r(202, content=b""), Kind.TRANSIENT, "undecodable JSON: HTTP 202"),
    ],
)
async def test_cancel_classification(step: Step, kind: Kind, detail: str | None) -> None:
    answer, fake = await ask("cancel", step)
    assert (answer.kind, answer.detail) == (kind, detail)
    assert fake.requests[0].method == "PUT"


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (200, Kind.SUCCEEDED),
        (206, Kind.SUCCEEDED),
        (404, Kind.NOT_FOUND),
        (410, Kind.NOT_FOUND),
        (408, Kind.TRANSIENT),
        (429, Kind.TRANSIENT),
        (500, Kind.TRANSIENT),
        (503, Kind.TRANSIENT),
        (401, Kind.FAILED),
        (403, Kind.FAILED),
        (405, Kind.FAILED),
    ],
)
async def test_probe_classification(code: int, kind: Kind) -> None:
    answer, fake = await ask("probe", r(code, content=b""))
    assert answer.kind is kind
    assert fake.requests[0].method == "HEAD"
    assert "authorization" not in fake.requests[0].headers


async def test_probe_follows_redirects() -> None:
    answer, fake = await ask(
        "probe", r(302, content=b"", location="https://cdn.example/file"), r(200, content=b"")
    )
    assert answer.kind is Kind.SUCCEEDED
    assert [str(request.url) for request in fake.requests] == [
        MEDIA_URL,
        "https://cdn.example/file",
    ]


@pytest.mark.parametrize(
    ("error", "detail"),
    [
        (httpx.ConnectError("connection refused"), "ConnectError: connection refused"),
        (httpx.ReadError(""), "ReadError"),
        (
            httpx.RemoteProtocolError("server disconnected"),
            "RemoteProtocolError: server disconnected",
        ),
        (httpx.ReadTimeout("read timed out"), "timeout (ReadTimeout)"),
        (httpx.ConnectTimeout("connect timed out"), "timeout (ConnectTimeout)"),
        (httpx.PoolTimeout("pool"), "timeout (PoolTimeout)"),
    ],
)
async def test_transport_errors_are_transient(error: Exception, detail: str) -> None:
    for op in ("status", "result", "cancel", "probe"):
        answer, _ = await ask(op, error)
        assert (answer.kind, answer.detail, answer.http_status) == (Kind.TRANSIENT, detail, None)


async def test_invalid_url_is_transient_not_raised() -> None:
    async with make_client(Fake(r(200, {}))) as client:
        answer = await client.status("http://\x00/")
    assert answer.kind is Kind.TRANSIENT
    assert answer.detail and answer.detail.startswith("InvalidURL")


async def test_real_transport_errors_under_trio() -> None:
    """The real httpx stack (no mock) on trio: refused connection and unsupported scheme."""
    async with make_client(None, transport=None, retries=1, backoff_base=0.01) as client:
        refused = await client.status("http://127.0.0.1:1/requests/x/status")
        unsupported = await client.probe("ftp://example.invalid/file")
    assert refused.kind is Kind.TRANSIENT
    assert refused.detail and refused.detail.startswith("ConnectError")
    assert unsupported.kind is Kind.TRANSIENT
    assert unsupported.detail and unsupported.detail.startswith("UnsupportedProtocol")


async def test_overall_timeout_is_transient(autojump_clock: trio.testing.MockClock) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await trio.sleep(3600)
        raise AssertionError("the deadline should have fired")

    async with make_client(slow, timeout=5.0) as client:
        start = trio.current_time()
        answer = await client.status(STATUS_URL)
    assert (answer.kind, answer.detail) == (Kind.TRANSIENT, "timeout")
    assert 5.0 <= trio.current_time() - start < 5.1


# ---------------------------------------------------------------- URLs and submit


def test_queue_urls_drop_subpath() -> None:
    base = f"{QUEUE}/fal-ai/flux-lora-fast-training/requests/{RID}"
    expected = (f"{base}/status", base, f"{base}/cancel")
    assert queue_urls(QUEUE, ENDPOINT, RID) == expected
    assert queue_urls(QUEUE + "/", f"/{ENDPOINT}/train/sub/", RID) == expected
    for url in queue_urls(QUEUE, "fal-ai/flux-lora-fast-training/train", RID):
        assert "/train" not in url
    assert queue_urls(QUEUE, "workflows/me/flow/sub", "a/b")[1] == (
        f"{QUEUE}/workflows/me/flow/requests/a%2Fb"
    )


@pytest.mark.parametrize(
    ("endpoint", "rid"), [("flux", RID), ("workflows/me", RID), (ENDPOINT, "")]
)
def test_queue_urls_reject_malformed(endpoint: str, rid: str) -> None:
    with pytest.raises(ValueError):
        queue_urls(QUEUE, endpoint, rid)


SUBMIT_OK = {
    "request_id": RID,
    "gateway_request_id": "gw-1",
    "status_url": STATUS_URL,
    "response_url": RESPONSE_URL,
    "cancel_url": CANCEL_URL,
    "queue_position": 0,
}


async def test_submit_webhook_in_query_not_body() -> None:
    fake = Fake(r(200, SUBMIT_OK))
    args = {"images_data_url": "https://x/zip", "steps": 1000}
    hook = "https://me.example/fal/webhook?training=7&x=a b"
    async with make_client(fake) as client:
        submitted = await client.submit(ENDPOINT, args, hook)
    assert submitted == Submitted(RID, STATUS_URL, RESPONSE_URL, CANCEL_URL, "gw-1", 0)
    (request,) = fake.requests
    assert request.method == "POST"
    assert request.url.path == f"/{ENDPOINT}"
    assert request.url.params["fal_webhook"] == hook
    assert json.loads(request.content) == args
    assert "fal_webhook" not in request.content.decode()
    assert request.headers["authorization"] == f"Key {KEY}"


async def test_submit_subpath_and_derived_urls() -> None:
    fake = Fake(r(200, {"request_id": RID}))
    async with make_client(fake) as client:
        submitted = await client.submit(f"{ENDPOINT}/train", {}, None)
    assert fake.requests[0].url.path == f"/{ENDPOINT}/train"
    assert "fal_webhook" not in fake.requests[0].url.params
    assert (submitted.status_url, submitted.response_url, submitted.cancel_url) == (
        STATUS_URL,
        RESPONSE_URL,
        CANCEL_URL,
    )
    assert (submitted.gateway_request_id, submitted.queue_position) == (None, None)


async def test_submit_rejects_malformed_endpoint_before_sending() -> None:
    fake = Fake(r(200, SUBMIT_OK))
    async with make_client(fake) as client:
        with pytest.raises(ValueError):
            await client.submit("flux", {}, None)
    assert fake.requests == []


@pytest.mark.parametrize(
    ("step", "kind"),
    [
        (r(422, VALIDATION), Kind.FAILED),
        (r(404, {"detail": "no such app"}), Kind.NOT_FOUND),
        (r(200, {"status": "ok"}), Kind.TRANSIENT),
        (r(200, content=b"not json"), Kind.TRANSIENT),
        # FAL may have acted on these: never resent, so no duplicate paid training.
        (r(502, content=b"bad gateway"), Kind.TRANSIENT),
        (r(500, {"detail": "oops"}), Kind.TRANSIENT),
        (httpx.ReadTimeout("read"), Kind.TRANSIENT),
        (httpx.RemoteProtocolError("disconnected"), Kind.TRANSIENT),
    ],
)
async def test_submit_raises_without_resending(
    step: Step, kind: Kind, autojump_clock: trio.testing.MockClock
) -> None:
    fake = Fake(step, r(200, SUBMIT_OK))
    async with make_client(fake, retries=3) as client:
        with pytest.raises(FalRequestError) as caught:
            await client.submit(ENDPOINT, {}, None)
    assert caught.value.answer.kind is kind
    assert caught.value.answer.op == "submit"
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    "step",
    [
        r(503, {"detail": "busy"}),
        r(429, {"detail": "slow down"}),
        r(408, {}),
        r(409, {}),
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("connect"),
    ],
)
async def test_submit_resends_when_fal_did_not_act(
    step: Step, autojump_clock: trio.testing.MockClock
) -> None:
    fake = Fake(step, r(200, SUBMIT_OK))
    async with make_client(fake, retries=2) as client:
        submitted = await client.submit(ENDPOINT, {}, None)
    assert submitted.request_id == RID
    assert len(fake.requests) == 2


# ---------------------------------------------------------------- the backup host
BACKUP = "https://queue.falrun.com"


class TwoHosts:
    """The primary queue host answers with ``primary`` (a step); the backup with ``backup``."""

    def __init__(self, primary: Step, backup: Step) -> None:
        self.primary, self.backup = Fake(primary), Fake(backup)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        fake = self.backup if request.url.host == "queue.falrun.com" else self.primary
        return await fake(request)


@pytest.mark.parametrize("error", [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow")])
async def test_connection_failure_falls_back_to_the_backup_host(error: Exception) -> None:
    hosts = TwoHosts(error, r(200, {"status": "COMPLETED"}))
    async with make_client(hosts, backup_queue_url=BACKUP) as client:
        status = await client.status(STATUS_URL)
        result = await client.result(RESPONSE_URL)
        cancel = await client.cancel(CANCEL_URL)
    assert status.kind is Kind.COMPLETED
    assert result.kind is Kind.SUCCEEDED
    assert cancel.kind is Kind.SUCCEEDED
    paths = [req.url.path for req in hosts.backup.requests]
    assert paths == [httpx.URL(u).path for u in (STATUS_URL, RESPONSE_URL, CANCEL_URL)]
    assert [req.headers["authorization"] for req in hosts.backup.requests] == [f"Key {KEY}"] * 3


async def test_submit_falls_back_only_when_it_never_reached_fal() -> None:
    hosts = TwoHosts(httpx.ConnectError("refused"), r(200, SUBMIT_OK))
    async with make_client(hosts, backup_queue_url=BACKUP) as client:
        submitted = await client.submit(ENDPOINT, {"a": 1}, None)
    assert submitted.request_id == RID
    assert [str(req.url) for req in hosts.backup.requests] == [f"{BACKUP}/{ENDPOINT}"]
    assert json.loads(hosts.backup.requests[0].content) == {"a": 1}

    # A read timeout may have reached FAL: no second (paid) training on the backup host.
    hosts = TwoHosts(httpx.ReadTimeout("read"), r(200, SUBMIT_OK))
    async with make_client(hosts, backup_queue_url=BACKUP, retries=3) as client:
        with pytest.raises(FalRequestError):
            await client.submit(ENDPOINT, {}, None)
    assert (len(hosts.primary.requests), hosts.backup.requests) == (1, [])


@pytest.mark.parametrize(
    "step",
    [
        r(503, content=b"Service Unavailable"),
        r(404, {"detail": "Request not found"}),
        httpx.ReadTimeout("read"),
        httpx.RemoteProtocolError("disconnected"),
    ],
)
async def test_no_fallback_on_an_answer_or_after_the_request_was_sent(step: Step) -> None:
    hosts = TwoHosts(step, r(200, {"status": "COMPLETED"}))
    async with make_client(hosts, backup_queue_url=BACKUP) as client:
        answer = await client.status(STATUS_URL)
    assert answer.kind in (Kind.TRANSIENT, Kind.NOT_FOUND)
    assert hosts.backup.requests == []


async def test_backup_down_too_reports_the_first_failure_and_no_backup_means_none() -> None:
    hosts = TwoHosts(httpx.ConnectError("primary refused"), httpx.ConnectError("backup refused"))
    async with make_client(hosts, backup_queue_url=BACKUP) as client:
        answer = await client.status(STATUS_URL)
    assert answer.kind is Kind.TRANSIENT and "primary refused" in (answer.detail or "")
    assert len(hosts.backup.requests) == 1
    hosts = TwoHosts(httpx.ConnectError("refused"), r(200, {"status": "COMPLETED"}))
    async with make_client(hosts, backup_queue_url="") as client:
        assert (await client.status(STATUS_URL)).kind is Kind.TRANSIENT
        # URLs on another host (media probes) never go to the backup either.
    async with make_client(hosts, backup_queue_url=BACKUP) as client:
        assert (await client.probe(MEDIA_URL)).kind is Kind.TRANSIENT
    assert hosts.backup.requests == []


# ---------------------------------------------------------------- auth and the key


async def test_authorization_header_on_queue_calls_only() -> None:
    fake = Fake(r(200, {"status": "COMPLETED"}))
    async with make_client(fake) as client:
        await client.status(STATUS_URL)
        await client.result(RESPONSE_URL)
        await client.cancel(CANCEL_URL)
        await client.probe(MEDIA_URL)
    auth = [request.headers.get("authorization") for request in fake.requests]
    assert auth == [f"Key {KEY}"] * 3 + [None]

    fake = Fake(r(200, {"status": "COMPLETED"}))
    async with make_client(fake, key=None) as client:
        await client.status(STATUS_URL)
    assert "authorization" not in fake.requests[0].headers


async def test_key_never_leaks(autojump_clock: trio.testing.MockClock) -> None:
    def echo(request: httpx.Request) -> httpx.Response:
        sent = request.headers["authorization"]
        return httpx.Response(
            401, json={"detail": f"bad credentials {sent}"}, headers={"X-Fal-Error-Type": sent}
        )

    async with make_client(echo, retries=1) as client:
        assert KEY not in repr(client)
        assert "super-secret" not in repr(client)
        answer = await client.status(STATUS_URL)
        with pytest.raises(FalRequestError) as caught:
            await client.submit(ENDPOINT, {}, None)
    secret = KEY.split(":")[1]
    assert answer.kind is Kind.TRANSIENT
    texts = [
        repr(answer),
        str(answer.body),
        str(answer.detail),
        str(answer.error_type),
        str(caught.value),
        repr(caught.value),
        repr(caught.value.answer),
        str(caught.value.answer.body),
    ]
    for text in texts:
        assert KEY not in text
        assert secret not in text
    assert "[redacted]" in str(answer.detail)

    leaky = Fake(httpx.ConnectError(f"refused while sending Key {KEY}"))
    async with make_client(leaky) as client:
        answer = await client.result(RESPONSE_URL)
    assert answer.detail == "ConnectError: refused while sending Key [redacted]"


# ---------------------------------------------------------------- retries and backoff


async def test_retry_then_success(autojump_clock: trio.testing.MockClock) -> None:
    calls: list[tuple[str, str, float]] = []
    fake = Fake(r(503, {}), httpx.ConnectError("refused"), r(200, {"status": "COMPLETED"}))
    async with make_client(fake, retries=2, observe=lambda *call: calls.append(call)) as client:
        start = trio.current_time()
        answer = await client.status(STATUS_URL)
        elapsed = trio.current_time() - start
    assert answer.kind is Kind.COMPLETED
    assert len(fake.requests) == 3
    assert [(op, kind) for op, kind, _ in calls] == [
        ("status", "transient"),
        ("status", "transient"),
        ("status", "completed"),
    ]
    assert all(seconds >= 0 for _, _, seconds in calls)
    assert elapsed <= 0.5 + 1.0  # full jitter, capped at base * 2**attempt


async def test_retries_exhausted_returns_last_transient(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for op in ("status", "result", "cancel", "probe"):
        answer, fake = await ask(op, r(503, content=b"Service Unavailable"), retries=3)
        assert answer.kind is Kind.TRANSIENT
        assert len(fake.requests) == 4


async def test_definitive_answers_are_not_retried() -> None:
    for step in (r(422, VALIDATION), r(404, {}), r(200, LORA)):
        _, fake = await ask("result", step, retries=3)
        assert len(fake.requests) == 1


async def test_backoff_is_capped(autojump_clock: trio.testing.MockClock) -> None:
    async with make_client(
        Fake(r(500, {})), retries=6, backoff_base=1.0, backoff_cap=2.0
    ) as client:
        start = trio.current_time()
        await client.status(STATUS_URL)
    assert trio.current_time() - start <= 1 + 2 + 2 + 2 + 2 + 2


@pytest.mark.parametrize(
    ("retry_after", "low", "high"),
    [("7", 7.0, 7.01), ("2.5", 2.5, 2.51), ("1000", 30.0, 30.01), ("-3", 0.0, 0.01)],
)
async def test_retry_after_seconds_honoured(
    retry_after: str, low: float, high: float, autojump_clock: trio.testing.MockClock
) -> None:
    fake = Fake(r(429, {}, retry_after=retry_after), r(200, {"status": "COMPLETED"}))
    async with make_client(fake, retries=1, backoff_cap=10.0) as client:
        start = trio.current_time()
        answer = await client.status(STATUS_URL)
        elapsed = trio.current_time() - start
    assert answer.kind is Kind.COMPLETED
    assert low <= elapsed < high


async def test_retry_after_http_date_honoured(autojump_clock: trio.testing.MockClock) -> None:
    when = formatdate(time.time() + 20, usegmt=True)
    fake = Fake(r(503, {}, retry_after=when), r(200, LORA))
    async with make_client(fake, retries=1) as client:
        start = trio.current_time()
        answer = await client.result(RESPONSE_URL)
        elapsed = trio.current_time() - start
    assert answer.kind is Kind.SUCCEEDED
    assert 18.0 <= elapsed <= 20.5


async def test_retry_after_reported_and_garbage_ignored() -> None:
    answer, _ = await ask("status", r(429, {}, retry_after="12"))
    assert answer.retry_after == 12.0
    answer, _ = await ask("status", r(429, {}, retry_after="soon"))
    assert answer.retry_after is None


# ---------------------------------------------------------------- cancellation


async def test_cancellation_propagates_from_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    answers: list[Answer] = []
    async with make_client(hang, timeout=100.0, retries=3) as client:
        with trio.move_on_after(1) as scope:
            answers.append(await client.status(STATUS_URL))
    assert scope.cancelled_caught
    assert answers == []


async def test_cancellation_propagates_from_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    answers: list[Answer] = []
    async with make_client(Fake(r(503, {}, retry_after="20")), retries=3) as client:
        with trio.move_on_after(5) as scope:
            answers.append(await client.result(RESPONSE_URL))
    assert scope.cancelled_caught
    assert answers == []


# ---------------------------------------------------------------- rate limiting


async def test_rate_limiter_spacing(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(10, burst=5)
    done: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        done.append(trio.current_time())

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(one)
    offsets = sorted(t - start for t in done)
    assert offsets[:5] == [0.0] * 5  # the burst
    assert offsets[-1] == pytest.approx(4.5)
    assert all(b - a <= 0.1 + 1e-9 for a, b in itertools.pairwise(offsets))

    # After an idle period the burst is available again, not more.
    await trio.sleep(60)
    start = trio.current_time()
    for _ in range(7):
        await limiter.acquire()
    assert trio.current_time() - start == pytest.approx(0.2)


async def test_client_calls_share_the_rate_limiter(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(10, burst=5)
    fake = Fake(r(202, {"status": "IN_QUEUE", "queue_position": 1}))
    async with (
        make_client(fake, rate_limiter=limiter) as a,
        make_client(fake, rate_limiter=limiter) as b,
    ):
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon((a if i % 2 else b).status, STATUS_URL)
        elapsed = trio.current_time() - start
    assert len(fake.requests) == 50
    assert elapsed >= 4.5 - 1e-9


def test_rate_limiter_rejects_nonsense() -> None:
    for rate, burst in ((0, 1), (-1, 1), (float("inf"), 1), (1, 0)):
        with pytest.raises(ValueError):
            RateLimiter(rate, burst)


# ---------------------------------------------------------------- progress


@pytest.mark.parametrize(
    ("messages", "progress"),
    [
        (["step 1200/2500"], 48),
        (["1200/2500 steps"], 48),
        (["Step: 250 / 1000, loss=0.12"], 25),
        (["Training:  48%|████▊     | 1200/2500 [12:00<13:00,  1.67it/s]"], 48),
        (["Step 5 of 10"], 50),
        (["iteration 300/300"], 100),
        (["steps 3000/2500"], 100),
        (["step 100/1000", "loading", "step 900/1000", "saving model"], 90),
        (["step 1/10 ... step 2/10"], 20),
        (["loading weights", "epoch 1/10", "date 12/25/2024"], None),
        (["step 0/0"], None),
        (["step 12"], None),
        ([], None),
    ],
)
def test_progress_from_logs(messages: list[str], progress: int | None) -> None:
    assert progress_from_logs([{"message": m, "level": "INFO"} for m in messages]) == progress


def test_progress_from_logs_tolerates_junk() -> None:
    assert progress_from_logs(None) is None
    junk: list[Any] = [{"message": 5}, {"level": "INFO"}, "step 1/2", {"message": "step 1/4"}]
    assert progress_from_logs(junk) == 25


@given(st.lists(st.dictionaries(st.sampled_from(["message", "level"]), st.text())))
def test_progress_from_logs_never_raises(logs: list[dict[str, str]]) -> None:
    progress = progress_from_logs(logs)
    assert progress is None or 0 <= progress <= 100


# ---------------------------------------------------------------- robustness

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)
STATUS_BODIES = st.fixed_dictionaries(
    {"status": st.sampled_from(["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "OK", ""])},
    optional={"logs": JSON, "queue_position": JSON, "error": JSON, "error_type": JSON},
)
BODIES = st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda v: json.dumps(v).encode()),
    STATUS_BODIES.map(lambda v: json.dumps(v).encode()),
)
HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    code=st.integers(100, 599),
    content=BODIES,
    retry_after=HEADER_TEXT,
    error_type=HEADER_TEXT,
    op=st.sampled_from(["status", "result", "cancel", "probe"]),
)
async def test_any_answer_is_classified_never_raised(
    code: int, content: bytes, retry_after: str, error_type: str, op: str
) -> None:
    step = r(code, content=content, retry_after=retry_after, x_fal_error_type=error_type)
    answer, _ = await ask(op, step)
    assert isinstance(answer, Answer)
    assert answer.kind in Kind
    assert answer.http_status == code
    assert answer.retry_after is None or answer.retry_after >= 0
    if answer.kind in (Kind.FAILED, Kind.TRANSIENT, Kind.NOT_FOUND):
        assert answer.detail
