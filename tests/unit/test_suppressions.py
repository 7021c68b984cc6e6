"""The do-not-email store and the ``relayd suppress`` command."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import pytest

from relayd.cli import IO, main
from relayd.model import RecipientOutcome, Reply, Status
from relayd.policy.suppressions import SuppressionStore, is_hard_bounce, read_snapshot
from tests.support.config_builder import ConfigBuilder


def test_add_remove_contains_case_insensitive(tmp_path: Path) -> None:
    with SuppressionStore(tmp_path) as store:
        assert store.add(["Alice@Example.NET", "bob@example.net"]) == 2
        assert store.add(["alice@example.net"]) == 0
        assert store.contains("ALICE@example.net")
        assert store.list() == ["alice@example.net", "bob@example.net"]
        assert store.remove(["BOB@EXAMPLE.NET", "nobody@example.net"]) == 1
        assert store.list() == ["alice@example.net"]


def test_daemon_snapshot_sees_cli_changes_without_restart(tmp_path: Path) -> None:
    daemon, cli = SuppressionStore(tmp_path), SuppressionStore(tmp_path)
    try:
        first = daemon.snapshot()
        assert first == frozenset()
        assert daemon.snapshot() is first  # unchanged: the cached set, no reload
        cli.add(["carol@example.net"])
        assert "carol@example.net" in daemon.snapshot()
        cli.remove(["carol@example.net"])
        assert "carol@example.net" not in daemon.snapshot()
        daemon.add(["dave@example.net"])
        assert "dave@example.net" in daemon.snapshot()
    finally:
        daemon.close()
        cli.close()


def test_every_cli_change_is_seen_at_once_even_across_checkpoints(tmp_path: Path) -> None:
    daemon, cli = SuppressionStore(tmp_path), SuppressionStore(tmp_path)
    try:
        for i in range(30):
            if i % 7 == 3:  # the WAL is reset and rewritten from its start after this
                assert cli._db is not None
                cli._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            cli.add([f"user{i}@example.net"])
            assert f"user{i}@example.net" in daemon.snapshot()
            cli.remove([f"user{i}@example.net"])
            assert f"user{i}@example.net" not in daemon.snapshot()
    finally:
        daemon.close()
        cli.close()


def test_unchanged_list_costs_no_sqlite_query(tmp_path: Path) -> None:
    daemon = SuppressionStore(tmp_path)
    try:
        daemon.add(["erin@example.net"])
        daemon.snapshot()
        statements: list[str] = []
        assert daemon._db is not None
        daemon._db.set_trace_callback(statements.append)
        for _ in range(100):
            assert "erin@example.net" in daemon.snapshot()
        assert len(statements) <= 2  # at most the once-a-second recheck, not one per message
    finally:
        daemon.close()


def test_without_a_list_sqlite_is_not_needed_and_later_lists_are_seen(tmp_path: Path) -> None:
    """A relay nobody unsubscribed from never opens SQLite (about 1.5 MB per process): the
    database is an empty file (an empty database to SQLite) until the first write by anyone,
    and a store that only read before sees what was written."""
    daemon = SuppressionStore(tmp_path)
    try:
        assert daemon.snapshot() == frozenset()
        assert not daemon.contains("x@example.net") and daemon.list() == [] and len(daemon) == 0
        assert daemon.remove(["x@example.net"]) == 0
        assert read_snapshot(tmp_path) == frozenset()
        assert (tmp_path / "suppressions.sqlite3").stat().st_size == 0
        assert daemon._db is None
        with SuppressionStore(tmp_path) as cli:
            cli.add(["Frank@Example.NET"])
        assert daemon.snapshot() == frozenset({"frank@example.net"})
        assert daemon.contains("frank@example.net")
    finally:
        daemon.close()
    # Every connection closed: the WAL is checkpointed and removed; a new store still reads it.
    assert not (tmp_path / "suppressions.sqlite3-wal").exists()
    with SuppressionStore(tmp_path) as again:
        assert again.snapshot() == frozenset({"frank@example.net"})


def test_a_list_root_creates_stays_writable_by_the_daemon(tmp_path: Path) -> None:
    """``sudo relayd suppress add`` before the daemon ever ran: the database and its WAL
    files get the state directory's owner (the daemon's user), not root."""
    if os.geteuid() != 0:
        pytest.skip("needs root to change file ownership")  # CI and this machine run as root
    os.chown(tmp_path, 4242, 4243)
    with SuppressionStore(tmp_path) as cli:
        cli.add(["gina@example.net"])
        for name in ("suppressions.sqlite3", "suppressions.sqlite3-wal", "suppressions.sqlite3-shm"):
            st = (tmp_path / name).stat()
            assert (st.st_uid, st.st_gid) == (4242, 4243), name
    assert (tmp_path / "suppressions.sqlite3").stat().st_uid == 4242


def test_two_connections_writing_at_once(tmp_path: Path) -> None:
    stores = [SuppressionStore(tmp_path), SuppressionStore(tmp_path)]
    errors: list[BaseException] = []

    def writer(store: SuppressionStore, prefix: str) -> None:
        try:
            for i in range(100):
                store.add([f"{prefix}{i}@example.net"])
                store.snapshot()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s, p)) for s, p in zip(stores, "ab", strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(stores[0].snapshot()) == 200 == len(stores[1])
    for s in stores:
        s.close()
    assert len(read_snapshot(tmp_path)) == 200


def test_read_snapshot_of_missing_list_is_empty(tmp_path: Path) -> None:
    assert read_snapshot(tmp_path / "nothing") == frozenset()
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize(("code", "text", "status", "hard"), [
    (550, "5.1.1 <x@example.net>: Recipient address rejected: User unknown", Status.FAILED, True),
    (550, "5.1.10 RESOLVER.ADR.RecipientNotFound", Status.FAILED, True),
    (550, "5.7.1 Message rejected as spam", Status.FAILED, False),
    (450, "4.1.1 mailbox temporarily unavailable", Status.DEFERRED, False),
])
def test_hard_bounce_classification(code: int, text: str, status: Status, hard: bool) -> None:
    assert is_hard_bounce(RecipientOutcome("x@example.net", status, Reply(code, text))) is hard


# -- CLI -----------------------------------------------------------------------------------

def _cli(tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    cfg = tmp_path / "relayd.yaml"
    if not cfg.exists():
        ConfigBuilder(tmp_path).write([{"name": "preview", "outbox": "./outbox"}])
    out, err = io.StringIO(), io.StringIO()
    rc = main(["-c", str(cfg), *argv], io=IO(out, err, io.StringIO()))
    return rc, out.getvalue(), err.getvalue()


def test_suppress_cli_add_list_remove_import(tmp_path: Path) -> None:
    assert _cli(tmp_path, "suppress", "add", "Alice@Example.net", "bob@example.net") == (
        0, "added 2, already listed 0\n", "")
    rc, out, _ = _cli(tmp_path, "suppress", "list")
    assert (rc, out) == (0, "alice@example.net\nbob@example.net\n")
    rc, out, _ = _cli(tmp_path, "suppress", "list", "--json")
    assert json.loads(out) == ["alice@example.net", "bob@example.net"]
    assert _cli(tmp_path, "suppress", "remove", "ALICE@example.net")[:2] == (0, "removed 1, not listed 0\n")
    listing = tmp_path / "list.txt"
    listing.write_text("# exported from the CRM\n\ncarol@example.net\nBOB@example.net  # again\nnot-an-address\n")
    rc, out, err = _cli(tmp_path, "suppress", "import", str(listing))
    assert rc == 0
    assert out == "imported 1 new, 1 already listed, 1 invalid lines skipped\n"
    assert f"{listing}:5: not an email address" in err
    assert json.loads(_cli(tmp_path, "suppress", "list", "--json")[1]) == ["bob@example.net", "carol@example.net"]


def test_suppress_cli_refuses_bad_input(tmp_path: Path) -> None:
    rc, out, err = _cli(tmp_path, "suppress", "add", "nonsense", "ok@example.net")
    assert rc == 1 and "not an email address: 'nonsense'" in err and out == "added 1, already listed 0\n"
    rc, _, err = _cli(tmp_path, "suppress", "import", str(tmp_path / "missing.txt"))
    assert rc == 1 and "cannot read" in err
