"""daemon.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from trainguard.sdnotify import Notifier, watchdog_interval


@pytest.fixture
def systemd(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket at a short path (AF_UNIX paths are limited to 107 bytes)."""
    with (
        tempfile.TemporaryDirectory(prefix="tg-") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        path = os.path.join(directory, "notify")
        sock.bind(path)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield sock


def test_messages_are_sent(systemd: socket.socket) -> None:
    notifier = Notifier()
    assert notifier.enabled
    assert notifier.ready("listening on 127.0.0.1:9100")
    assert systemd.recv(4096) == b"READY=1\nSTATUS=listening on 127.0.0.1:9100\n"
    assert notifier.ready()
    assert systemd.recv(4096) == b"READY=1\n"
    assert notifier.status("3 in flight\nsecond line")
    assert systemd.recv(4096) == b"STATUS=3 in flight second line\n"
    assert notifier.watchdog()
    assert systemd.recv(4096) == b"WATCHDOG=1\n"
    assert notifier.reloading()
    assert systemd.recv(4096) == b"RELOADING=1\n"
    assert notifier.stopping()
    assert systemd.recv(4096) == b"STOPPING=1\n"
    assert notifier.notify(STATUS="custom", EXTEND_TIMEOUT_USEC=5_000_000)
    assert systemd.recv(4096) == b"STATUS=custom\nEXTEND_TIMEOUT_USEC=5000000\n"


def test_a_socket_nobody_reads_never_blocks_the_sender(systemd: socket.socket) -> None:
    """issue 9 item 12: a notify socket that was not read blocked the daemon in sendto."""
    notifier = Notifier()
    sent = 0
    with capture_logs() as lines:

        def flood() -> None:
            nonlocal sent
            sent = sum(notifier.status(f"pass {i} " + "x" * 200) for i in range(5000))

        worker = threading.Thread(target=flood, daemon=True)
        worker.start()
        worker.join(60)  # a blocking sendto never returns: the receiver does not read
        assert not worker.is_alive(), "the notifier blocked on a full socket"
    assert 0 < sent < 5000 and notifier.dropped == 5000 - sent
    full = [line for line in lines if "notify socket is full" in line["event"]]
    assert len(full) == 1, lines  # logged once, not 5000 times
    while True:  # systemd reads again: the next message goes through, the drops are told
        try:
            systemd.recv(4096)
        except TimeoutError:
            break
        systemd.settimeout(0.01)
    with capture_logs() as lines:
        assert notifier.watchdog()
    assert [line["dropped"] for line in lines if line["event"] == "sd_notify sends again"] == [
        notifier.dropped
    ]


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"trainguard-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert Notifier().ready()
        assert sock.recv(4096) == b"READY=1\n"


def test_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()


def test_send_failure_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/trainguard/notify")
    notifier = Notifier()
    assert notifier.enabled
    assert not notifier.ready()
    assert not notifier.stopping()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("0", None, None),
        ("soon", None, None),
        ("1000000", "not-a-pid", None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            own = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}
            monkeypatch.setenv(name, own.get(value, value))
    assert watchdog_interval() == expected
    assert Notifier.watchdog_interval() == expected
