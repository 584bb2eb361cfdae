"""Embedded HTTP on hypercorn + trio: the listener plumbing and the operations app.

:func:`serve_asgi` runs any ASGI app on one ``host:port`` inside the caller's nursery (the
metrics listener and the webhook listener both use it); :func:`ops_app` is the app behind
the metrics listener: ``/metrics``, ``/healthz`` and ``/readyz``.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from trainguard.logs import get_logger
from trainguard.metrics import Metrics

__all__ = [
    "ASGIApp",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "ops_app",
    "parse_listen",
    "serve_asgi",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_log = get_logger(component="http")

_LISTEN_HELP = "expected HOST:PORT, e.g. 127.0.0.1:9100 or [::1]:9100"


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``"host:port"`` or ``"[v6-address]:port"`` into ``(host, port)``."""
    host, sep, port_text = value.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]") and ":" in host:
        host = host[1:-1]
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"invalid listen address {value!r}: put IPv6 addresses in brackets")
    if not sep or not host or not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"invalid listen address {value!r}: {_LISTEN_HELP}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"invalid listen address {value!r}: port {port} is above 65535")
    return host, port


#: accept() errors that mean "out of file descriptors or memory right now": wait and retry.
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_CAPACITY_RETRY_SECONDS = 0.1
DEFAULT_MAX_CONNECTIONS = 1024


async def serve_asgi(
    app: ASGIApp,
    listen: str,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    graceful_timeout: float = 5.0,
    read_timeout: float = 30.0,
    keep_alive_timeout: float = 5.0,
    max_header_bytes: int = 16 * 1024,
    max_body_bytes: int | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> None:
    """Serve ``app`` on ``listen`` until cancelled; start with ``await nursery.start(...)``.

    ``task_status.started((host, port))`` reports the bound address (port 0 picks a free
    one). When cancelled, new connections stop, requests in flight get ``graceful_timeout``
    seconds to finish, then the app's lifespan shutdown runs. A connection is closed when it
    sends no complete request head for ``keep_alive_timeout`` seconds (idle keep-alive and
    slow headers alike) or nothing at all for ``read_timeout`` seconds; an incomplete request
    head may buffer at most ``max_header_bytes``. With ``max_body_bytes``, a larger body gets
    413 instead of reaching the app. At most ``max_connections`` connections are open at
    once: while that many are, no other is accepted (it waits in the kernel's backlog), and
    an ``accept`` out of file descriptors is logged in one line and retried, never fatal.
    An address that cannot be bound raises one ``OSError``.
    """
    sock = _bind(listen)
    config = Config()
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    config.graceful_timeout = graceful_timeout
    config.shutdown_timeout = graceful_timeout
    config.read_timeout = read_timeout  # type: ignore[assignment]  # any float works
    config.keep_alive_timeout = keep_alive_timeout
    config.h11_max_incomplete_size = max_header_bytes
    config.h2_max_header_list_size = max_header_bytes
    if max_body_bytes is not None:
        app = _limit_body(app, max_body_bytes)

    shutdown = trio.Event()
    # The server runs shielded so that our cancellation becomes a graceful shutdown
    # (stop accepting, drain, lifespan shutdown) bounded by the deadline set below.
    server_scope = trio.CancelScope(shield=True)

    async def run_server(*, task_status: trio.TaskStatus[None]) -> None:
        with server_scope:
            await _serve(app, config, sock, listen, max_connections, shutdown, task_status)

    with sock:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(run_server)
                host, port = sock.getsockname()[:2]
                task_status.started((host, port))
                await trio.sleep_forever()
            finally:
                shutdown.set()
                server_scope.deadline = trio.current_time() + graceful_timeout + 1.0


async def _serve(
    app: ASGIApp,
    config: Config,
    sock: socket.socket,
    listen: str,
    max_connections: int,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[None],
) -> None:
    """hypercorn's trio worker (``hypercorn.trio.run.worker_serve``) for one bound socket,
    with our own accept loop: hypercorn has no bound on connections (only ``backlog``)."""
    wrapped = ASGIWrapper(app)  # type: ignore[arg-type]
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connections:
            sock.listen(config.backlog)
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            handler = partial(
                TCPServer, wrapped, config, context, ConnectionState(lifespan_state.copy())
            )
            async with trio.open_nursery() as acceptor:
                acceptor.start_soon(
                    _accept_loop, listener, handler, connections, max_connections, listen
                )
                task_status.started()
                await shutdown.wait()
                acceptor.cancel_scope.cancel()
            await listener.aclose()  # new connections are refused from now on
            await context.terminated.set()  # idle keep-alive connections close now
            connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


async def _accept_loop(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    connections: trio.Nursery,
    max_connections: int,
    listen: str,
) -> None:
    """Accept while fewer than ``max_connections`` are open; each runs in ``connections``."""
    slots = trio.Semaphore(max_connections)
    said_full = False  # the bound was reached and logged; logged again once it frees up

    async def serve_one(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except Exception as exc:  # one client's broken connection never stops the listener
            _log.warning(
                "connection closed on an error", listen=listen, error=f"{type(exc).__name__}: {exc}"
            )
        finally:  # as trio.serve_listeners does: closed even when cancelled
            try:
                await trio.aclose_forcefully(stream)
            finally:
                slots.release()

    while True:
        if slots.value == 0 and not said_full:
            said_full = True
            _log.warning(
                "connection limit reached: new connections wait until one closes",
                listen=listen,
                max_connections=max_connections,
            )
        await slots.acquire()
        said_full = said_full and slots.value == 0
        try:
            stream = await listener.accept()
        except OSError as exc:
            slots.release()
            if exc.errno not in _CAPACITY_ERRNOS:
                raise
            _log.warning(
                "accept failed: out of file descriptors or memory; retrying",
                listen=listen,
                error=f"{errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror}",
            )
            await trio.sleep(_CAPACITY_RETRY_SECONDS)
            continue
        connections.start_soon(serve_one, stream)


def _bind(listen: str) -> socket.socket:
    """A TCP socket bound to ``listen``; one ``OSError`` naming the address if impossible."""
    host, port = parse_listen(listen)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"cannot listen on {listen}: {error.strerror}") from error
    return sock


async def respond(
    send: Send,
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    head: bool = False,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    """Send a complete response (no body bytes for HEAD, same headers as GET)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


class BodyTooLarge(ValueError):
    """A request body grew past the limit given to ``read_body``."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"body larger than {limit} bytes")
        self.limit = limit


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """A request's whole body, or None if the client disconnected before its end; raises
    ``BodyTooLarge`` as soon as it grows past ``limit`` bytes (nothing more is read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def lifespan(receive: Receive, send: Send) -> None:
    """Answer the ASGI lifespan protocol: nothing to set up or tear down."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def ops_app(
    metrics: Metrics,
    *,
    ready: Callable[[], bool],
    healthy: Callable[[], bool] = lambda: True,
    extra: ASGIApp | None = None,
) -> ASGIApp:
    """The metrics listener's app: ``GET``/``HEAD`` on ``/metrics``, ``/healthz``, ``/readyz``.

    ``/healthz`` is 200 while ``healthy()``, ``/readyz`` is 200 only while ``ready()``; both
    answer 503 otherwise. Other HTTP and websocket requests go to ``extra`` when given
    (which then sees no lifespan events), else get 404 (or 405 for a wrong method).
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        path = scope.get("path")
        if scope["type"] != "http" or path not in ("/metrics", "/healthz", "/readyz"):
            if extra is not None:
                await extra(scope, receive, send)
            elif scope["type"] == "http":
                await respond(send, 404, b"not found\n", head=scope["method"] == "HEAD")
            elif scope["type"] == "websocket":
                await send({"type": "websocket.close"})
            return
        head = scope["method"] == "HEAD"
        if scope["method"] not in ("GET", "HEAD"):
            await respond(send, 405, b"method not allowed\n", headers=((b"allow", b"GET, HEAD"),))
        elif path == "/metrics":
            body = metrics.render()
            await respond(send, 200, body, content_type=metrics.content_type, head=head)
        elif path == "/healthz":
            ok = healthy()
            await respond(send, 200 if ok else 503, b"ok\n" if ok else b"unhealthy\n", head=head)
        else:
            ok = ready()
            await respond(send, 200 if ok else 503, b"ready\n" if ok else b"not ready\n", head=head)

    return app


def _limit_body(app: ASGIApp, max_bytes: int) -> ASGIApp:
    """Wrap ``app`` so that an HTTP request body over ``max_bytes`` is answered with 413.

    A declared ``Content-Length`` over the limit never reaches ``app``; a streamed body that
    grows past it looks like a client disconnect to ``app``, and the 413 is sent unless
    ``app`` had already started its response.
    """
    too_large = partial(respond, status=413, body=b"request body too large\n")

    async def limited(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > max_bytes:
            await too_large(send)
            return
        received = 0
        overflow = started = False

        async def limited_receive() -> Message:
            nonlocal received, overflow
            if overflow:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    overflow = True
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if overflow and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await app(scope, limited_receive, tracked_send)
        if overflow and not started:
            await too_large(send)

    return limited
