"""Storing messages in batches (relayd/spool/write.py): every message of a batch is durable in
queued/ or refused on its own, and the one-syncfs-per-batch shortcut steps aside when the
file system is busy with other writers or the kernel cannot report its errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from relayd.errors import SpoolError
from relayd.model import Envelope, Message, State
from relayd.spool.records import parse_file
from relayd.spool.store import Spool
from relayd.spool.write import (
    DIRTY_LIMIT_KB,
    SLOW_PAUSE,
    SLOW_SYNC,
    Flush,
    Flusher,
    dirty_kb,
    kernel_reports_syncfs_errors,
    load_syncfs,
)
from tests.support.clock import FakeClock


def _msg(n: int) -> Message:
    env = Envelope("app@example.com", (f"user{n}@example.net",), client="127.0.0.1", helo="app",
                   received_at=1000.0)
    return Message(env, b"Subject: batch %d\r\n\r\nbody %d\r\n" % (n, n))


class SyncFs:
    """Stands in for the system call where a test needs it slow or failing; counts calls."""

    def __init__(self, clock: FakeClock, *, takes: float = 0.0, error: int | None = None) -> None:
        self.clock, self.takes, self.error, self.calls = clock, takes, error, 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.clock.now += self.takes
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))


def _files(tmp_path: Path, n: int) -> list[int]:
    return [os.open(tmp_path / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o600) for i in range(n)]


@pytest.mark.parametrize("kind", [Flush.FILESYSTEM, Flush.FILE, Flush.AUTO])
def test_a_batch_is_stored_whole_and_readable_by_another_process(tmp_path: Path, kind: Flush) -> None:
    spool = Spool(tmp_path / "s", flush=kind)
    spool.ensure_dirs()
    messages = [_msg(n) for n in range(6)]
    ids = [f"BATCH{n:04d}" for n in range(6)]
    assert spool.put_batch(list(zip(messages, ids, strict=True))) == ids
    assert sorted(os.listdir(tmp_path / "s" / "queued")) == [f"{i}.msg" for i in ids]
    assert os.listdir(tmp_path / "s" / "tmp") == []
    other = Spool(tmp_path / "s")
    for qid, message in zip(ids, messages, strict=True):
        header, content = parse_file((tmp_path / "s" / "queued" / f"{qid}.msg").read_bytes())
        assert header["id"] == qid and content == message.content
        assert other.read_content(qid, State.QUEUED) == message.content


def test_one_refused_message_does_not_take_the_batch_with_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", flush=Flush.FILESYSTEM)
    spool.ensure_dirs()
    # A file of another message already holds the second ID (a duplicate queue ID).
    (tmp_path / "s" / "tmp" / "DUP0001.msg").write_bytes(b"someone else's")
    results = spool.put_batch([(_msg(1), "OK0001"), (_msg(2), "DUP0001"), (_msg(3), "OK0003")])
    assert results[0] == "OK0001" and results[2] == "OK0003"
    assert isinstance(results[1], SpoolError) and "exists" in str(results[1])
    assert sorted(os.listdir(tmp_path / "s" / "queued")) == ["OK0001.msg", "OK0003.msg"]
    assert (tmp_path / "s" / "tmp" / "DUP0001.msg").read_bytes() == b"someone else's"


def test_put_still_raises_for_a_single_message(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    spool.ensure_dirs()
    (tmp_path / "s" / "tmp" / "DUP0001.msg").write_bytes(b"someone else's")
    with pytest.raises(SpoolError, match="cannot store message"):
        spool.put(_msg(1), "DUP0001")
    assert os.listdir(tmp_path / "s" / "queued") == []


def test_auto_uses_one_syncfs_for_a_quiet_batch_and_fsync_for_a_single_file(tmp_path: Path, clock: FakeClock) -> None:
    fs = SyncFs(clock)
    flusher = Flusher(Flush.AUTO, syncfs=fs, dirty=lambda: 0, clock=clock)
    fds = _files(tmp_path, 3)
    try:
        assert flusher.flush(fds) == [None, None, None]
        assert fs.calls == 1
        assert flusher.flush(fds[:1]) == [None]  # one file: its own fsync is cheaper
        assert fs.calls == 1
    finally:
        for fd in fds:
            os.close(fd)


def test_auto_fsyncs_each_file_while_other_writers_have_much_unwritten_data(clock: FakeClock) -> None:
    dirty = [DIRTY_LIMIT_KB + 1]
    flusher = Flusher(Flush.AUTO, syncfs=SyncFs(clock), dirty=lambda: dirty[0], clock=clock)
    assert not flusher.use_syncfs(20)
    dirty[0] = DIRTY_LIMIT_KB // 2
    assert flusher.use_syncfs(20)
    # Asked for explicitly, syncfs is used whatever else is pending.
    forced = Flusher(Flush.FILESYSTEM, syncfs=SyncFs(clock), dirty=lambda: 10**9, clock=clock)
    assert forced.use_syncfs(2)
    assert not Flusher(Flush.FILE, syncfs=SyncFs(clock), clock=clock).use_syncfs(20)


def test_a_slow_syncfs_switches_to_fsync_for_a_while(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture, clock: FakeClock) -> None:
    fs = SyncFs(clock, takes=SLOW_SYNC * 4)
    flusher = Flusher(Flush.AUTO, syncfs=fs, dirty=lambda: 0, clock=clock)
    fds = _files(tmp_path, 2)
    try:
        with caplog.at_level(logging.INFO, logger="relayd.spool"):
            assert flusher.flush(fds) == [None, None]
        assert fs.calls == 1
        assert "busy with other writes" in caplog.text
        clock.now += SLOW_PAUSE / 2
        assert flusher.flush(fds) == [None, None]
        assert fs.calls == 1  # still paused: each file got its own fsync
        clock.now += SLOW_PAUSE
        fs.takes = 0.0
        assert flusher.flush(fds) == [None, None]
        assert fs.calls == 2
    finally:
        for fd in fds:
            os.close(fd)


def test_a_failed_syncfs_refuses_only_the_files_whose_own_fsync_fails(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, clock: FakeClock) -> None:
    fs = SyncFs(clock, error=5)  # EIO
    flusher = Flusher(Flush.FILESYSTEM, syncfs=fs, clock=clock)
    good = _files(tmp_path, 2)
    bad = os.open(tmp_path / "gone", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(bad)  # its fsync fails (EBADF): the stand-in for a file whose write-back failed
    try:
        with caplog.at_level(logging.WARNING, logger="relayd.spool"):
            errors = flusher.flush([good[0], bad, good[1]])
        assert errors[0] is None and errors[2] is None
        assert isinstance(errors[1], OSError)
        assert "syncfs of the spool failed" in caplog.text
    finally:
        for fd in good:
            os.close(fd)


def test_without_syncfs_every_file_is_fsynced(tmp_path: Path) -> None:
    flusher = Flusher(Flush.FILESYSTEM, syncfs=None)
    assert not flusher.use_syncfs(20)
    fds = _files(tmp_path, 2)
    try:
        assert flusher.flush(fds) == [None, None]
    finally:
        for fd in fds:
            os.close(fd)


def test_syncfs_only_where_the_kernel_reports_its_errors() -> None:
    assert kernel_reports_syncfs_errors("5.8.0")
    assert kernel_reports_syncfs_errors("6.1.0-18-amd64")
    assert kernel_reports_syncfs_errors("6.18.44-fc-v669")
    assert not kernel_reports_syncfs_errors("5.7.19")
    assert not kernel_reports_syncfs_errors("4.18.0-513.el8.x86_64")  # RHEL 8
    assert not kernel_reports_syncfs_errors("garbage")


def test_the_real_syncfs_flushes_a_file(tmp_path: Path) -> None:
    syncfs = load_syncfs()
    if not kernel_reports_syncfs_errors(os.uname().release):
        assert syncfs is None
        return
    assert syncfs is not None
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"data")
        syncfs(fd)
        with pytest.raises(OSError):
            syncfs(fd + 10_000)  # not a descriptor: EBADF, raised, not ignored
    finally:
        os.close(fd)


def test_unwritten_data_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684144 kB\nDirty:              1200 kB\n"
                       "Writeback:           34 kB\nWritebackTmp:         0 kB\n")
    assert dirty_kb(str(meminfo)) == 1234
    assert dirty_kb(str(tmp_path / "missing")) == 0
    assert dirty_kb() >= 0  # this machine's own
