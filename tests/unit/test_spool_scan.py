"""Listing the spool without a list: the streaming counts and snapshot, the batched scan of
queued/, and the queue manager's rescan, which reads only the files it does not know."""

from __future__ import annotations

from pathlib import Path

import pytest

from relayd.model import Envelope, Message, State
from relayd.spool import Spool


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
    spool.claim(ids[0])
    spool.hold(ids[1])
    assert sorted(spool.ids(State.QUEUED)) == sorted(ids[2:])
    counts, oldest = spool.snapshot()
    assert counts == spool.counts() == {State.QUEUED: 3, State.ACTIVE: 1, State.HELD: 1,
                                        State.FAILED: 0}
    # the oldest queued or active message, from its ID (held ones do not count)
    assert oldest == pytest.approx(1_700_000_000.0, abs=1e-6)
    spool.complete(ids[0])
    assert spool.snapshot()[1] == pytest.approx(1_700_000_002.0, abs=1e-6)
