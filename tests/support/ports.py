"""Hands out 127.0.0.1 ports for the tests' listeners (relayd, Postfix, PostgreSQL) and for
"nothing listens here" cases.

Why not bind port 0 and close it: the kernel gives that port from its ephemeral range, the
same range it uses for the source port of every outgoing connection. Between the close and the
child's bind, one of the suite's own connections may take it, and the child fails with "address
already in use". Ports below the ephemeral range are never handed out for outgoing
connections, so a port that binds now stays free until a test binds it itself.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterator
from pathlib import Path

_LOWEST = 10000


def _ephemeral_floor() -> int:
    """The lowest port the kernel uses for outgoing connections (32768 when unreadable)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class PortRange:
    """Walks ports ``low``..``high``-1 from ``start``, wrapping, giving each bindable one."""

    def __init__(self, low: int, high: int, start: int) -> None:
        self._ports: Iterator[int] = (low + (start - low + i) % (high - low)
                                      for i in itertools.count())
        self._size = high - low

    def take(self) -> int:
        for _ in range(self._size):
            port = next(self._ports)
            with socket.socket() as s:
                try:
                    # No SO_REUSEADDR: a port with a connection in TIME_WAIT is skipped too.
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
        raise RuntimeError("no free port on 127.0.0.1 below the ephemeral range")


def _suite_range() -> PortRange:
    low, high = _LOWEST, max(_LOWEST + 1000, _ephemeral_floor())
    # Start at a point set by the process id so two suites on one machine (a clean clone's
    # `make test` beside a working copy's) walk different parts of the range.
    return PortRange(low, high, low + os.getpid() % (high - low))


_SUITE = _suite_range()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing is bound to now and the kernel will not hand out for
    an outgoing connection; each call gives a different one until the range wraps."""
    return _SUITE.take()
