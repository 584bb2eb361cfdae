"""The test load balancer (``trainguard.testing.balancer``): round robin, skipping a backend
that refuses, closing without an answer when none accepts."""

from __future__ import annotations

import httpx
import trio

from trainguard.testing.balancer import open_balancer
from trainguard.testing.demo import free_port


async def _http_backend(
    name: str, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                data = await stream.receive_some(4096)
                if not data:
                    return
                request += data
            body = name.encode()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def _get(url: str) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(url)).text


async def test_round_robin_skips_a_refusing_backend_and_closes_when_none_accepts(
    nursery: trio.Nursery,
) -> None:
    a = await nursery.start(_http_backend, "a")
    b = await nursery.start(_http_backend, "b")
    dead = free_port()  # nothing listens there
    async with open_balancer([("127.0.0.1", a), ("127.0.0.1", dead), ("127.0.0.1", b)]) as lb:
        answers = [await _get(lb.url) for _ in range(6)]
        assert sorted(set(answers)) == ["a", "b"]
        assert answers.count("a") == answers.count("b") == 3
        assert lb.forwarded[("127.0.0.1", dead)] == 0
        lb.set_backends([("127.0.0.1", dead)])
        try:
            await _get(lb.url)
        except httpx.TransportError:
            pass
        else:
            raise AssertionError("an answer with no backend up")
        assert lb.refused == 1
