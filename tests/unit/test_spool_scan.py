"""Listing the spool without a list: the streaming counts and snapshot, the batched scan of
queued/, and the queue manager's rescan, which reads only the files it does not know."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from relayd.config.schema import SpoolConfig
from relayd.delivery.qmgr import QueueManager
from relayd.model import Envelope, Message, State
from relayd.spool.records import Meta
from relayd.spool.store import Spool
from tests.support.waiting import wait_until


def _msg(i: int, priority: bool = False) -> Message:
    env = Envelope("alice@example.com", ("bob@example.com",), client="127.0.0.1", helo="app",
                   received_at=1_700_000_000.0 + i, priority=priority)
    return Message(env, b"Subject: %d\r\n\r\nhello\r\n" % i)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool", fsync=False, keep_recent=False)
    s.ensure_dirs()
    return s


def test_ids_counts_and_snapshot(spool: Spool) -> None:
    assert spool.snapshot() == ({st: 0 for st in (State.QUEUED, State.ACTIVE, State.HELD,
                                                    State.FAILED)}, None)
    ids = [spool.put(_msg(i)) for i in range(5)]
    (spool.path / "queued" / "stray.tmp").write_bytes(b"")  # not a message file
    (spool.path / "active" / "stray.msg").write_bytes(b"")  # not a queue ID
    spool.claim(ids[0])
    spool.hold(ids[1])
    assert sorted(spool.ids(State.QUEUED)) == sorted(ids[2:])
    counts, oldest = spool.snapshot()
    assert counts == spool.counts() == {State.QUEUED: 3, State.ACTIVE: 2, State.HELD: 1,
                                        State.FAILED: 0}
    # the oldest queued or active message, from its ID (held ones do not count)
    assert oldest == pytest.approx(1_700_000_000.0, abs=1e-6)
    spool.complete(ids[0])
    assert spool.snapshot()[1] == pytest.approx(1_700_000_002.0, abs=1e-6)


def test_queued_scan_hands_out_every_id_once_in_batches(spool: Spool) -> None:
    ids = {spool.put(_msg(i)) for i in range(25)}
    scan = spool.scan_queued()
    batches = []
    while batch := scan.next_batch(10):
        batches.append(batch)
    assert [len(b) for b in batches] == [10, 10, 5]
    assert sorted(q for b in batches for q in b) == sorted(ids)
    assert scan.next_batch(10) == []  # finished: stays finished
    scan.close()
    early = spool.scan_queued()
    assert len(early.next_batch(3)) == 3
    early.close()  # before the end: the directory is closed, nothing more comes
    assert early.next_batch(3) == []


def test_schedule_rows_skips_gone_files_and_sets_aside_unreadable_ones(spool: Spool) -> None:
    plain, prio, retried, torn = (spool.put(_msg(i, priority=i == 1)) for i in range(4))
    spool.write_meta(retried, Meta(attempts=2, next_attempt=1_800_000_000.0))
    raw = (spool.path / "queued" / f"{torn}.msg").read_bytes()
    (spool.path / "queued" / f"{torn}.msg").write_bytes(raw[:30])
    rows = spool.schedule_rows([plain, "0123456789ABCDEF01", prio, torn, retried])
    assert rows == [(plain, None, False), (prio, None, True), (retried, 1_800_000_000.0, False)]
    assert os.listdir(spool.path / "corrupt") == [f"{torn}.msg"]


class _Pools:
    def __call__(self, sh: object) -> object:
        raise AssertionError("no delivery in these tests")


async def test_rescan_reads_only_messages_it_does_not_know(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("relayd.delivery.qmgr.RESCAN_BATCH", 7)
    now = 1_700_000_100.0
    qm = QueueManager(spool, SpoolConfig(path=spool.path), [], _Pools(),  # type: ignore[arg-type]
                      clock=lambda: now)
    ids = [spool.put(_msg(i, priority=i % 5 == 0)) for i in range(30)]
    far = ids[3]
    spool.write_meta(far, Meta(next_attempt=now + 10 * 86400))  # e.g. the clock was set back
    read: list[str] = []
    real = spool.schedule_rows

    def counting(qids: list[str]) -> list[tuple[str, float | None, bool]]:
        read.extend(qids)
        return real(qids)

    monkeypatch.setattr(spool, "schedule_rows", counting)
    assert await qm.load() == 30
    assert sorted(read) == sorted(ids) and qm.statistics().scheduled == 30
    assert qm._schedule.due(far) == now + qm.cfg.retry.max_interval  # capped at the longest backoff
    assert qm._schedule.due(ids[1]) == now
    read.clear()
    new = spool.put(_msg(99))
    assert await qm.load() == 31
    assert read == [new]  # the other 30 are scheduled already: their files are not opened
    order = [qm._schedule.pop_due(now) for _ in range(31)]
    assert set(order[:6]) == {q for i, q in enumerate(ids) if i % 5 == 0}  # priority mail first
    assert set(order) == {*ids, new} - {far} | {None}


async def test_rescan_is_cancellable_and_closes_its_listing(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("relayd.delivery.qmgr.RESCAN_BATCH", 1)
    for i in range(50):
        spool.put(_msg(i))
    qm = QueueManager(spool, SpoolConfig(path=spool.path), [], _Pools())  # type: ignore[arg-type]
    closed: list[bool] = []
    real = spool.scan_queued

    def tracking() -> object:
        scan = real()
        close = scan.close
        monkeypatch.setattr(scan, "close", lambda: (closed.append(True), close())[1])
        return scan

    monkeypatch.setattr(spool, "scan_queued", tracking)
    task = asyncio.create_task(qm.load())
    await wait_until(lambda: qm.statistics().scheduled >= 3, what="the scan under way", interval=0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed == [True]
    assert 0 < qm.statistics().scheduled < 50


def test_headers_longer_than_one_read_and_torn_inside(spool: Spool) -> None:
    rcpts = tuple(f"user{i}@example.net" for i in range(600))  # a ~15 KB header
    env = Envelope("alice@example.com", rcpts, received_at=1_700_000_000.0, priority=True)
    big = spool.put(Message(env, b"Subject: many\r\n\r\nhi\r\n"))
    torn = spool.put(Message(env, b"Subject: many\r\n\r\nhi\r\n"))
    path = spool.path / "queued" / f"{torn}.msg"
    path.write_bytes(path.read_bytes()[:9000])  # cut inside the header
    assert spool.get(big).envelope == env
    assert spool.schedule_rows([big, torn]) == [(big, None, True)]
    assert os.listdir(spool.path / "corrupt") == [f"{torn}.msg"]
