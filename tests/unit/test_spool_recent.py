"""The spool's in-memory copy of just-stored messages gives the queue manager exactly what
the file holds (and what an operator changed meanwhile), and is bounded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from relayd.model import Envelope, Message, State
from relayd.spool.cache import RECENT_CACHE_BYTES
from relayd.spool.store import Spool


def _msg(i: int, size: int = 100) -> Message:
    env = Envelope("alice@example.com", ("bob@example.com",), client="127.0.0.1", helo="app",
                   received_at=1000.0 + i, priority=bool(i % 2))
    return Message(env, b"Subject: %d\r\n\r\n" % i + b"x" * size + b"\r\n")


def test_claim_from_memory_matches_the_file_and_sees_operator_changes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    spool.ensure_dirs()
    m = _msg(1)
    qid = spool.put(m)
    fresh = Spool(tmp_path / "s")  # another process: nothing in memory
    spool.retry(qid, now=5000.0)  # `relayd queue retry` before the first attempt
    claimed = spool.claim(qid)
    assert claimed is not None
    from_memory = claimed.entry
    spool.requeue(qid, from_memory.meta)
    reclaimed = fresh.claim(qid)
    assert reclaimed is not None
    from_disk = reclaimed.entry
    assert from_memory == replace(from_disk, meta=from_memory.meta)
    assert from_memory.meta.next_attempt == 5000.0 == from_disk.meta.next_attempt
    assert claimed.content == m.content  # the claim hands over the content it had in memory
    assert spool.recent.get(qid) is None  # read once; later attempts use the file
    assert reclaimed.content == m.content
    assert spool.read_content(qid, State.ACTIVE) == m.content


def test_memory_is_bounded_and_older_messages_come_from_disk(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    spool.ensure_dirs()
    size = RECENT_CACHE_BYTES // 8
    msgs = [_msg(i, size) for i in range(20)]
    ids = [spool.put(m) for m in msgs]
    assert spool.recent.bytes <= RECENT_CACHE_BYTES
    assert spool.recent.get(ids[0]) is None
    for qid, m in zip(ids, msgs, strict=True):
        assert spool.read_content(qid) == m.content
    assert spool.recent.bytes == 0


def test_the_claim_of_a_just_stored_message_hands_over_its_content_without_reading_the_file(
        tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    spool.ensure_dirs()
    m = _msg(3)
    qid = spool.put(m)
    path = tmp_path / "s" / "queued" / f"{qid}.msg"
    path.write_bytes(path.read_bytes().replace(b"x" * 100, b"y" * 100))  # same length: still parses
    claimed = spool.claim(qid)
    assert claimed is not None and claimed.content == m.content  # from memory, not the file
    assert spool.recent.bytes == 0
    # Without the copy in memory (the delivery process of the split mode) the file is read.
    other = Spool(tmp_path / "o", keep_recent=False)
    other.ensure_dirs()
    qid = other.put(m)
    claimed = other.claim(qid)
    assert claimed is not None and claimed.content == m.content and claimed.entry.size == len(m.content)
