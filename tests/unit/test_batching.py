"""Batched thread hops (relayd/spool/batching.py): every call gets its own result or exception, in
order, calls made while a batch runs go in the next one, and no call is lost or run twice."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from relayd.spool.batching import Batches, Err, Hops, Ok, Outcome


class CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(4)
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


async def test_results_and_errors_go_to_their_own_callers() -> None:
    with CountingExecutor() as ex:
        hops = Hops(ex)

        def work(i: int) -> int:
            if i % 3 == 0:
                raise ValueError(f"bad {i}")
            return i * 10

        results = await asyncio.gather(*(hops.call(work, i) for i in range(10)),
                                       return_exceptions=True)
    for i, r in enumerate(results):
        if i % 3 == 0:
            assert isinstance(r, ValueError) and str(r) == f"bad {i}"
        else:
            assert r == i * 10


async def test_calls_made_during_a_batch_run_together_in_the_next() -> None:
    release = threading.Event()
    ran: list[tuple[str, str]] = []
    with CountingExecutor() as ex:
        hops = Hops(ex)

        def first() -> str:
            release.wait(5)
            ran.append(("first", threading.current_thread().name))
            return "first"

        def later(i: int) -> int:
            ran.append((f"later{i}", threading.current_thread().name))
            return i

        f = hops.call(first)
        await asyncio.sleep(0)  # the first batch is in the executor now
        rest = [hops.call(later, i) for i in range(20)]
        assert ex.submitted == 1
        release.set()
        assert await f == "first"
        assert await asyncio.gather(*rest) == list(range(20))
        assert ex.submitted == 2  # twenty calls, one round trip
    assert [name for name, _ in ran] == ["first"] + [f"later{i}" for i in range(20)]
    assert len({thread for _, thread in ran[1:]}) == 1


async def test_a_cancelled_caller_does_not_disturb_the_others() -> None:
    release = threading.Event()
    with CountingExecutor() as ex:
        hops = Hops(ex)
        blocker = hops.call(release.wait, 5)
        await asyncio.sleep(0)
        a, b = hops.call(lambda: "a"), hops.call(lambda: "b")
        a.cancel()
        release.set()
        assert await blocker is True
        assert await b == "b"
        with pytest.raises(asyncio.CancelledError):
            await a


async def test_an_executor_that_was_shut_down_fails_the_calls() -> None:
    ex = ThreadPoolExecutor(1)
    ex.shutdown()
    hops = Hops(ex)
    with pytest.raises(RuntimeError):
        await hops.call(lambda: 1)
    with pytest.raises(RuntimeError):  # and the next call still gets an answer
        await hops.call(lambda: 2)


async def test_a_batch_function_sees_every_item_queued_meanwhile_in_one_list() -> None:
    """The spool's writes: one call of the batch function stores everything that arrived
    while the previous batch ran, and a batch function that raises fails all its items."""
    release = threading.Event()
    seen: list[list[int]] = []

    def store(items: list[int]) -> list[Outcome]:
        seen.append(items)
        if items == [0]:
            release.wait(10)
        if 99 in items:
            raise OSError("the disk went away")
        return [Ok(i * 2) if i != 3 else Err(ValueError("three")) for i in items]

    with ThreadPoolExecutor(4) as ex:
        batches: Batches[int] = Batches(store, ex)
        first = batches.submit(0)
        rest = [batches.submit(i) for i in range(1, 6)]
        release.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        assert seen == [[0], [1, 2, 3, 4, 5]]
        assert results[:3] == [0, 2, 4] and results[4:] == [8, 10]
        assert isinstance(results[3], ValueError)
        release.clear()
        blocker = batches.submit(0)
        failed = [batches.submit(98), batches.submit(99)]  # queued together behind the blocker
        release.set()
        assert await blocker == 0
        got = await asyncio.gather(*failed, return_exceptions=True)
    assert seen[-1] == [98, 99]
    assert all(isinstance(r, OSError) and "went away" in str(r) for r in got)
