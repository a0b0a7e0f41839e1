"""systemd's notification protocol (``sd_notify``), without a dependency.

Under ``Type=notify`` systemd passes a Unix datagram socket in ``NOTIFY_SOCKET`` (a path, or an
abstract-namespace name written with a leading ``@``) and, with ``WatchdogSec=``, the watchdog
period in ``WATCHDOG_USEC``. The service sends ``READY=1`` when it is running, ``STATUS=…``
lines that ``systemctl status`` shows, ``WATCHDOG=1`` at half the watchdog period, and
``STOPPING=1`` when it begins to drain. Without ``NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class Notifier:
    """Sends ``sd_notify`` messages to systemd (or to whatever listens on ``NOTIFY_SOCKET``).

    Parameters
    ----------
    environ
        Where to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (default:
        ``os.environ``).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        self.watchdog_seconds: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        """Whether a notification socket is configured."""
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram.

        Returns
        -------
        bool
            Whether the message was sent (``False`` without a socket or when sending failed;
            a failure is logged, never raised: systemd going away must not stop the service).
        """
        if self.address is None or not assignments:
            return False
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (and a status line)."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """``STATUS=text`` (shown by ``systemctl status``)."""
        return self.notify(f"STATUS={text.replace(chr(10), ' ')}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is alive."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1`` (and a status line)."""
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))
