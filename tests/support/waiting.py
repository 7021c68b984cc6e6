"""Waiting for something with a deadline: the one polling loop of the tests.

``wait_until`` (async) polls a condition, plain or a coroutine function, until it returns
something true and returns that; ``wait_until_sync`` does the same where no event loop runs
(a worker thread, a blocking ``start()``). A check that *starts* before the deadline counts
even if it ends after it; one that starts later and fails raises ``WaitTimeout``, an
AssertionError, so a timeout fails the test with ``what`` in its message.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

Description = str | Callable[[], str]   # a callable is asked only on timeout (e.g. for a log tail)


class WaitTimeout(AssertionError):
    """The condition did not hold within the timeout."""


def _timed_out(what: Description, timeout: float) -> WaitTimeout:
    text = what() if callable(what) else what
    return WaitTimeout(f"timed out after {timeout:g}s waiting for {text}")


async def wait_until(cond: Callable[[], T | Awaitable[T]], timeout: float = 10.0,
                     what: Description = "condition", *, interval: float = 0.02) -> T:
    """Poll ``cond`` (sync or async) every ``interval`` seconds until it returns a true value."""
    deadline = time.monotonic() + timeout
    while True:
        started = time.monotonic()
        result = cond()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if started > deadline:
            raise _timed_out(what, timeout)
        await asyncio.sleep(interval)


def wait_until_sync(cond: Callable[[], T], timeout: float = 10.0, what: Description = "condition",
                    *, interval: float = 0.02) -> T:
    """``wait_until`` for code without an event loop: blocks the calling thread."""
    deadline = time.monotonic() + timeout
    while True:
        started = time.monotonic()
        result = cond()
        if result:
            return result
        if started > deadline:
            raise _timed_out(what, timeout)
        time.sleep(interval)


__all__ = ["WaitTimeout", "wait_until", "wait_until_sync"]
