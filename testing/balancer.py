"""A small TCP load balancer for tests and the demo: the one ``[webhook] public_url`` in
front of several instances' webhook listeners, as an operator's load balancer would be.

Each incoming connection goes to the next backend in turn (round robin); a backend that
refuses the connection is skipped for that connection, so a SIGKILLed instance costs no
webhook as long as another is up. When none accepts, the client's connection is closed
without an answer: to fal that is a failed delivery, retried later. Bytes are copied both
ways unchanged (HTTP/1.1 keep-alive stays on the backend it was opened to).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial

import trio

#: How long one backend may take to accept before the next one is tried.
CONNECT_SECONDS = 1.0
_CHUNK = 65536


class Balancer:
    """Round robin over ``backends`` (``(host, port)``); ``set_backends`` changes them."""

    def __init__(self, backends: Sequence[tuple[str, int]]) -> None:
        self.backends: list[tuple[str, int]] = list(backends)
        self.port = 0
        self._next = 0
        #: Connections handed to each backend, and connections no backend took.
        self.forwarded: Counter[tuple[str, int]] = Counter()
        self.refused = 0

    def set_backends(self, backends: Sequence[tuple[str, int]]) -> None:
        self.backends = list(backends)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _connect(self) -> trio.SocketStream | None:
        backends = list(self.backends)
        for _ in range(len(backends)):
            host, port = backends[self._next % len(backends)]
            self._next += 1
            with trio.move_on_after(CONNECT_SECONDS):
                try:
                    stream = await trio.open_tcp_stream(host, port)
                except OSError:
                    continue
                self.forwarded[(host, port)] += 1
                return stream
        self.refused += 1
        return None

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            backend = await self._connect()
            if backend is None:
                return
            async with backend, trio.open_nursery() as nursery:
                nursery.start_soon(_pipe, client, backend, nursery.cancel_scope)
                nursery.start_soon(_pipe, backend, client, nursery.cancel_scope)


async def _pipe(
    source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
) -> None:
    """Copy ``source`` to ``sink`` until either side closes or breaks; then end both ways."""
    try:
        while data := await source.receive_some(_CHUNK):
            await sink.send_all(data)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        scope.cancel()
        return
    # The other direction ends by itself once its source closes; a half-closed peer that
    # never does (a backend killed mid-answer) is cut when its own pipe breaks.


@asynccontextmanager
async def open_balancer(
    backends: Sequence[tuple[str, int]], port: int = 0
) -> AsyncIterator[Balancer]:
    """Listen on 127.0.0.1 (``port``, 0: a free one) and balance over ``backends``."""
    balancer = Balancer(backends)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, balancer._handle, port, host="127.0.0.1")
        )
        balancer.port = listeners[0].socket.getsockname()[1]
        try:
            yield balancer
        finally:
            nursery.cancel_scope.cancel()
