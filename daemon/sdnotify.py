"""The systemd notify protocol (``Type=notify``, watchdog) without dependencies.

Every call is a no-op when ``$NOTIFY_SOCKET`` is unset (not started by systemd) and never
raises: a failed send is logged and forgotten, since the daemon's work matters more than
telling systemd about it. Nor does a call ever block: a message the socket cannot take at
once (nobody reads it) is dropped and counted in ``Notifier.dropped``, logged once per run
of drops.
"""

from __future__ import annotations

import os
import socket

from trainguard.logs import WARN, get_logger

__all__ = ["Notifier", "watchdog_interval"]

log = get_logger(component="sdnotify")


class Notifier:
    """Sends state changes to the socket named by ``$NOTIFY_SOCKET`` (read once, at init)."""

    def __init__(self) -> None:
        path = os.environ.get("NOTIFY_SOCKET", "")
        # A leading "@" names a socket in Linux's abstract namespace.
        self._address: str | None = "\0" + path[1:] if path.startswith("@") else path or None
        #: Messages dropped because the socket was full; ``_dropping``: since the last sent.
        self.dropped = 0
        self._dropping = 0

    @staticmethod
    def watchdog_interval() -> float | None:
        """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or None if not asked.

        None also when ``$WATCHDOG_PID`` is set to another process than this one.
        """
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0:
            return None
        if pid and (not pid.isdigit() or int(pid) != os.getpid()):
            return None
        return int(usec) / 2_000_000

    @property
    def enabled(self) -> bool:
        """True when systemd asked for notifications."""
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (``notify(READY=1, STATUS="...")``); True if sent."""
        if self._address is None or not fields:
            return False
        payload = "".join(f"{key}={value}\n" for key, value in fields.items())
        kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        try:
            with socket.socket(socket.AF_UNIX, kind) as sock:
                sock.sendto(payload.encode(), self._address)
        except BlockingIOError:
            self.dropped += 1
            self._dropping += 1
            if self._dropping == 1:
                log.warning(
                    f"{WARN} sd_notify dropped: the notify socket is full (not read); "
                    "dropping until it takes messages again",
                    fields=sorted(fields),
                )
            return False
        except OSError as error:
            log.warning("sd_notify failed", fields=sorted(fields), error=str(error))
            return False
        if self._dropping:
            log.info("sd_notify sends again", dropped=self._dropping)
            self._dropping = 0
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd that start-up is complete (optionally with a status line)."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def stopping(self) -> bool:
        """Tell systemd that shutdown has begun."""
        return self.notify(STOPPING=1)

    def reloading(self) -> bool:
        """Tell systemd that a configuration reload has begun."""
        return self.notify(RELOADING=1)

    def status(self, text: str) -> bool:
        """Set the one-line status shown by ``systemctl status``."""
        return self.notify(STATUS=text.replace("\n", " "))

    def watchdog(self) -> bool:
        """Ping the watchdog (call every :func:`watchdog_interval` seconds)."""
        return self.notify(WATCHDOG=1)


watchdog_interval = Notifier.watchdog_interval
