"""`relayd queue import`'s core (relayd/spool/importing.py) on real directories: every state
moves with its envelope, history and attempts; an ID taken here gets a new one; a second run
imports nothing; a run interrupted at any step leaves each message exactly once after the
next run; a torn file stays where it was; a spool with a running relayd is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import relayd.spool.importing as importing
from relayd.errors import SpoolError
from relayd.model import Envelope, Message, State, Status
from relayd.spool.records import Attempt, Meta
from relayd.spool.store import Spool

NOW = 5000.0


def msg(n: int) -> Message:
    env = Envelope("app@example.com", (f"user{n}@example.net",), client="127.0.0.1", helo="app",
                   received_at=1000.0 + n)
    return Message(env, f"Subject: {n}\r\n\r\nbody {n}\r\n".encode())


def make(tmp_path: Path, name: str) -> Spool:
    s = Spool(tmp_path / name)
    s.ensure_dirs()
    return s


def history(n: int) -> Meta:
    return Meta(attempts=n, next_attempt=9999.0, last_error="451 4.3.0 later",
                history=(Attempt(1500.0, "user@example.net", Status.DEFERRED, "primary[1.2.3.4]:25",
                                 "451 4.3.0 later", "4.3.0"),))


def everything(dest: Spool) -> list[tuple[str, State, bytes]]:
    return sorted((e.id, e.state, dest.read_content(e.id)) for e in dest.list())


def test_every_state_moves_with_envelope_history_and_attempts(tmp_path: Path) -> None:
    src, dest = make(tmp_path, "a"), make(tmp_path, "b")
    queued = src.put(msg(1))
    src.write_meta(queued, history(2))
    held = src.put(msg(2))
    src.hold(held)
    failed = src.put(msg(3))
    src.fail(failed, history(7), src=State.QUEUED)
    active = src.put(msg(4))
    assert src.claim(active) is not None          # the node died while delivering it
    done = importing.import_spool(dest.path, src.path, now=NOW)
    assert sorted(done.messages) == sorted([(queued, queued, State.QUEUED), (active, active, State.QUEUED),
                                            (held, held, State.HELD), (failed, failed, State.FAILED)])
    assert done.skipped == []
    e = dest.get(queued)
    assert (e.state, e.envelope, e.attempts, e.history, e.last_error) == (
        State.QUEUED, msg(1).envelope, 2, history(2).history, "451 4.3.0 later")
    assert e.next_attempt == NOW                   # due at once
    assert dest.read_content(queued) == msg(1).content
    assert dest.get(held).state is State.HELD
    assert dest.get(failed).attempts == 7 and dest.get(failed).state is State.FAILED
    assert dest.get(active).meta.recoveries == 1
    assert src.list() == [] and os.listdir(src.path / "meta") == []
    assert sorted(os.listdir(dest.path / "poke")) == sorted([queued, held, failed, active])
    assert os.listdir(dest.path / "import") == [".lock"]
    # idempotent: a second run finds nothing to import
    again = importing.import_spool(dest.path, src.path, now=NOW)
    assert (again.messages, again.finished, again.skipped) == ([], 0, [])
    assert len(dest.list()) == 4


def test_an_id_taken_here_gets_a_new_one(tmp_path: Path) -> None:
    src, dest = make(tmp_path, "a"), make(tmp_path, "b")
    qid = src.put(msg(1))
    dest.put(msg(2), queue_id=qid)
    done = importing.import_spool(dest.path, src.path, now=NOW)
    [(old, new, state)] = done.messages
    assert old == qid and new != qid and state is State.QUEUED
    assert dest.read_content(new) == msg(1).content and dest.read_content(qid) == msg(2).content
    assert dest.get(new).id == new


@pytest.mark.parametrize("step", ["before-commit", "torn-record", "after-commit", "after-rename",
                                  "after-source-removed"])
def test_an_interrupted_run_leaves_each_message_exactly_once(tmp_path: Path, step: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    src, dest = make(tmp_path, "a"), make(tmp_path, "b")
    ids = [src.put(msg(n)) for n in range(3)]
    real_finish, real_write = importing._finish, importing._Durable.write

    class Crash(Exception):
        pass

    def write(self: importing._Durable, path: Path, data: bytes) -> None:
        if step == "before-commit" and path.suffix == ".from":
            raise Crash
        if step == "torn-record" and path.suffix == ".from":
            real_write(self, path, data[:len(data) // 2])   # the machine died before the flush
            raise Crash
        real_write(self, path, data)

    def finish(dest_path: Path, io: importing._Durable, new: str, record: dict[str, str]) -> None:
        if step == "after-commit":
            raise Crash
        if step == "after-rename":
            os.rename(dest_path / "import" / f"{new}.json", dest_path / "meta" / f"{new}.json")
            os.rename(dest_path / "import" / f"{new}.msg", dest_path / "queued" / f"{new}.msg")
            raise Crash
        if step == "after-source-removed":
            os.rename(dest_path / "import" / f"{new}.json", dest_path / "meta" / f"{new}.json")
            os.rename(dest_path / "import" / f"{new}.msg", dest_path / "queued" / f"{new}.msg")
            os.unlink(record["source"])
            raise Crash
        real_finish(dest_path, io, new, record)

    monkeypatch.setattr(importing._Durable, "write", write)
    monkeypatch.setattr(importing, "_finish", finish)
    with pytest.raises(Crash):
        importing.import_spool(dest.path, src.path, now=NOW)
    # The message made visible before the interruption may be delivered (and removed) here
    # before the next run.
    delivered = {e.id for e in dest.list()}
    assert len(delivered) == (1 if step in ("after-rename", "after-source-removed") else 0)
    for qid in delivered:
        assert dest.claim(qid) is not None
        dest.complete(qid)
    monkeypatch.undo()
    done = importing.import_spool(dest.path, src.path, now=NOW)
    assert done.finished == (0 if step in ("before-commit", "torn-record") else 1)
    assert src.list() == []
    here = [e.id for e in dest.list()]
    assert sorted(here + sorted(delivered)) == sorted(ids)   # each once: none lost, none twice
    assert os.listdir(dest.path / "import") == [".lock"]


def test_a_torn_file_stays_where_it_was_and_is_reported(tmp_path: Path) -> None:
    src, dest = make(tmp_path, "a"), make(tmp_path, "b")
    good = src.put(msg(1))
    torn = src.put(msg(2))
    path = src.path / "queued" / f"{torn}.msg"
    path.write_bytes(path.read_bytes()[:-3])
    done = importing.import_spool(dest.path, src.path, now=NOW)
    assert [m[0] for m in done.messages] == [good]
    assert done.skipped and done.skipped[0][0] == str(path)
    assert path.exists()


def test_a_spool_with_a_running_relayd_and_the_own_spool_are_refused(tmp_path: Path) -> None:
    src, dest = make(tmp_path, "a"), make(tmp_path, "b")
    src.put(msg(1))
    src.lock()
    try:
        with pytest.raises(SpoolError, match="a relayd is running on"):
            importing.import_spool(dest.path, src.path, now=NOW)
    finally:
        src.close()
    with pytest.raises(SpoolError, match="own spool"):
        importing.import_spool(dest.path, dest.path, now=NOW)
    assert len(src.list()) == 1 and dest.list() == []
