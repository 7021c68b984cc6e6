"""The fleet's do-not-email list in PostgreSQL, with the same interface as the SQLite list
(``relayd.policy.suppressions.SuppressionList``).

Writes go straight to the database (``relayd suppress``, the unsubscribe endpoint, hard
bounces) with the reason, the time and the node. Reads per message are a cached set: a
background thread asks the database every ``poll`` seconds for one number that every change
bumps (a trigger, so even an operator's own SQL counts) and re-reads the list when it moved,
so a change on any node is enforced by every node within ``poll`` seconds. While the database
cannot be reached the node keeps the last list it saw; that list is also kept in
``state_dir/shared-suppressions.cache`` so that a node restarted during an outage still
never mails an address it knew was listed.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from relayd.errors import StateUnavailable
from relayd.policy.suppressions import ImportsLines, normalize
from relayd.shared.db import Conn, SharedDB

log = logging.getLogger("relayd")

POLL = 0.25
CACHE_NAME = "shared-suppressions.cache"


class SharedSuppressions(ImportsLines):
    """The do-not-email list of the fleet (thread-safe)."""

    def __init__(self, db: SharedDB, *, cache_dir: Path | None = None, poll: float = POLL) -> None:
        self.db = db
        self._poll = poll
        self._cache = cache_dir / CACHE_NAME if cache_dir is not None else None
        self._lock = threading.Lock()
        self._snapshot: frozenset[str] = self._read_cache()
        self._version: int | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def location(self) -> str:
        return f"in {self.db.location()}"

    def __enter__(self) -> SharedSuppressions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- writes --------------------------------------------------------------------------
    def add(self, addresses: Iterable[str], reason: str = "manual") -> int:
        rows = list(dict.fromkeys(a for a in (normalize(x) for x in addresses) if a))
        if not rows:
            return 0

        def insert(conn: Conn) -> int:
            cur = conn.execute(
                "INSERT INTO relayd_suppressions (address, reason, node) "
                "SELECT unnest(%s::text[]), %s, %s ON CONFLICT (address) DO NOTHING",
                (rows, reason, self.db.node))
            return max(0, cur.rowcount)

        added = self.db.run(insert)
        with self._lock:  # this node enforces its own change at once
            self._snapshot = self._snapshot | frozenset(rows)
        self._wake.set()
        return added

    def remove(self, addresses: Iterable[str]) -> int:
        rows = list(dict.fromkeys(normalize(a) for a in addresses))

        def delete(conn: Conn) -> int:
            cur = conn.execute("DELETE FROM relayd_suppressions WHERE address = ANY(%s::text[])",
                               (rows,))
            return max(0, cur.rowcount)

        removed = self.db.run(delete)
        self._wake.set()
        return removed

    # -- reads ---------------------------------------------------------------------------
    def contains(self, address: str) -> bool:
        row = self.db.run(lambda c: c.execute(
            "SELECT 1 FROM relayd_suppressions WHERE address = %s", (normalize(address),)
        ).fetchone())
        return row is not None

    def list(self) -> builtins.list[str]:
        rows = self.db.run(lambda c: c.execute(
            "SELECT address FROM relayd_suppressions ORDER BY address").fetchall())
        return [str(r[0]) for r in rows]

    def __len__(self) -> int:
        row = self.db.run(lambda c: c.execute("SELECT count(*) FROM relayd_suppressions").fetchone())
        return int(str(row[0])) if row else 0

    def snapshot(self) -> frozenset[str]:
        """The last list this node saw. The first call reads it (at most the connect
        timeout while the database is down), so a process's first message is checked
        against the current list; after that a thread keeps it and this never blocks."""
        if self._thread is None:
            self.refresh()
            self._start()
        return self._snapshot

    def last_seen(self) -> frozenset[str]:
        """The list as this node last saw it (kept in its state_dir), without asking the
        database: what the daemon checks while the database cannot be reached."""
        return self._snapshot

    # -- keeping the snapshot current -----------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._follow, daemon=True,
                                                name="relayd-shared-list")
                self._thread.start()

    def refresh(self) -> bool:
        """Re-read the list if it changed; False while the database cannot be reached."""
        def read(conn: Conn) -> tuple[int, frozenset[str] | None]:
            row = conn.execute("SELECT version FROM relayd_suppressions_version").fetchone()
            version = int(str(row[0])) if row else 0
            if version == self._version:
                return version, None
            rows = conn.execute("SELECT address FROM relayd_suppressions").fetchall()
            return version, frozenset(str(r[0]) for r in rows)

        try:
            version, addresses = self.db.run(read)
        except StateUnavailable:
            return False
        if addresses is not None:
            with self._lock:
                self._snapshot, self._version = addresses, version
            self._write_cache(addresses)
        return True

    def _follow(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._wake.wait(self._poll)
            self._wake.clear()

    def _read_cache(self) -> frozenset[str]:
        if self._cache is None:
            return frozenset()
        try:
            return frozenset(self._cache.read_text(encoding="utf-8").split())
        except OSError:
            return frozenset()

    def _write_cache(self, addresses: frozenset[str]) -> None:
        if self._cache is None:
            return
        tmp = self._cache.with_name(f"{self._cache.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text("".join(f"{a}\n" for a in sorted(addresses)), encoding="utf-8")
            os.replace(tmp, self._cache)
        except OSError as exc:
            log.warning("shared state: cannot keep the do-not-email list's copy in %s: %s",
                        self._cache, exc.strerror or exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
