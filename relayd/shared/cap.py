"""The fleet's daily cap in PostgreSQL, with ``DailyCap``'s interface (``relayd.delivery.limits.Cap``).

Every reservation is one transaction under an advisory lock: it reads the recipients the fleet
delivered in the window and those every node holds in flight, and takes at most what is left,
so two nodes can never both take the last unit. ``settle`` gives back what was not delivered
and records what was. A settle the database cannot take now (it is down) is kept in memory
and written before this node's next reservation, which cannot happen before the database is
back: the count is never lost, only late, and the units stay held in flight meanwhile.

A node that dies (SIGKILL, power) leaves its units in flight; when it starts again they are
counted as delivered at that moment: some of those deliveries may have happened, and counting
them late is the safe side of "at most daily_cap". Times are the nodes' clocks (keep them in
NTP).
"""

from __future__ import annotations

import contextlib
import math
import threading

from relayd.errors import StateUnavailable
from relayd.shared.db import Conn, SharedDB
from relayd.shared.schema import CAP_LOCK


def minute_of(at: float) -> int:
    """The minute a delivery at epoch time ``at`` counts in. It is taken to happen at the end
    of that minute, so it leaves the rolling window up to 60 s late, never early."""
    return math.floor(at / 60)


def first_minute(now: float, window: float) -> int:
    """The oldest minute still in the window ending at ``now``: minute m counts while its end,
    (m + 1) * 60, is after ``now - window``."""
    return math.floor((now - window) / 60)


def _add_minute(conn: Conn, node: str, minute: int, n: int) -> None:
    conn.execute("INSERT INTO relayd_cap_minutes (minute, node, n) VALUES (%s, %s, %s) "
                 "ON CONFLICT (minute, node) DO UPDATE SET n = relayd_cap_minutes.n + EXCLUDED.n",
                 (minute, node, n))


class SharedDailyCap:
    """At most ``cap`` delivered recipients per rolling ``window`` seconds, for the fleet."""

    def __init__(self, db: SharedDB, cap: int, *, window: float) -> None:
        self.db = db
        self.cap = cap
        self.window = window
        self._lock = threading.RLock()  # one operation at a time: pending settles are written once
        self._pending: list[tuple[int, int, float]] = []   # (granted, delivered, at)
        self._used = 0
        self._in_flight = 0
        self._next_free: float | None = None

    def close(self) -> None:
        """Write what is pending if the database answers (else the next start counts it)."""
        # If it cannot, the units stay in flight and this node's next start counts them.
        with contextlib.suppress(StateUnavailable):
            self._flush_only()

    # -- transactions ---------------------------------------------------------------------
    def _write_pending(self, conn: Conn, items: list[tuple[int, int, float]], now: float) -> None:
        node = self.db.node
        if not self.db.in_flight_recovered:
            row = conn.execute("SELECT n, since FROM relayd_cap_in_flight WHERE node = %s",
                               (node,)).fetchone()
            if row is not None and int(str(row[0])) > 0:
                _add_minute(conn, node, minute_of(max(now, float(str(row[1])))), int(str(row[0])))
                conn.execute("UPDATE relayd_cap_in_flight SET n = 0 WHERE node = %s", (node,))
        for granted, delivered, at in items:
            if granted:
                conn.execute("UPDATE relayd_cap_in_flight SET n = greatest(0, n - %s) "
                             "WHERE node = %s", (granted, node))
            if delivered > 0:
                _add_minute(conn, node, minute_of(at), delivered)

    def _count(self, conn: Conn, now: float) -> tuple[int, int]:
        row = conn.execute(
            "SELECT (SELECT coalesce(sum(n), 0) FROM relayd_cap_minutes WHERE minute >= %s), "
            "(SELECT coalesce(sum(n), 0) FROM relayd_cap_in_flight)", (first_minute(now, self.window),)
        ).fetchone()
        assert row is not None
        return int(str(row[0])), int(str(row[1]))

    def _run(self, now: float, reserve: int) -> int:
        """Write pending settles, then reserve up to ``reserve`` units; returns the grant."""
        with self._lock:
            items = list(self._pending)

            def work(conn: Conn) -> int:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (CAP_LOCK,))
                self._write_pending(conn, items, now)
                used, in_flight = self._count(conn, now)
                granted = max(0, min(reserve, self.cap - used - in_flight))
                if granted:
                    conn.execute(
                        "INSERT INTO relayd_cap_in_flight (node, n, since) VALUES (%s, %s, %s) "
                        "ON CONFLICT (node) DO UPDATE SET n = relayd_cap_in_flight.n + "
                        "EXCLUDED.n, since = CASE WHEN relayd_cap_in_flight.n = 0 THEN "
                        "EXCLUDED.since ELSE relayd_cap_in_flight.since END",
                        (self.db.node, granted, now))
                self._used, self._in_flight = used, in_flight + granted
                self._next_free = None
                if granted < reserve:
                    self._next_free = self._free_at(conn, now, reserve - granted)
                return granted

            granted = self.db.run(work)
            self.db.in_flight_recovered = True
            del self._pending[:len(items)]
            return granted

    def _free_at(self, conn: Conn, now: float, need: int) -> float | None:
        """When ``need`` more units leave the window (None: only in-flight ones block)."""
        row = conn.execute(
            "SELECT minute FROM (SELECT minute, sum(sum(n)) OVER (ORDER BY minute) AS freed "
            "FROM relayd_cap_minutes WHERE minute >= %s GROUP BY minute) s "
            "WHERE freed >= %s ORDER BY minute LIMIT 1",
            (first_minute(now, self.window), need)).fetchone()
        # A minute's deliveries count as made at its end (see minute_of).
        return None if row is None else (int(str(row[0])) + 1) * 60.0 + self.window

    def _flush_only(self) -> None:
        with self._lock:
            if self._pending:
                self._run(max(at for _, _, at in self._pending), 0)

    def state(self, now: float, need: int) -> tuple[int, int, float | None]:
        """(recipients the fleet delivered in the window, units every node holds for
        deliveries under way, when ``need`` more units free up or None) as the database has
        them now. Reads only, takes no lock: for ``relayd explain``."""
        def work(conn: Conn) -> tuple[int, int, float | None]:
            used, in_flight = self._count(conn, now)
            short = need - (self.cap - used - in_flight)
            return used, in_flight, self._free_at(conn, now, short) if short > 0 else None
        return self.db.run(work)

    # -- the Cap interface ----------------------------------------------------------------
    def acquire(self, n: int, now: float) -> int:
        """Grant up to ``n`` units now; raises StateUnavailable while the database is down."""
        return self._run(now, n)

    def settle(self, granted: int, delivered: int, now: float) -> None:
        """Give back the grant and record ``delivered``; kept for later if the database is
        down (never raises for that)."""
        with self._lock:
            self._pending.append((granted, delivered, now))
            self._in_flight = max(0, self._in_flight - granted)
            self._used += max(0, delivered)
            # Down: written before this node's next reservation.
            with contextlib.suppress(StateUnavailable):
                self._flush_only()

    def record(self, n: int, now: float) -> None:
        if n > 0:
            self.settle(0, n, now)

    def next_free_at(self, now: float, n: int = 1) -> float | None:
        """As computed by the last reservation that fell short."""
        return now if self.remaining(now) >= min(n, self.cap) else self._next_free

    def refresh(self, now: float) -> None:
        """Re-read the fleet's count (the housekeeping's gauge, also while this node sends
        nothing); StateUnavailable while the database cannot be reached."""
        used, in_flight = self.db.run(lambda conn: self._count(conn, now))
        with self._lock:
            # What this node settled but could not write yet is not in the database's count.
            delivered = sum(d for _, d, _ in self._pending)
            given_back = sum(g for g, _, _ in self._pending)
            self._used, self._in_flight = used + delivered, max(0, in_flight - given_back)

    def remaining(self, now: float) -> int:
        """The fleet's remaining units as of this node's last transaction (no query: the
        housekeeping gauge reads it on the event loop)."""
        return max(0, self.cap - self._used - self._in_flight)

