"""Batched thread hops: many short blocking calls from the event loop, one executor round trip.

Each ``run_in_executor`` costs a wake-up of a pool thread, a hand-back to the loop and, with
forty deliveries claiming at once, sixteen threads taking turns at the GIL around every
system call they make. The delivery process's strace counted ~100 futex calls per message.
``Hops.call`` queues the call instead; one worker thread runs everything queued so far, in
order, and the loop gets all the results back in one callback. Calls queued meanwhile go in
the next batch. Meant for calls of tens of microseconds (a rename and a small read), not for
fsync: a batch runs its calls one after another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

_T = TypeVar("_T")

_Call = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


class Hops:
    """Runs blocking calls in ``executor``, a batch at a time."""

    def __init__(self, executor: Executor | None = None) -> None:
        self._executor = executor
        self._pending: list[_Call] = []
        self._running = False

    def call(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_T] = loop.create_future()
        self._pending.append((fn, args, fut))
        if not self._running:
            self._start(loop)
        return fut

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._pending = self._pending, []
        try:
            done = loop.run_in_executor(self._executor, _run, batch)
        except RuntimeError as exc:  # the executor was shut down: these calls cannot run
            self._settle(batch, [(False, exc)] * len(batch))
            return
        self._running = True
        done.add_done_callback(lambda f: self._finished(loop, batch, f))

    def _finished(self, loop: asyncio.AbstractEventLoop, batch: list[_Call],
                  done: asyncio.Future[list[tuple[bool, Any]]]) -> None:
        self._running = False
        try:
            results = done.result()
        except BaseException as exc:  # handed to every caller of the batch
            results = [(False, exc)] * len(batch)
        self._settle(batch, results)
        if self._pending:
            self._start(loop)

    @staticmethod
    def _settle(batch: list[_Call], results: list[tuple[bool, Any]]) -> None:
        for (_fn, _args, fut), (ok, value) in zip(batch, results, strict=True):
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)


def _run(batch: list[_Call]) -> list[tuple[bool, Any]]:
    out: list[tuple[bool, Any]] = []
    for fn, args, _fut in batch:
        try:
            out.append((True, fn(*args)))
        except Exception as exc:
            out.append((False, exc))
    return out
