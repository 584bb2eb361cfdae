"""Who this instance is: the owner id of its claims (and, later, of its heartbeat row).

``[cluster] instance_id`` names an instance for good; when it is empty, one is made up at
each start as ``HOST-PID-HEX`` (the host name, the process id, a random suffix), so two
processes never share an id, on one host or on several.

A made-up id also says where its owner ran: ``gone(owner)`` is True when it names a process
of THIS host that no longer runs (a SIGKILLed instance that was restarted), so its claims can
be taken over at once instead of after their expiry. An owner of another host, a configured
name or a process id that is alive again (reused) is never called gone: its claims wait for
their expiry.
"""

from __future__ import annotations

import os
import re
import secrets
import socket

from trainguard.config import Settings

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: ``HOST-PID-HEX``: the host may hold dashes itself, the last two parts never do.
_MADE_UP = re.compile(r"(?P<host>.+)-(?P<pid>[0-9]+)-[0-9a-f]{6}")


def _host() -> str:
    return _UNSAFE.sub("_", socket.gethostname())[:40] or "host"


def made_up() -> str:
    """A fresh ``HOST-PID-HEX`` id for this process."""
    return f"{_host()}-{os.getpid()}-{secrets.token_hex(3)}"


def instance_id(settings: Settings) -> str:
    """``[cluster] instance_id``, or a made-up one when it is empty (see the module doc)."""
    return str(settings.cluster["instance_id"]) or made_up()


def gone(owner: str) -> bool:
    """Whether ``owner`` is a made-up id of a process of this host that no longer runs."""
    match = _MADE_UP.fullmatch(owner)
    if match is None or match["host"] != _host():
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's (EPERM), or not ours to ask: not gone
        return False
    return False
