"""systemd integration without libsystemd: sd_notify(3) messages and sd_listen_fds(3).

``Notifier`` sends readiness, reload, stop, status and watchdog datagrams to
``$NOTIFY_SOCKET``; it is a no-op outside systemd. ``listen_fds()`` returns the sockets
passed by socket activation (``relayd.socket``). Both are best-effort and never block: a
notification that cannot be sent is logged at debug level and dropped, because a daemon
must not stop relaying mail over a status message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger("relayd.sdnotify")

# sd_listen_fds(3): passed descriptors start at 3 (SD_LISTEN_FDS_START).
SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify(3) state strings to the service manager.

    ``address`` is the socket path from ``$NOTIFY_SOCKET`` (``@name`` for the Linux abstract
    namespace) or None outside systemd, where every method does nothing.
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self._address: str | bytes | None = None
        if address:
            # A leading '@' names an abstract socket: the kernel wants a NUL byte there.
            self._address = "\0" + address[1:] if address.startswith("@") else address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET``; the watchdog is enabled as sd_watchdog_enabled(3)
        says: ``$WATCHDOG_USEC`` set and ``$WATCHDOG_PID`` unset or equal to our pid."""
        env = os.environ if environ is None else environ
        usec: int | None = None
        raw = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if raw.isdigit() and int(raw) > 0 and (not pid or pid == str(os.getpid())):
            usec = int(raw)
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens for notifications."""
        return self._address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields as one datagram; True if it was sent."""
        if self._address is None:
            return False
        payload = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            # Best effort (sd_notify(3) ignores errors too); a full socket buffer must not
            # block the event loop.
            log.debug("sd_notify to %r failed: %s", self._address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: listeners bound, spool recovered (also ends a reload)."""
        return self.notify("READY=1", *((f"STATUS={status}",) if status else ()))

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC``; without the timestamp systemd >= 253
        ignores the message (sd_notify(3)). Send ``ready()`` when the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """``STOPPING=1`` at the start of shutdown."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """``STATUS=`` one line shown by ``systemctl status``."""
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1`` keep-alive; send it from the event loop so a wedged loop trips it."""
        if self._watchdog_usec is None:
            return False
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between keep-alives (half of ``WatchdogSec=``), or None if disabled."""
        if self._watchdog_usec is None or self._address is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def run_watchdog(notifier: Notifier) -> None:
    """Send ``WATCHDOG=1`` every ``watchdog_interval()`` until cancelled; returns at once when
    the watchdog is disabled. Run it in the daemon's TaskGroup: because it shares the event
    loop with the relay, a blocked loop stops the keep-alives and systemd restarts relayd."""
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def listen_fds(environ: MutableMapping[str, str] | None = None,
               *, unset: bool = True) -> list[socket.socket]:
    """The sockets passed by systemd socket activation, in ``ListenStream=`` order.

    Honoured only when ``$LISTEN_PID`` is our pid (the variables may have been inherited from
    a parent). The variables are removed afterwards (``unset``) so children, such as a
    sendmail run from a hook, do not claim the descriptors. Descriptors get FD_CLOEXEC.
    """
    env = os.environ if environ is None else environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        count, pid = 0, -1
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return []
    socks: list[socket.socket] = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        # socket.socket(fileno=) detects family and type from the descriptor itself.
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        socks.append(sock)
    return socks


def listen_fd_names(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """``$LISTEN_FDNAMES`` (``FileDescriptorName=``) split on ':'; read before listen_fds()."""
    env = os.environ if environ is None else environ
    names = env.get("LISTEN_FDNAMES", "")
    return names.split(":") if names else []
