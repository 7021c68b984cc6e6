"""The do-not-email list: a small SQLite database under ``state_dir``.

SQLite in WAL mode with a busy timeout lets ``relayd suppress ...`` write while the daemon
reads, from separate processes, without locking each other out for long. Addresses are
stored lower-cased (the list is case-insensitive). The daemon keeps an in-memory snapshot and
reloads it only when the database files changed and ``PRAGMA data_version`` confirms another
connection committed, so the per-message cost is two ``stat`` calls (``snapshot()``; call it
through ``asyncio.to_thread`` from the event loop, it touches the file system).

SQLite is loaded only once the list has content: SQLite costs each daemon process about
1.5 MB, which a relay nobody ever unsubscribed from does not need to pay. The store creates
the database as an empty (0-byte) file, which SQLite reads as an empty database, so the
file belongs to whoever runs first: normally the daemon's user. Run as root (``sudo relayd
suppress add``) on a state directory owned by someone else, it hands the database and its
``-wal``/``-shm`` files to that owner, or the daemon could no longer write to its own list.
"""

from __future__ import annotations

import builtins
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from relayd.model import RecipientOutcome, Status
from relayd.units import is_address

if TYPE_CHECKING:
    import sqlite3

DB_NAME = "suppressions.sqlite3"
_EMPTY: frozenset[str] = frozenset()
# Even with unchanged files, ask SQLite itself at least this often (see snapshot()).
RECHECK_SECONDS = 1.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppressed (
    address TEXT PRIMARY KEY,
    reason  TEXT NOT NULL DEFAULT 'manual',
    added   REAL NOT NULL DEFAULT (strftime('%s', 'now'))
)
"""


@dataclass(frozen=True)
class ImportResult:
    """What ``import_file`` did: addresses newly added, already present, and bad lines."""

    added: int
    present: int
    invalid: tuple[tuple[int, str], ...]


class SuppressionList(Protocol):
    """The do-not-email list as its users see it: in SQLite under ``state_dir``
    (``SuppressionStore``) or shared by a fleet in PostgreSQL
    (``relayd.shared.suppressions.SharedSuppressions``). Every method may block: call them
    off the event loop."""

    @property
    def location(self) -> str:
        """Where the list is kept, for log lines (never a password)."""

    def add(self, addresses: Iterable[str], reason: str = "manual") -> int: ...

    def remove(self, addresses: Iterable[str]) -> int: ...

    def import_lines(self, lines: Iterable[str], reason: str = "import") -> ImportResult: ...

    def import_file(self, path: Path) -> ImportResult: ...

    def contains(self, address: str) -> bool: ...

    def list(self) -> builtins.list[str]: ...

    def snapshot(self) -> frozenset[str]:
        """The whole list, cheap to call per message (a cached set)."""

    def close(self) -> None: ...


def parse_import(lines: Iterable[str]) -> tuple[builtins.list[str], builtins.list[tuple[int, str]]]:
    """One address per line; ``#`` comments and blank lines ignored (SPEC): the unique
    normalized addresses, and the (line number, text) of lines that are not addresses."""
    good: builtins.list[str] = []
    bad: builtins.list[tuple[int, str]] = []
    for no, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if is_address(normalize(text)):
            good.append(text)
        else:
            bad.append((no, text))
    return list(dict.fromkeys(normalize(a) for a in good)), bad


def normalize(address: str) -> str:
    """The form stored and compared: stripped, angle brackets removed, lower-cased."""
    return address.strip().strip("<>").strip().lower()


class ImportsLines:
    """``suppress import`` over a store's ``add`` (the same for the node's list and the
    fleet's)."""

    def add(self, addresses: Iterable[str], reason: str = "manual") -> int:
        raise NotImplementedError

    def import_lines(self, lines: Iterable[str], reason: str = "import") -> ImportResult:
        """One address per line; ``#`` comments and blank lines ignored (SPEC)."""
        unique, bad = parse_import(lines)
        added = self.add(unique, reason)
        return ImportResult(added=added, present=len(unique) - added, invalid=tuple(bad))

    def import_file(self, path: Path) -> ImportResult:
        with path.open(encoding="utf-8") as fh:
            return self.import_lines(fh)


class SuppressionStore(ImportsLines):
    """The do-not-email list (thread-safe; one instance per process is enough)."""

    def __init__(self, state_dir: Path, *, busy_timeout: float = 5.0) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / DB_NAME
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._snapshot: frozenset[str] | None = None
        self._version: tuple[int, int] = (-1, -1)
        self._local_writes = 0
        self._wal = Path(f"{self.path}-wal")
        self._signature: tuple[int, ...] | None = None
        self._checked_at = 0.0
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            self._give_to_owner()

    @property
    def location(self) -> str:
        return str(self.path)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _open(self) -> sqlite3.Connection:
        """The connection, opened (creating the database) on first use; hold the lock."""
        if self._db is None:
            # lazy: SQLite costs about 1.5 MB per process, paid only once the list is used
            # (test_split_process.py checks that neither process maps it otherwise)
            import sqlite3

            deadline = time.monotonic() + self._busy_timeout
            while True:
                db = sqlite3.connect(self.path, timeout=self._busy_timeout,
                                     check_same_thread=False, isolation_level=None)
                try:
                    db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
                    db.execute("PRAGMA journal_mode = WAL")
                    # FULL: a commit is on disk before add() returns, so an unsubscribe the
                    # one-click endpoint acknowledged survives a power cut (NORMAL in WAL mode
                    # may lose the last commits). Writes to this list are rare; reads pay nothing.
                    db.execute("PRAGMA synchronous = FULL")
                    db.execute(_SCHEMA)
                    break
                except sqlite3.OperationalError as exc:
                    db.close()
                    # Switching a new database to WAL, or another connection recovering the
                    # WAL, answers SQLITE_BUSY without calling the busy handler: wait here.
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
                except BaseException:
                    db.close()
                    raise
            self._db = db
            self._give_to_owner()  # the -wal and -shm files exist now
        return self._db

    def _give_to_owner(self) -> None:
        """As root, give files root just created the state directory's owner (the daemon)."""
        if os.geteuid() != 0:
            return
        owner = os.stat(self.path.parent)
        if owner.st_uid == 0 and owner.st_gid == 0:
            return
        for name in (self.path, self._wal, Path(f"{self.path}-shm")):
            try:
                st = os.stat(name)
                if (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
                    os.chown(name, owner.st_uid, owner.st_gid)
            except FileNotFoundError:
                continue

    def _absent(self) -> bool:
        """Nothing was ever listed (no database, or the empty file): reads answer without
        loading SQLite."""
        if self._db is not None:
            return False
        try:
            return os.stat(self.path).st_size == 0
        except FileNotFoundError:
            return True

    def __enter__(self) -> SuppressionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes --------------------------------------------------------------------------
    def add(self, addresses: Iterable[str], reason: str = "manual") -> int:
        """Add addresses (case-insensitive); returns how many were new."""
        rows = [(normalize(a), reason) for a in addresses if normalize(a)]
        with self._lock:
            db = self._open()
            before = db.total_changes
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT OR IGNORE INTO suppressed (address, reason) VALUES (?, ?)", rows)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._local_writes += 1
            self._give_to_owner()
            return db.total_changes - before

    def remove(self, addresses: Iterable[str]) -> int:
        """Remove addresses; returns how many were on the list."""
        rows = [(normalize(a),) for a in addresses]
        with self._lock:
            if self._absent():
                return 0
            db = self._open()
            before = db.total_changes
            db.executemany("DELETE FROM suppressed WHERE address = ?", rows)
            self._local_writes += 1
            self._give_to_owner()
            return db.total_changes - before

    # -- reads ---------------------------------------------------------------------------
    def contains(self, address: str) -> bool:
        with self._lock:
            if self._absent():
                return False
            row = self._open().execute("SELECT 1 FROM suppressed WHERE address = ?",
                                   (normalize(address),)).fetchone()
        return row is not None

    def list(self) -> builtins.list[str]:
        """Every listed address, sorted."""
        with self._lock:
            if self._absent():
                return []
            rows = self._open().execute("SELECT address FROM suppressed ORDER BY address").fetchall()
        return [r[0] for r in rows]

    def __len__(self) -> int:
        with self._lock:
            if self._absent():
                return 0
            row = self._open().execute("SELECT count(*) FROM suppressed").fetchone()
        return int(row[0])

    def _file_signature(self) -> tuple[int, ...] | None:
        """Size, mtime and inode of the database and its WAL: a commit by any connection
        appends to the WAL (or, after a checkpoint, rewrites the database), so an unchanged
        signature means nothing was committed. Two ``stat`` calls, no SQLite lock."""
        try:
            db, wal = os.stat(self.path), os.stat(self._wal)
        except OSError:
            return None
        return (db.st_mtime_ns, db.st_size, db.st_ino, wal.st_mtime_ns, wal.st_size, wal.st_ino)

    def snapshot(self) -> frozenset[str]:
        """The whole list as a frozenset, re-read only after a change.

        The common case costs two ``stat`` calls: ``PRAGMA data_version`` (which changes when
        *another* connection, the CLI, commits) is asked only when the files' signature or our
        own write count changed, or at least once a second. The periodic question covers a
        WAL rewritten in place to the same size within one timestamp tick, which the
        signature alone could miss. Measured: the PRAGMA under the lock, twice per message,
        was the largest wall-time item in the I/O threads under load.
        """
        if self._absent():
            return _EMPTY
        sig = self._file_signature()
        now = time.monotonic()
        cached = self._snapshot
        if (cached is not None and sig is not None and sig == self._signature
                and self._local_writes == self._version[1] and now - self._checked_at < RECHECK_SECONDS):
            return cached
        with self._lock:
            db = self._open()
            version = (int(db.execute("PRAGMA data_version").fetchone()[0]), self._local_writes)
            if self._snapshot is None or version != self._version:
                rows = db.execute("SELECT address FROM suppressed").fetchall()
                self._snapshot = frozenset(r[0] for r in rows)
                self._version = version
            self._signature, self._checked_at = sig, now
            return self._snapshot


def is_hard_bounce(outcome: RecipientOutcome) -> bool:
    """A permanent per-recipient failure that means "no such user" (RFC 3463 X.1.x class,
    e.g. 5.1.1 bad mailbox, 5.1.10 null MX) -> ``auto_add: hard_bounce`` lists it."""
    dsn = outcome.dsn or outcome.reply.dsn
    return outcome.status is Status.FAILED and dsn.startswith("5.1.")


def read_snapshot(state_dir: Path) -> frozenset[str]:
    """The list read without writing anything (for ``relayd explain``); empty if absent."""
    path = state_dir / DB_NAME
    if not path.exists() or path.stat().st_size == 0:
        return frozenset()
    import sqlite3  # lazy: as in SuppressionStore._open, only when there is a list

    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        return frozenset(r[0] for r in db.execute("SELECT address FROM suppressed"))
    finally:
        db.close()
