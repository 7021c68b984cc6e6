"""The do-not-email list: a small SQLite database under ``state_dir``.

SQLite in WAL mode with a busy timeout lets ``relayd suppress ...`` write while the daemon
reads, from separate processes, without locking each other out for long. Addresses are
stored lower-cased (the list is case-insensitive). The daemon keeps an in-memory snapshot and
reloads it only when ``PRAGMA data_version`` says another connection committed a change, so
the per-message cost is one tiny query (``snapshot()``; call it through ``asyncio.to_thread``
from the event loop, it touches the database file).
"""

from __future__ import annotations

import builtins
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from relayd.model import RecipientOutcome, Status
from relayd.units import is_address

DB_NAME = "suppressions.sqlite3"
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


def normalize(address: str) -> str:
    """The form stored and compared: stripped, angle brackets removed, lower-cased."""
    return address.strip().strip("<>").strip().lower()


class SuppressionStore:
    """The do-not-email list (thread-safe; one instance per process is enough)."""

    def __init__(self, state_dir: Path, *, busy_timeout: float = 5.0) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / DB_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=busy_timeout, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute(_SCHEMA)
        self._snapshot: frozenset[str] | None = None
        self._version: tuple[int, int] = (-1, -1)
        self._local_writes = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SuppressionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes --------------------------------------------------------------------------
    def add(self, addresses: Iterable[str], reason: str = "manual") -> int:
        """Add addresses (case-insensitive); returns how many were new."""
        rows = [(normalize(a), reason) for a in addresses if normalize(a)]
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO suppressed (address, reason) VALUES (?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._local_writes += 1
            return self._db.total_changes - before

    def remove(self, addresses: Iterable[str]) -> int:
        """Remove addresses; returns how many were on the list."""
        rows = [(normalize(a),) for a in addresses]
        with self._lock:
            before = self._db.total_changes
            self._db.executemany("DELETE FROM suppressed WHERE address = ?", rows)
            self._local_writes += 1
            return self._db.total_changes - before

    def import_lines(self, lines: Iterable[str], reason: str = "import") -> ImportResult:
        """One address per line; ``#`` comments and blank lines ignored (SPEC)."""
        good: list[str] = []
        bad: list[tuple[int, str]] = []
        for no, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            if is_address(normalize(text)):
                good.append(text)
            else:
                bad.append((no, text))
        unique = list(dict.fromkeys(normalize(a) for a in good))
        added = self.add(unique, reason)
        return ImportResult(added=added, present=len(unique) - added, invalid=tuple(bad))

    def import_file(self, path: Path) -> ImportResult:
        with path.open(encoding="utf-8") as fh:
            return self.import_lines(fh)

    # -- reads ---------------------------------------------------------------------------
    def contains(self, address: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM suppressed WHERE address = ?",
                                   (normalize(address),)).fetchone()
        return row is not None

    def list(self) -> builtins.list[str]:
        """Every listed address, sorted."""
        with self._lock:
            rows = self._db.execute("SELECT address FROM suppressed ORDER BY address").fetchall()
        return [r[0] for r in rows]

    def __len__(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT count(*) FROM suppressed").fetchone()
        return int(row[0])

    def snapshot(self) -> frozenset[str]:
        """The whole list as a frozenset, re-read only after a change.

        ``PRAGMA data_version`` changes when *another* connection (the CLI) commits; our own
        writes are counted separately. Unchanged: one PRAGMA query, microseconds.
        """
        with self._lock:
            version = (int(self._db.execute("PRAGMA data_version").fetchone()[0]),
                       self._local_writes)
            if self._snapshot is None or version != self._version:
                rows = self._db.execute("SELECT address FROM suppressed").fetchall()
                self._snapshot = frozenset(r[0] for r in rows)
                self._version = version
            return self._snapshot


def is_hard_bounce(outcome: RecipientOutcome) -> bool:
    """A permanent per-recipient failure that means "no such user" (RFC 3463 X.1.x class,
    e.g. 5.1.1 bad mailbox, 5.1.10 null MX) -> ``auto_add: hard_bounce`` lists it."""
    dsn = outcome.dsn or outcome.reply.dsn
    return outcome.status is Status.FAILED and dsn.startswith("5.1.")


def read_snapshot(state_dir: Path) -> frozenset[str]:
    """The list read without writing anything (for ``relayd explain``); empty if absent."""
    path = state_dir / DB_NAME
    if not path.exists():
        return frozenset()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        return frozenset(r[0] for r in db.execute("SELECT address FROM suppressed"))
    finally:
        db.close()
