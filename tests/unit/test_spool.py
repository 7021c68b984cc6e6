"""The spool: durable put, state transitions by rename, crash recovery, corrupt files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relayd.errors import SpoolError, UnknownMessage
from relayd.model import Envelope, Message, State
from relayd.spool.records import Meta, Poke
from relayd.spool.store import MAX_RECOVERIES, Spool


def msg(rcpts: tuple[str, ...] = ("bob@example.com",), body: bytes = b"hello\r\n") -> Message:
    env = Envelope("alice@example.com", rcpts, client="127.0.0.1", helo="app", received_at=1000.0)
    return Message(env, b"Subject: t\r\n\r\n" + body)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.ensure_dirs()
    return s


def test_put_stores_exact_bytes_and_envelope(spool: Spool) -> None:
    m = msg(body=b".leading dot\r\n\x80 8-bit\r\n")
    qid = spool.put(m)
    e = spool.get(qid)
    assert e.state is State.QUEUED
    assert e.envelope == m.envelope
    assert spool.read_content(qid) == m.content
    assert e.size == len(m.content)
    assert not os.listdir(spool.path / "tmp")


def test_put_failure_leaves_nothing_half_stored(spool: Spool) -> None:
    os.chmod(spool.path / "queued", 0o500)
    try:
        if os.geteuid() == 0:
            # root ignores directory permissions; simulate the failing rename instead
            (spool.path / "queued").rename(spool.path / "queued.gone")
        with pytest.raises(SpoolError):
            spool.put(msg())
    finally:
        if (spool.path / "queued.gone").exists():
            (spool.path / "queued.gone").rename(spool.path / "queued")
        os.chmod(spool.path / "queued", 0o700)
    assert os.listdir(spool.path / "tmp") == []
    assert spool.list() == []


def test_claim_requeue_fail_complete(spool: Spool) -> None:
    qid = spool.put(msg(("a@x.example", "b@x.example")))
    claimed = spool.claim(qid)
    assert claimed is not None and claimed.entry.state is State.ACTIVE
    assert spool.claim(qid) is None  # only one claimer wins
    spool.requeue(qid, Meta(attempts=1, next_attempt=2000.0, last_error="451 4.3.0 later",
                            pending=("b@x.example",)))
    e = spool.get(qid)
    assert e.state is State.QUEUED and e.attempts == 1 and e.pending == ("b@x.example",)
    assert e.last_error == "451 4.3.0 later"
    assert spool.claim(qid) is not None
    spool.fail(qid, Meta(attempts=2, pending=(), failed_rcpts=("b@x.example",), last_error="550 no"))
    e = spool.get(qid)
    assert e.state is State.FAILED and e.recipients == ("b@x.example",)
    spool.retry(qid, now=5000.0)
    e = spool.get(qid)
    assert e.state is State.QUEUED and e.pending == ("b@x.example",) and e.next_attempt == 5000.0
    assert e.age_base == 5000.0  # a retried failed message gets a fresh max_age
    assert spool.claim(qid) is not None
    spool.complete(qid)
    with pytest.raises(UnknownMessage):
        spool.get(qid)


def test_hold_release_delete(spool: Spool) -> None:
    qid = spool.put(msg())
    spool.hold(qid)
    assert spool.get(qid).state is State.HELD
    assert spool.claim(qid) is None  # held mail is out of delivery
    spool.release(qid, now=42.0)
    e = spool.get(qid)
    assert e.state is State.QUEUED and e.next_attempt == 42.0
    spool.delete(qid)
    with pytest.raises(UnknownMessage):
        spool.get(qid)
    assert spool.take_pokes() == [Poke(qid)]


def test_a_retry_leaves_a_retry_poke(spool: Spool) -> None:
    """`queue retry` tells the daemon it was a retry (it then lifts smarthost pauses)."""
    qid, other = spool.put(msg()), spool.put(msg())
    spool.retry(qid, now=5.0)
    spool.hold(other)
    assert sorted(spool.take_pokes(), key=lambda p: p.queue_id) == sorted(
        [Poke(qid, retry=True), Poke(other)], key=lambda p: p.queue_id)
    assert spool.take_pokes() == []


def test_active_message_cannot_be_deleted_or_held(spool: Spool) -> None:
    qid = spool.put(msg())
    spool.claim(qid)
    with pytest.raises(SpoolError, match="being delivered"):
        spool.delete(qid)
    with pytest.raises(SpoolError, match="being delivered"):
        spool.hold(qid)


def test_recover_after_crash(spool: Spool) -> None:
    # A write that never got its 250 (left in tmp/) and a delivery cut short (left in active/).
    (spool.path / "tmp" / "0000000000000ABCDE.msg").write_bytes(b"partial")
    qid = spool.put(msg())
    spool.claim(qid)
    recovered = spool.recover(now=7.0)
    assert recovered == [qid]
    assert os.listdir(spool.path / "tmp") == []
    e = spool.get(qid)
    assert e.state is State.QUEUED and e.next_attempt == 7.0 and e.meta.recoveries == 1


def test_complete_file_left_in_tmp_is_recovered_not_removed(spool: Spool) -> None:
    # The fsync of tmp/ID.msg is what the 250 waits for; a power loss before the journal
    # commits the rename into queued/ leaves the acknowledged message in tmp/.
    qid = spool.put(msg())
    content = spool.read_content(qid)
    os.rename(spool.path / "queued" / f"{qid}.msg", spool.path / "tmp" / f"{qid}.msg")
    torn = spool.put(msg())
    data = (spool.path / "queued" / f"{torn}.msg").read_bytes()
    (spool.path / "queued" / f"{torn}.msg").unlink()
    (spool.path / "tmp" / f"{torn}.msg").write_bytes(data[:-3])  # cut short: never fsynced
    flipped = spool.put(msg())
    data = (spool.path / "queued" / f"{flipped}.msg").read_bytes()
    (spool.path / "queued" / f"{flipped}.msg").unlink()
    (spool.path / "tmp" / f"{flipped}.msg").write_bytes(data[:-1] + b"X")  # same length, other bytes
    Spool(spool.path).recover()
    assert os.listdir(spool.path / "tmp") == []
    assert spool.ids(State.QUEUED) == [qid]
    fresh = Spool(spool.path)
    assert fresh.read_content(qid) == content
    assert fresh.get(qid).envelope == msg().envelope


def test_torn_file_in_queued_is_set_aside(spool: Spool) -> None:
    good, bad = spool.put(msg()), spool.put(msg())
    path = spool.path / "queued" / f"{bad}.msg"
    path.write_bytes(path.read_bytes()[:-10])
    fresh = Spool(spool.path)
    with pytest.raises(ValueError, match="torn"):
        fresh.read_content(bad)
    fresh.recover()
    assert fresh.ids(State.QUEUED) == [good]
    assert os.listdir(spool.path / "corrupt") == [f"{bad}.msg"]


def test_message_that_keeps_crashing_goes_to_failed_not_lost(spool: Spool) -> None:
    qid = spool.put(msg())
    for _ in range(MAX_RECOVERIES):
        spool.claim(qid)
        spool.recover()
    e = spool.get(qid)
    assert e.state is State.FAILED
    assert "interrupted" in (e.last_error or "")


def test_corrupt_file_is_set_aside_and_others_survive(spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    good = spool.put(msg())
    bad = spool.put(msg())
    path = spool.path / "queued" / f"{bad}.msg"
    path.write_bytes(path.read_bytes()[:20])  # truncated
    spool.recover()
    assert [e.id for e in spool.list()] == [good]
    assert (spool.path / "corrupt" / f"{bad}.msg").exists()
    assert bad in caplog.text and "set aside" in caplog.text


def test_second_daemon_refused_by_lock(spool: Spool) -> None:
    spool.lock()
    other = Spool(spool.path)
    with pytest.raises(SpoolError, match="already running"):
        other.lock()
    spool.close()
    other.lock()
    other.close()


def test_unknown_and_malformed_ids(spool: Spool) -> None:
    with pytest.raises(UnknownMessage):
        spool.get("../../etc/passwd")
    with pytest.raises(UnknownMessage):
        spool.get("0123456789ABCDEF")


def test_files_written_by_root_keep_the_spool_owner(spool: Spool) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to change file ownership")  # CI and this machine run as root
    os.chown(spool.path, 4242, 4243)
    qid = spool.put(msg())
    spool.hold(qid)
    spool.release(qid, now=1.0)  # rewrites the metadata as root
    st = os.stat(spool.path / "meta" / f"{qid}.json")
    assert (st.st_uid, st.st_gid) == (4242, 4243)


def test_complete_later_removes_in_the_background_and_flush_waits(spool: Spool) -> None:
    ids = [spool.put(msg()) for _ in range(50)]
    for qid in ids:
        spool.claim(qid)
        spool.complete_later(qid)
    spool.flush_completions()
    assert spool.ids(State.ACTIVE) == [] and spool.ids(State.QUEUED) == []
    # A later one after a flush starts the background thread again; close() waits for it too.
    last = spool.put(msg())
    spool.claim(last)
    spool.complete_later(last)
    spool.close()
    assert spool.ids(State.ACTIVE) == []
