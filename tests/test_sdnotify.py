"""daemon.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from daemon.sdnotify import Notifier, watchdog_interval


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
