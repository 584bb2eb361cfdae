"""daemon.http: listen parsing, serve_asgi lifecycle and limits, the ops app."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import AsyncIterator

import h11
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from trainguard import http
from trainguard.http import ASGIApp, Receive, Scope, Send, ops_app, parse_listen, serve_asgi
from trainguard.metrics import Metrics


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:8080", ("localhost", 8080)),
        ("[::1]:9000", ("::1", 9000)),
        ("[::]:65535", ("::", 65535)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("9100", "expected HOST:PORT"),
        (":9100", "expected HOST:PORT"),
        ("host:", "expected HOST:PORT"),
        ("host:http", "expected HOST:PORT"),
        ("host:-1", "expected HOST:PORT"),
        ("host:70000", "above 65535"),
        ("::1:9000", "brackets"),
        ("[::1:9000", "brackets"),
    ],
)
def test_parse_listen_rejects(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_listen(value)


async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
    """An `extra` app answering after the number of seconds in its path (``/0.2``)."""
    await trio.sleep(float(scope["path"].strip("/")))
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"done"})


class Server:
    """serve_asgi running in its own cancel scope, so a test can stop it."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()
        self.url = ""

    async def start(self, app: ASGIApp, **options: float | int) -> Server:
        async def run(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
            with self.scope:
                await serve_asgi(app, "127.0.0.1:0", task_status=task_status, **options)
            self.stopped.set()

        host, port = await self.nursery.start(run)
        self.url = f"http://{host}:{port}"
        return self

    async def stop(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as http_client:
        yield http_client


async def test_ops_endpoints(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    metrics = Metrics()
    metrics.layer_pass("poller")
    state = {"ready": False, "healthy": True}
    app = ops_app(metrics, ready=lambda: state["ready"], healthy=lambda: state["healthy"])
    server = await Server(nursery).start(app)

    response = await client.get(f"{server.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == metrics.content_type
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert families["trainguard_layer_passes"].samples[1].labels == {"layer": "poller"}
    assert families["trainguard_layer_passes"].samples[1].value == 1

    response = await client.get(f"{server.url}/readyz")
    assert (response.status_code, response.text) == (503, "not ready\n")
    state["ready"] = True
    response = await client.get(f"{server.url}/readyz")
    assert (response.status_code, response.text) == (200, "ready\n")

    assert (await client.get(f"{server.url}/healthz")).status_code == 200
    state["healthy"] = False
    response = await client.get(f"{server.url}/healthz")
    assert (response.status_code, response.text) == (503, "unhealthy\n")

    head = await client.head(f"{server.url}/metrics")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(metrics.render())

    assert (await client.get(f"{server.url}/")).status_code == 404
    response = await client.post(f"{server.url}/metrics", content=b"x")
    assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"
    await server.stop()


async def test_extra_app_gets_other_paths(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    app = ops_app(Metrics(), ready=lambda: True, extra=slow_app)
    server = await Server(nursery).start(app)
    response = await client.get(f"{server.url}/0")
    assert (response.status_code, response.text) == (200, "done")
    assert (await client.get(f"{server.url}/readyz")).status_code == 200
    await server.stop()


async def test_lifespan_is_handled(
    nursery: trio.Nursery, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hypercorn.error")
    server = await Server(nursery).start(ops_app(Metrics(), ready=lambda: True))
    assert (await client.get(f"{server.url}/healthz")).status_code == 200
    await server.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_port_taken_is_one_clear_oserror(nursery: trio.Nursery) -> None:
    app = ops_app(Metrics(), ready=lambda: True)
    server = await Server(nursery).start(app)
    listen = server.url.removeprefix("http://")
    with pytest.raises(OSError, match=f"cannot listen on {listen}: .*in use") as caught:
        await nursery.start(serve_asgi, app, listen)
    assert type(caught.value) is OSError
    await server.stop()


async def test_cancel_drains_requests_in_flight(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    server = await Server(nursery).start(ops_app(Metrics(), ready=lambda: True, extra=slow_app))
    host, port = parse_listen(server.url.removeprefix("http://"))
    results: list[httpx.Response] = []

    async def slow_request() -> None:
        results.append(await client.get(f"{server.url}/0.3"))

    async with trio.open_nursery() as requests:
        requests.start_soon(slow_request)
        await trio.sleep(0.1)
        server.scope.cancel()
        await trio.sleep(0.05)
        with pytest.raises(OSError):  # no longer accepting
            await trio.open_tcp_stream(host, port)
    assert results[0].status_code == 200 and results[0].text == "done"
    await server.stopped.wait()


async def test_graceful_timeout_bounds_shutdown(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    app = ops_app(Metrics(), ready=lambda: True, extra=slow_app)
    server = await Server(nursery).start(app, graceful_timeout=0.3)
    errors: list[Exception] = []

    async def hanging_request() -> None:
        try:
            await client.get(f"{server.url}/60")
        except httpx.HTTPError as error:
            errors.append(error)

    nursery.start_soon(hanging_request)
    await trio.sleep(0.1)
    started = time.monotonic()
    await server.stop()
    assert time.monotonic() - started < 2
    await trio.sleep(0.1)
    assert len(errors) == 1


async def test_idle_and_slow_header_connections_are_closed(nursery: trio.Nursery) -> None:
    app = ops_app(Metrics(), ready=lambda: True)
    server = await Server(nursery).start(app, keep_alive_timeout=0.3, read_timeout=5)
    host, port = parse_listen(server.url.removeprefix("http://"))

    idle = await trio.open_tcp_stream(host, port)
    with trio.fail_after(2):
        assert await idle.receive_some(100) == b""
    await idle.aclose()

    slow = await trio.open_tcp_stream(host, port)
    with trio.fail_after(2), pytest.raises(trio.BrokenResourceError):
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            await slow.send_all(bytes([byte]))
            await trio.sleep(0.05)
    await slow.aclose()
    await server.stop()


async def echo_length(scope: Scope, receive: Receive, send: Send) -> None:
    """An app reading the whole body and answering with its length."""
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


async def test_max_body_bytes(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    server = await Server(nursery).start(echo_length, max_body_bytes=1000)

    async def chunks(count: int) -> AsyncIterator[bytes]:
        for _ in range(count):
            yield b"x" * 400

    assert (await client.post(server.url, content=b"x" * 1000)).text == "1000"
    assert (await client.post(server.url, content=chunks(2))).text == "800"
    assert (await client.post(server.url, content=b"x" * 1001)).status_code == 413
    assert (await client.post(server.url, content=chunks(3))).status_code == 413
    await server.stop()


async def test_connections_beyond_the_bound_wait_instead_of_taking_a_descriptor(
    nursery: trio.Nursery,
) -> None:
    """issue 9 item 11: nothing bounded the connections a listener held (1,500 held ones
    ran a 1,024 fd limit out: EMFILE, and 2-6 s webhooks)."""
    gate = trio.Event()
    arrived: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await http.lifespan(receive, send)
            return
        arrived.append(scope["path"])
        if scope["path"] == "/held":
            await gate.wait()
        await http.respond(send, 200, b"ok")

    server = await Server(nursery).start(app, max_connections=3)
    host, port = parse_listen(server.url.removeprefix("http://"))
    held = [await trio.open_tcp_stream(host, port) for _ in range(3)]
    for stream in held:
        await stream.send_all(b"GET /held HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with trio.fail_after(10):
        while len(arrived) < 3:
            await trio.sleep(0.01)
    waiting = await trio.open_tcp_stream(host, port)  # the kernel's backlog takes it
    await waiting.send_all(b"GET /waiting HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.move_on_after(0.5):
        answer = await waiting.receive_some(4096)
        raise AssertionError(f"a fourth connection was served: {answer!r}")
    assert arrived == ["/held"] * 3
    gate.set()  # the held requests finish and their connections close: slots free
    with trio.fail_after(10):
        assert (await waiting.receive_some(4096)).startswith(b"HTTP/1.1 200")
    assert arrived == ["/held"] * 3 + ["/waiting"]
    for stream in (*held, waiting):
        await stream.aclose()
    await server.stop()


class _FlakyListener:
    """A listener whose accept() runs out of descriptors ``failures`` times first."""

    def __init__(self, real: trio.SocketListener, failures: int) -> None:
        self.real = real
        self.failures = failures

    async def accept(self) -> trio.SocketStream:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return await self.real.accept()


async def test_accept_out_of_descriptors_is_one_line_and_retried(nursery: trio.Nursery) -> None:
    (real,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = real.socket.getsockname()[1]
    served = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        await stream.send_all(b"hi")
        served.set()

    async with trio.open_nursery() as connections:
        with capture_logs() as lines:
            connections.start_soon(
                http._accept_loop, _FlakyListener(real, 3), handler, connections, 8, "test"
            )
            client = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(10):
                await served.wait()
                assert await client.receive_some(10) == b"hi"
        await client.aclose()
        connections.cancel_scope.cancel()
    await real.aclose()
    failed = [line for line in lines if line["event"].startswith("accept failed")]
    assert len(failed) == 3 and all("EMFILE" in line["error"] for line in failed), lines
    assert not any("exc_info" in line for line in lines)


async def test_a_connection_that_fails_is_one_line_and_the_listener_goes_on(
    nursery: trio.Nursery,
) -> None:
    """A protocol error escaping hypercorn's connection handler (h11's LocalProtocolError,
    a stream closed under it) took the whole listener down, traceback and all."""
    (real,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = real.socket.getsockname()[1]
    handled: list[int] = []

    async def handler(stream: trio.SocketStream) -> None:
        handled.append(len(handled))
        if len(handled) == 1:
            raise h11.LocalProtocolError("Can't send data when our state is MUST_CLOSE")
        await stream.send_all(b"hi")

    async with trio.open_nursery() as connections:
        with capture_logs() as lines:
            connections.start_soon(
                http._accept_loop, _FlakyListener(real, 0), handler, connections, 8, "test"
            )
            first = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(10):
                assert await first.receive_some(10) == b""  # closed, not left open
            second = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(10):
                assert await second.receive_some(10) == b"hi"
        await first.aclose()
        await second.aclose()
        connections.cancel_scope.cancel()
    await real.aclose()
    (failed,) = [line for line in lines if line["event"] == "connection closed on an error"]
    assert failed["error"].startswith("LocalProtocolError: Can't send data") and (
        "exc_info" not in failed
    )
