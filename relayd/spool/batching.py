"""Batched thread hops: many short blocking calls from the event loop, one executor round trip.

Each ``run_in_executor`` costs a wake-up of a pool thread, a hand-back to the loop and, with
forty deliveries claiming at once, sixteen threads taking turns at the GIL around every
system call they make (docs/performance.md, "Claims in batches", has the count).
``Batches.submit`` queues an item instead; one worker thread hands everything queued so far
to the batch function, and the loop gets all the results back in one callback. Items queued
meanwhile go in the next batch, so at most one batch runs at a time.

``Hops.call`` batches arbitrary calls, run one after another: meant for calls of tens of
microseconds (a rename and a small read), not for fsync. The spool's writes use ``Batches``
directly, with a batch function that flushes all of a batch's files at once (spool/write.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

_T = TypeVar("_T")
_I = TypeVar("_I")


@dataclass(frozen=True, slots=True)
class Ok(Generic[_T]):
    """An item's call returned ``value``."""

    value: _T


@dataclass(frozen=True, slots=True)
class Err:
    """An item's call raised ``error``: it is raised again in that item's caller only."""

    error: BaseException


# What a batch function returns for each item, in order.
Outcome = Ok[Any] | Err


class Batches(Generic[_I]):
    """Hands items to ``run`` in ``executor``, a batch at a time. ``run`` takes the list of
    items and returns one ``Outcome`` per item; an exception it raises fails the whole batch."""

    def __init__(self, run: Callable[[list[_I]], list[Outcome]],
                 executor: Executor | None = None) -> None:
        self._run = run
        self._executor = executor
        self._pending: list[tuple[_I, asyncio.Future[Any]]] = []
        self._running = False

    def submit(self, item: _I) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((item, fut))
        if not self._running:
            self._start(loop)
        return fut

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._pending = self._pending, []
        try:
            done = loop.run_in_executor(self._executor, self._run, [item for item, _ in batch])
        except RuntimeError as exc:  # the executor was shut down: these calls cannot run
            self._settle(batch, [Err(exc)] * len(batch))
            return
        self._running = True
        done.add_done_callback(lambda f: self._finished(loop, batch, f))

    def _finished(self, loop: asyncio.AbstractEventLoop,
                  batch: list[tuple[_I, asyncio.Future[Any]]],
                  done: asyncio.Future[list[Outcome]]) -> None:
        self._running = False
        try:
            results = done.result()
        except BaseException as exc:  # handed to every caller of the batch
            results = [Err(exc)] * len(batch)
        self._settle(batch, results)
        if self._pending:
            self._start(loop)

    @staticmethod
    def _settle(batch: list[tuple[_I, asyncio.Future[Any]]], results: list[Outcome]) -> None:
        for (_item, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, Ok):
                fut.set_result(result.value)
            else:
                fut.set_exception(result.error)


_Call = tuple[Callable[..., Any], tuple[Any, ...]]


class Hops:
    """Runs blocking calls in ``executor``, a batch at a time, one call after another."""

    def __init__(self, executor: Executor | None = None) -> None:
        self._batches: Batches[_Call] = Batches(_run_calls, executor)

    def call(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        return cast("asyncio.Future[_T]", self._batches.submit((fn, args)))


def _run_calls(batch: list[_Call]) -> list[Outcome]:
    out: list[Outcome] = []
    for fn, args in batch:
        try:
            out.append(Ok(fn(*args)))
        except Exception as exc:
            out.append(Err(exc))
    return out
