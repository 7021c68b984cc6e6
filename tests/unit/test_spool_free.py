"""Reuse of delivered messages' files (relayd/spool/free.py): the next message is written over
a delivered one's file instead of into a new one, without ever mixing two messages, keeping
delivered content on disk for longer than two scrubs or past a stop, or losing a message to
a crash at any step."""

from __future__ import annotations

import errno
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from relayd.errors import SpoolError
from relayd.model import Envelope, Message, State
from relayd.spool import free as spool_free
from relayd.spool.free import FreeFiles
from relayd.spool.records import parse_file
from relayd.spool.store import Spool
from tests.support.clock import FakeClock


def _msg(body: bytes, rcpt: str = "bob@example.com") -> Message:
    env = Envelope("alice@example.com", (rcpt,), client="127.0.0.1", helo="app", received_at=1000.0)
    return Message(env, b"Subject: test\r\n\r\n" + body)


def _deliver(spool: Spool, qid: str) -> None:
    assert spool.claim(qid) is not None
    spool.complete(qid)


def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != "lock")


def test_the_next_message_is_written_into_a_delivered_messages_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    spool.ensure_dirs()
    long = _msg(b"first message, the longer one " * 200)
    first = spool.put(long)
    inode = os.stat(tmp_path / "s" / "queued" / f"{first}.msg").st_ino
    _deliver(spool, first)
    assert os.listdir(tmp_path / "s" / "free") == [first]  # kept as it is, to be overwritten

    short = _msg(b"second, short\r\n", rcpt="carol@example.com")
    second = spool.put(short)
    path = tmp_path / "s" / "queued" / f"{second}.msg"
    assert os.stat(path).st_ino == inode
    assert os.listdir(tmp_path / "s" / "free") == []
    assert b"the longer one" not in _all_bytes(tmp_path / "s")  # overwritten and cut to length
    header, content = parse_file(path.read_bytes())  # no stale tail of the longer message
    assert content == short.content and header["id"] == second
    fresh = Spool(tmp_path / "s")  # another process reads exactly the new message
    claimed = fresh.claim(second)
    assert claimed is not None and claimed.entry.envelope.rcpt_tos == ("carol@example.com",)
    assert fresh.read_content(second, State.ACTIVE) == short.content


def test_without_free_files_a_new_file_is_created(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", reuse_files=False)
    spool.ensure_dirs()
    qid = spool.put(_msg(b"x\r\n"))
    _deliver(spool, qid)
    assert os.listdir(tmp_path / "s" / "free") == []
    assert os.listdir(tmp_path / "s" / "active") == []


def test_the_pool_is_bounded_and_the_rest_is_removed(tmp_path: Path) -> None:
    d = tmp_path / "free"
    d.mkdir()
    pool = FreeFiles(str(d), limit=3)
    for i in range(5):
        p = tmp_path / f"m{i}"
        p.write_bytes(b"delivered %d" % i)
        pool.give(str(p), f"m{i}")
        assert not p.exists()
    assert sorted(os.listdir(d)) == ["m0", "m1", "m2"]
    assert (d / "m1").read_bytes() == b"delivered 1"  # small files keep their content


def test_files_taken_by_the_other_process_make_room_within_the_same_second(
        tmp_path: Path, clock: FakeClock) -> None:
    """The accepting process takes files without telling the delivery process: a pool it has
    just emptied must not look full to the giver until its next periodic count (that made
    the giver remove half the files under load, and the taker create as many)."""
    d = tmp_path / "free"
    d.mkdir()
    giver = FreeFiles(str(d), limit=3, clock=clock)
    taker = FreeFiles(str(d), limit=3, clock=clock)

    def give(name: str) -> None:
        (tmp_path / name).write_bytes(b"delivered")
        giver.give(str(tmp_path / name), name)

    for name in ("a", "b", "c"):
        give(name)
    for k in range(3):
        assert taker.take(str(tmp_path / f"new{k}.msg"))
    assert os.listdir(d) == []
    clock.advance(spool_free.FULL_RECOUNT_PAUSE)  # well within RECOUNT_INTERVAL
    give("d")
    assert os.listdir(d) == ["d"]  # kept: the giver looked again instead of removing it
    for name in ("e", "f", "g"):
        give(name)
    assert sorted(os.listdir(d)) == ["d", "e", "f"]  # really full: the rest is removed


def test_a_big_delivered_file_is_emptied_before_it_is_kept(tmp_path: Path) -> None:
    """free/ never holds more than limit x KEEP_CONTENT_MAX bytes of delivered mail."""
    d = tmp_path / "free"
    d.mkdir()
    pool = FreeFiles(str(d))
    big, small = tmp_path / "big", tmp_path / "small"
    big.write_bytes(b"x" * (spool_free.KEEP_CONTENT_MAX + 1))
    small.write_bytes(b"x" * spool_free.KEEP_CONTENT_MAX)
    pool.give(str(big), "big")
    pool.give(str(small), "small")
    assert os.stat(d / "big").st_size == 0
    assert os.stat(d / "small").st_size == spool_free.KEEP_CONTENT_MAX


def test_delivered_content_is_gone_after_two_scrubs_and_after_a_stop(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    spool.ensure_dirs()
    free = FreeFiles(str(tmp_path / "s" / "free"))
    first = spool.put(_msg(b"first delivered mail\r\n"))
    _deliver(spool, first)
    assert free.scrub() == 0  # seen once: it may still be taken
    second = spool.put(_msg(b"second delivered mail\r\n"))  # takes the first one's file
    third = spool.put(_msg(b"third delivered mail\r\n"))
    _deliver(spool, second)
    assert free.scrub() == 0  # the first file is no longer there; the second one is new
    assert free.scrub() == 1  # the second one sat there since the previous scrub
    assert b"delivered mail" not in b"".join(
        p.read_bytes() for p in (tmp_path / "s" / "free").iterdir())

    _deliver(spool, third)
    assert os.listdir(tmp_path / "s" / "free") == [third]
    spool.flush_completions()  # what the delivery process does when relayd stops
    assert os.listdir(tmp_path / "s" / "free") == []
    assert b"delivered mail" not in _all_bytes(tmp_path / "s")


def test_a_scrub_between_a_takers_link_and_unlink_leaves_it_without_that_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scrub removes a free file a taker has just linked: the taker's unlink fails, so it
    drops its link before writing anything and creates a file instead."""
    d = tmp_path / "free"
    d.mkdir()
    (d / "F").write_bytes(b"delivered mail")
    taker, scrubber = FreeFiles(str(d)), FreeFiles(str(d))
    assert scrubber.scrub() == 0
    real_link = os.link

    def link_then_scrub(src: str, dst: str) -> None:
        real_link(src, dst)
        assert scrubber.scrub() == 1

    monkeypatch.setattr(spool_free.os, "link", link_then_scrub)
    dst = tmp_path / "a.msg"
    assert taker.take(str(dst)) is False
    assert not dst.exists() and os.listdir(d) == []


def test_the_reaper_tidies_while_idle_and_stops_cleanly() -> None:
    tidied = threading.Event()
    done: list[str] = []
    reaper = spool_free.Reaper(done.append, tidy=tidied.set, interval=0.01)
    reaper.put("A")
    assert tidied.wait(10), "tidy never ran while the reaper had nothing to do"
    reaper.flush()
    assert done == ["A"]


def test_a_duplicate_queue_id_is_refused_and_the_other_file_kept(tmp_path: Path) -> None:
    for reuse in (True, False):
        root = tmp_path / f"s{reuse}"
        spool = Spool(root, reuse_files=reuse)
        spool.ensure_dirs()
        _deliver(spool, spool.put(_msg(b"done\r\n")))  # one free file to take, when reusing
        other = root / "tmp" / "ABCDEF0123456789AB.msg"
        other.write_bytes(b"another message being written")
        with pytest.raises(SpoolError):
            spool.put(_msg(b"same id\r\n"), "ABCDEF0123456789AB")
        assert other.read_bytes() == b"another message being written"
        assert not (root / "queued" / "ABCDEF0123456789AB.msg").exists()


def test_two_takers_of_one_free_file_never_share_it(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Both link the same free file before either unlinks it: only the one whose unlink
    succeeds keeps it; the other drops its link before writing anything."""
    d = tmp_path / "free"
    d.mkdir()
    (d / "F").write_bytes(b"")
    a, b = FreeFiles(str(d)), FreeFiles(str(d))
    real_link = os.link
    b_dst = str(tmp_path / "b.msg")
    a_dst = str(tmp_path / "a.msg")

    def link_then_a_takes(src: str, dst: str) -> None:
        real_link(src, dst)
        if dst == b_dst:  # b has linked; a now links and unlinks first
            monkeypatch.setattr(spool_free.os, "link", real_link)
            assert a.take(a_dst)

    monkeypatch.setattr(spool_free.os, "link", link_then_a_takes)
    assert b.take(b_dst) is False
    assert os.path.exists(a_dst) and not os.path.exists(b_dst)
    assert os.listdir(d) == []


def test_out_of_inodes_on_tmpfs_the_free_file_is_moved_instead_of_linked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tmpfs charges a hard link against nr_inodes: link fails with ENOSPC exactly when the
    free files are the only way to store mail (tests/integration/test_local_faults.py)."""
    d = tmp_path / "free"
    d.mkdir()
    (d / "F").write_bytes(b"")
    (d / "G").write_bytes(b"")

    def no_inodes(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_free.os, "link", no_inodes)
    pool = FreeFiles(str(d))
    assert pool.take(str(tmp_path / "a.msg"))
    (tmp_path / "b.msg").write_bytes(b"another message")
    with pytest.raises(FileExistsError):  # the other file is never replaced
        pool.take(str(tmp_path / "b.msg"))
    assert (tmp_path / "b.msg").read_bytes() == b"another message"
    assert len(os.listdir(d)) == 1


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES, errno.EIO, errno.EPERM])
def test_a_spool_that_refuses_every_link_is_not_listed_forever(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """A read-only spool (or EACCES, EIO, a file system without hard links): the free files
    stay where they are and are listed again at once; each is tried once per take, then a
    new file is created (and fails with the real reason: a 451, not a hung session)."""
    d = tmp_path / "free"
    d.mkdir()
    (d / "F").write_bytes(b"")
    (d / "G").write_bytes(b"")
    links: list[str] = []

    def refused(src: str, dst: str) -> None:
        links.append(src)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(spool_free.os, "link", refused)
    pool = FreeFiles(str(d))
    assert pool.take(str(tmp_path / "a.msg")) is False
    assert sorted(os.path.basename(p) for p in links) == ["F", "G"]
    assert sorted(os.listdir(d)) == ["F", "G"] and not (tmp_path / "a.msg").exists()


def test_a_read_only_spool_with_free_files_answers_with_the_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    spool.ensure_dirs()
    _deliver(spool, spool.put(_msg(b"done\r\n")))   # a free file to take
    assert os.listdir(tmp_path / "spool" / "free")
    real_open = os.open

    def read_only(path: str, flags: int, *args: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args)

    def no_link(src: str, dst: str) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(spool_free.os, "link", no_link)
    monkeypatch.setattr("relayd.spool.write.os.open", read_only)
    with pytest.raises(SpoolError, match="Read-only file system"):
        spool.put(_msg(b"refused\r\n"))
    spool.close()


def test_threads_taking_at_once_each_get_a_different_file_and_none_goes_without(
        tmp_path: Path) -> None:
    d = tmp_path / "free"
    d.mkdir()
    for i in range(60):
        (d / f"F{i}").write_bytes(b"")
    pool = FreeFiles(str(d))
    out = tmp_path / "tmp"
    out.mkdir()
    start = threading.Barrier(12)

    def taker(t: int) -> list[bool]:
        start.wait()
        return [pool.take(str(out / f"{t}-{k}.msg")) for k in range(5)]

    with ThreadPoolExecutor(12) as ex:
        results = [ok for oks in ex.map(taker, range(12)) for ok in oks]
    assert results == [True] * 60  # while files are left, nobody creates one instead
    assert os.listdir(d) == []
    inodes = {os.stat(out / name).st_ino for name in os.listdir(out)}
    assert len(inodes) == 60  # no two messages share a file
    assert pool.take(str(out / "more.msg")) is False


def test_an_empty_pool_is_listed_again_only_after_a_pause(tmp_path: Path, clock: FakeClock) -> None:
    d = tmp_path / "free"
    d.mkdir()
    pool = FreeFiles(str(d), clock=clock)
    assert pool.take(str(tmp_path / "x")) is False
    (d / "F").write_bytes(b"")
    assert pool.take(str(tmp_path / "x")) is False  # not listed again yet: create instead
    clock.advance(spool_free.REFILL_PAUSE)
    assert pool.take(str(tmp_path / "x")) is True


def test_an_emptied_file_in_active_after_a_crash_is_removed_quietly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Killed between emptying a big delivered message's file and moving it into free/."""
    spool = Spool(tmp_path / "s")
    spool.ensure_dirs()
    done, pending = spool.put(_msg(b"delivered\r\n")), spool.put(_msg(b"in flight\r\n"))
    assert spool.claim(done) is not None and spool.claim(pending) is not None
    spool.write_meta(done, spool.get(done).meta)
    os.truncate(tmp_path / "s" / "active" / f"{done}.msg", 0)

    caplog.set_level(logging.INFO, "relayd.spool")
    after = Spool(tmp_path / "s")
    assert after.recover() == [pending]  # the interrupted delivery goes again; the other not
    assert os.listdir(tmp_path / "s" / "corrupt") == []
    assert not (tmp_path / "s" / "meta" / f"{done}.json").exists()
    assert after.ids(State.QUEUED) == [pending]
    assert "removed its emptied spool file" in caplog.text


def test_a_reused_file_not_yet_overwritten_is_never_recovered_as_the_new_message(
        tmp_path: Path) -> None:
    """A complete file in tmp/ whose header names another message (killed after taking a free
    file that still held content): recovery removes it instead of queueing old mail."""
    spool = Spool(tmp_path / "s")
    spool.ensure_dirs()
    old = spool.put(_msg(b"old mail\r\n"))
    os.rename(tmp_path / "s" / "queued" / f"{old}.msg", tmp_path / "s" / "tmp" / "0123456789ABCDEF.msg")
    Spool(tmp_path / "s").recover()
    assert os.listdir(tmp_path / "s" / "tmp") == []
    assert spool.ids(State.QUEUED) == []


def test_a_reused_file_with_the_old_messages_tail_is_never_recovered(tmp_path: Path) -> None:
    """Killed after a new message was written over a longer delivered one and before the file
    was cut to length: its length no longer matches its header, so recovery removes it."""
    spool = Spool(tmp_path / "s")
    spool.ensure_dirs()
    new = spool.put(_msg(b"new\r\n"))
    path = tmp_path / "s" / "queued" / f"{new}.msg"
    stale = path.read_bytes() + b"tail of a longer delivered message\r\n"
    path.unlink()
    (tmp_path / "s" / "tmp" / f"{new}.msg").write_bytes(stale)
    Spool(tmp_path / "s").recover()
    assert os.listdir(tmp_path / "s" / "tmp") == []
    assert spool.ids(State.QUEUED) == []


def test_recovery_keeps_only_empty_files_in_free(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    spool.ensure_dirs()
    free = tmp_path / "s" / "free"
    (free / "EMPTY").write_bytes(b"")
    (free / "FULL").write_bytes(b"placed here by hand")
    (free / "DIR").mkdir()
    spool.recover()
    assert sorted(os.listdir(free)) == ["DIR", "EMPTY"]  # a directory is skipped, never taken
    qid = spool.put(_msg(b"new\r\n"))
    assert Spool(tmp_path / "s").read_content(qid) == _msg(b"new\r\n").content
    assert sorted(os.listdir(free)) == ["DIR"]
