"""Fault injection for the crash and local-fault tests: named points, inert unless armed.

The reliability tests (tests/integration/test_crash_points.py, bench/crash_cycles.py,
bench/soak.py) prove the RFC 5321 §6.1 promise, "a 250 means the message survives a crash",
by killing a real ``relayd`` process at the exact places where a crash hurts most. Code on
those paths calls ``crash_point(name)`` / ``fail_point(name)``; in production neither does
anything beyond one cached lookup, because the environment variables below are never set.

``RELAYD_CRASH_AT=<point>[@<n>]``
    The process sends itself SIGKILL the ``n``-th time (default: the first time) execution
    reaches ``crash_point(<point>)``. SIGKILL, not an exception or ``sys.exit``: no finally
    blocks, no atexit, no flushing, exactly like the OOM killer or a power cut of the process.
``RELAYD_FAIL_AT=<point>[@<n>]``
    From the ``n``-th time on, ``fail_point(<point>)`` raises ``OSError(ENOSPC)``: a full disk
    for hosts where the tests cannot mount a small tmpfs.

The points (where they are called, and what a crash there means):

- ``data``: listener, while reading DATA (after 354, before the final dot was answered).
- ``spool-fsync``: storing a batch of messages (spool_write.Writer.put_batch), after their
  files were flushed to disk (fsync or syncfs) and before the renames into queued/.
- ``before-250``: daemon intake, after the spool commit and before the 250 is written.
- ``after-upstream-250``: queue manager, after a smarthost answered a delivery and before
  the spool records the outcome (the at-least-once duplicate window).
- ``spool-recycle``: Spool.complete, right after a delivered message's file moved into free/
  for reuse, content and all (relayd/spool/free.py).
- ``queue-command``: Spool.retry/release, between the renames of an operator command run by
  ``relayd queue`` in another process.
- ``spool-write`` (fail only): storing a message, after its bytes were written and before the
  flush (where a delayed-allocation filesystem reports ENOSPC).

The environment is read once per process, on the first call; the armed plan keeps a hit
counter (the only mutable state, and only when armed).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

CRASH_ENV = "RELAYD_CRASH_AT"
FAIL_ENV = "RELAYD_FAIL_AT"
POINTS = ("data", "spool-fsync", "before-250", "after-upstream-250", "spool-recycle", "queue-command",
          "spool-write")


def _kill_self() -> None:
    # In relayd run's delivery process (relayd/daemon/child.py) the point stands for a kill of the
    # whole service, as systemd's KillMode=control-group does: the parent goes first.
    parent = os.environ.get("RELAYD_DELIVERY_PARENT", "")
    if parent.isdigit():
        with contextlib.suppress(OSError):
            os.kill(int(parent), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Trigger:
    """One armed point: fires on the ``nth`` hit (crash) or from the ``nth`` hit on (fail)."""

    point: str
    nth: int = 1
    _hits: Callable[[], int] = field(default_factory=lambda: itertools.count(1).__next__, repr=False)

    @classmethod
    def parse(cls, value: str | None) -> Trigger | None:
        """``point`` or ``point@n``; None for unset/empty. Unknown points raise ValueError so a
        typo in a test does not silently test nothing."""
        if not value:
            return None
        point, _, nth = value.partition("@")
        if point not in POINTS:
            raise ValueError(f"{value!r}: unknown fault point (known: {', '.join(POINTS)})")
        n = int(nth) if nth else 1
        if n < 1:
            raise ValueError(f"{value!r}: the hit number must be 1 or more")
        return cls(point, n)

    def hit(self, name: str) -> int:
        """The hit number for ``name`` at this point (0 when the point is not this one).
        ``itertools.count().__next__`` is atomic under the GIL (executor threads call it)."""
        return self._hits() if name == self.point else 0


@dataclass(frozen=True)
class Plan:
    """What this process was armed with."""

    crash: Trigger | None = None
    fail: Trigger | None = None
    kill: Callable[[], None] = _kill_self

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Plan:
        return cls(crash=Trigger.parse(environ.get(CRASH_ENV)),
                   fail=Trigger.parse(environ.get(FAIL_ENV)))

    def crash_point(self, name: str) -> None:
        if self.crash is not None and self.crash.hit(name) == self.crash.nth:
            self.kill()

    def fail_point(self, name: str) -> None:
        if self.fail is not None and self.fail.hit(name) >= self.fail.nth:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@functools.cache
def _plan() -> Plan:
    return Plan.from_environ(os.environ)


def crash_point(name: str) -> None:
    """SIGKILL this process here when ``RELAYD_CRASH_AT`` names this point (tests only)."""
    _plan().crash_point(name)


def fail_point(name: str) -> None:
    """Raise OSError(ENOSPC) here when ``RELAYD_FAIL_AT`` names this point (tests only)."""
    _plan().fail_point(name)
