"""The fleet's daily cap in PostgreSQL, with ``DailyCap``'s interface (``relayd.delivery.limits.Cap``).

What the database holds. ``relayd_cap_minutes``: the recipients each node delivered, per
minute of its clock (epoch seconds // 60). A minute's deliveries count as made at the end of
that minute, so they leave the rolling window up to 60 s late, never early, and a window sum
reads at most 1440 rows per node. ``relayd_cap_in_flight``: per node, the units it *holds*,
reserved for deliveries under way or leased and not yet used.

Reservations in batches. A node reserves in one transaction under a fleet-wide advisory lock:
it reads what the fleet delivered in the window and what every other node holds, and takes at
most what is left, so ``delivered + every node's held <= cap`` always holds in the database
and two nodes can never both take the last unit. It takes more than the message needs:
``min(BATCH_MAX, (free - need) // BATCH_SHARE)`` more, its *lease*, which later ``acquire``
calls spend without asking the database. The extra shrinks with the fleet's free units: with
``BATCH_SHARE`` free units or fewer it is 0 and reservations are one at a time, exactly as
without batches. A failed delivery's unit goes back to the lease; a lease unused for
``LEASE_IDLE`` seconds goes back to the fleet.

Counts in batches. What was delivered is counted in memory per minute and written with the
next reservation, the housekeeping's ``refresh``, ``close``, and by a flusher thread within
``FLUSH_AFTER`` seconds of the first unwritten count. The write lowers the node's held units
by the ones it counts, in the same transaction, so a unit is always either held or counted
in the database, never neither: the cap is exact, not approximate.

While the database is down ``acquire`` raises ``StateUnavailable`` (also when the lease could
serve it: deliveries that need the cap wait, as ``shared_state_down`` says). The counts are
kept in memory and written when it answers again; their units stay held meanwhile. A node that
dies (SIGKILL, power) leaves its held units, lease included, in flight; when it starts again
they are counted as delivered at that moment: some of those deliveries may have happened, and
counting them late is the safe side of "at most daily_cap". Times are the nodes' clocks (keep
them in NTP).

A node not seen for ``STALE_AFTER`` seconds before the last word of the node looking is
taken for dead (a node writes ``seen``, the database's clock, with every write and every
housekeeping refresh, i.e. every few seconds; measuring from the looker's
own last word means that an outage of the database, which silences every node at once, makes
none dead). The next reservation or refresh of another node counts the units it held as
delivered at that moment (they may have been sent) and zeroes them, so a node that never
comes back does not hold the fleet's units for ever. A partitioned node that comes back
later sets its row to what it holds again and counts what it then delivers: those units are
counted twice (over, never under: the cap still holds).

Everything here blocks: ``acquire``, ``settle`` (memory only), ``refresh`` and ``close`` are
called from worker threads (the queue manager's executor), never on the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable

from relayd.errors import StateUnavailable
from relayd.shared.db import Conn, SharedDB
from relayd.shared.schema import CAP_LOCK

log = logging.getLogger("relayd")

# A reservation takes at most this many units beyond what the message needs: at 2000
# messages a second a node makes about 16 reservations a second, and a node that dies wastes
# at most this many (plus those in use) for one window.
BATCH_MAX = 128
# ... and at most this share of the fleet's free units, so that near the cap one node cannot
# lease what another needs: with 16 free units or fewer, one unit at a time.
BATCH_SHARE = 16
FLUSH_AFTER = 0.5   # seconds: an unwritten count is written at the latest this late
LEASE_IDLE = 1.0    # seconds: a lease nobody spent for this long goes back to the fleet
RETRY = 1.0         # seconds between the flusher's attempts while the database is down
# A node that wrote nothing for this long is dead (far longer than the 5 s between a live
# node's refreshes). Tests shorten it with this environment variable; it is not a setting.
STALE_AFTER = 300.0
STALE_ENV = "RELAYD_CAP_STALE_AFTER"

_WRITE_MINUTES = (
    "INSERT INTO relayd_cap_minutes (minute, node, n) "
    "SELECT m, %s, c FROM unnest(%s::bigint[], %s::bigint[]) AS t(m, c) "
    "ON CONFLICT (minute, node) DO UPDATE SET n = relayd_cap_minutes.n + EXCLUDED.n")
# The node's row is set to what it holds (only this node writes its own count). ``seen`` is
# the database's clock, so that no node's clock matters for it.
_WRITE_HELD = (
    "INSERT INTO relayd_cap_in_flight (node, n, since, seen) "
    "VALUES (%s, %s, %s, extract(epoch FROM now())) "
    "ON CONFLICT (node) DO UPDATE SET n = EXCLUDED.n, seen = EXCLUDED.seen, "
    "since = CASE WHEN relayd_cap_in_flight.n = 0 THEN EXCLUDED.since "
    "ELSE relayd_cap_in_flight.since END")


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


def _stale_after() -> float:
    try:
        return float(os.environ.get(STALE_ENV, STALE_AFTER))
    except ValueError:
        return STALE_AFTER


def _any_dead(conn: Conn, node: str, before: float) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM relayd_cap_in_flight WHERE node <> %s AND n > 0 "
        "AND seen < %s)", (node, before)).fetchone()
    return bool(row and row[0])


def _count_the_dead(conn: Conn, node: str, before: float, now: float) -> list[tuple[str, int]]:
    """Hold the cap's lock. Units held by nodes last seen before ``before`` count as
    delivered now; the (node, units) converted."""
    # FOR UPDATE: a dead node that writes meanwhile (it was only cut off) is seen again and
    # skipped; RETURNING gives the units it held (an UPDATE's own RETURNING gives the new 0).
    rows = conn.execute(
        "WITH dead AS (SELECT node, n FROM relayd_cap_in_flight WHERE node <> %s AND n > 0 "
        "AND seen < %s FOR UPDATE) "
        "UPDATE relayd_cap_in_flight f SET n = 0 FROM dead WHERE f.node = dead.node "
        "RETURNING f.node, dead.n", (node, before)).fetchall()
    dead = [(str(other), int(str(n))) for other, n in rows]
    for other, n in dead:
        _add_minute(conn, other, minute_of(now), n)
    return dead


def _count(conn: Conn, first: int, exclude: str | None) -> tuple[int, int]:
    """(recipients the fleet delivered from minute ``first`` on, units held by the nodes other
    than ``exclude``), in one statement, so one snapshot."""
    row = conn.execute(
        "SELECT (SELECT coalesce(sum(n), 0) FROM relayd_cap_minutes WHERE minute >= %s), "
        "(SELECT coalesce(sum(n), 0) FROM relayd_cap_in_flight WHERE node IS DISTINCT FROM %s)",
        (first, exclude)).fetchone()
    assert row is not None
    return int(str(row[0])), int(str(row[1]))


def _free_at(conn: Conn, first: int, window: float, need: int) -> float | None:
    """When ``need`` more units leave the window (None: only held ones block)."""
    row = conn.execute(
        "SELECT minute FROM (SELECT minute, sum(sum(n)) OVER (ORDER BY minute) AS freed "
        "FROM relayd_cap_minutes WHERE minute >= %s GROUP BY minute) s "
        "WHERE freed >= %s ORDER BY minute LIMIT 1", (first, need)).fetchone()
    # A minute's deliveries count as made at its end (see minute_of).
    return None if row is None else (int(str(row[0])) + 1) * 60.0 + window


class SharedDailyCap:
    """At most ``cap`` delivered recipients per rolling ``window`` seconds, for the fleet."""

    def __init__(self, db: SharedDB, cap: int, *, window: float,
                 clock: Callable[[], float] = time.time, stale_after: float | None = None) -> None:
        self.db = db
        self.cap = cap
        self.window = window
        self.stale_after = _stale_after() if stale_after is None else stale_after
        self._clock = clock   # epoch seconds, for the flusher's writes (callers pass ``now``)
        self._tx = threading.Lock()      # one transaction of this cap at a time
        self._lock = threading.Lock()    # the counts below; never held across a transaction
        self._wake = threading.Condition(self._lock)   # the flusher's
        self._in_use = 0         # units granted to deliveries not settled yet
        self._lease = 0          # units held in the database that no delivery uses
        self._lease_touched = 0.0          # time.monotonic() of the lease's last change
        self._pending: dict[int, int] = {}   # minute -> delivered recipients not written yet
        self._pending_total = 0
        self._pending_since: float | None = None   # time.monotonic() of the oldest of them
        self._written = 0        # the held units this node's row says (as last written)
        self._used = 0           # the fleet's delivered recipients, at the last transaction
        self._others = 0         # the other nodes' held units, then
        self._next_free: float | None = None
        self._pruned: int | None = None   # the window's first minute at the last prune
        self._retry_at = 0.0
        self._flusher: threading.Thread | None = None
        self._closing = False

    # -- the Cap interface ----------------------------------------------------------------
    def acquire(self, n: int, now: float) -> int:
        """Grant up to ``n`` units now, from the lease or else from one reservation; raises
        StateUnavailable while the database is down."""
        if n <= 0:
            return 0
        with self._lock:
            if self._lease >= n and self.db.up:
                self._take(n)
                return n
        with self._tx:
            with self._lock:
                if self._lease >= n and self.db.up:   # another thread's reservation filled it
                    self._take(n)
                    return n
                taken = self._lease
                self._take(taken)
            try:
                granted = taken + self._transact(now, reserve=n - taken)
            except BaseException:
                with self._lock:
                    self._in_use -= taken
                    self._lease += taken
                raise
        self._ensure_flusher()   # to give the lease back once idle
        return granted

    def _take(self, n: int) -> None:
        """Hold self._lock: ``n`` units of the lease go to a delivery."""
        self._lease -= n
        self._in_use += n
        self._lease_touched = time.monotonic()

    def settle(self, granted: int, delivered: int, now: float) -> None:
        """Count ``delivered`` (in memory; written within FLUSH_AFTER) and give the rest of
        the grant back to the lease. Never asks the database."""
        with self._lock:
            granted = min(granted, self._in_use)
            spent = min(granted, max(0, delivered))
            self._in_use -= granted
            if granted > spent:
                self._lease += granted - spent
                self._lease_touched = time.monotonic()
            if delivered > 0:
                minute = minute_of(now)
                self._pending[minute] = self._pending.get(minute, 0) + delivered
                self._pending_total += delivered
                if self._pending_since is None:
                    self._pending_since = time.monotonic()
            self._wake.notify()
        self._ensure_flusher()

    def record(self, n: int, now: float) -> None:
        if n > 0:
            self.settle(0, n, now)

    def next_free_at(self, now: float, n: int = 1) -> float | None:
        """As computed by the last reservation that fell short."""
        return now if self.remaining(now) >= min(n, self.cap) else self._next_free

    def refresh(self, now: float) -> None:
        """The housekeeping's: write what is unwritten, give an idle lease back, and re-read
        the fleet's count (also while this node sends nothing); StateUnavailable while the
        database cannot be reached."""
        with self._tx:
            self._transact(now, count=True)

    def remaining(self, now: float) -> int:
        """The fleet's remaining units as this node sees them: as of its last transaction,
        less what it delivered or uses since; its own lease counts as remaining (no query: the
        housekeeping gauge reads it on the event loop)."""
        return max(0, self.cap - self._used - self._pending_total - self._others - self._in_use)

    def shift(self, delta: float, now: float) -> None:
        """This node's wall clock jumped: nothing moves. The rows are stamped with the minute of
        each node's own clock, and the other nodes' clocks did not jump: moved, this node's
        rows would lie days off for them, while this node still read theirs on its jumped
        clock. Nor can a node tell which clock is right (an NTP step or a resumed VM brings it
        back to the fleet's time). Only said, for the operator."""
        log.warning("shared state: the wall clock of node %s jumped %+.0fs; the fleet's daily "
                    "cap counts on each node's own clock, so keep every node in NTP "
                    "(docs/fleet.md)", self.db.node, delta)

    def flush(self) -> None:
        """Nothing to write: ``shift`` moves nothing."""

    def close(self) -> None:
        """Stop the flusher; write what is pending and give the lease back if the database
        answers (else the units stay held and this node's next start counts them)."""
        with self._lock:
            self._closing = True
            flusher = self._flusher
            self._wake.notify_all()
        if flusher is not None:
            flusher.join(timeout=30)
        try:
            with contextlib.suppress(StateUnavailable), self._tx:
                self._transact(self._clock(), give_back=True)
        finally:
            with self._lock:
                self._closing = False   # a reload may use this cap again

    def state(self, now: float, need: int) -> tuple[int, int, float | None]:
        """(recipients the fleet delivered in the window, units every node holds for
        deliveries under way or leased, when ``need`` more units free up or None) as the
        database has them now. Reads only, takes no lock: for ``relayd explain``."""
        first = first_minute(now, self.window)

        def work(conn: Conn) -> tuple[int, int, float | None]:
            used, held = _count(conn, first, None)
            short = need - (self.cap - used - held)
            return used, held, _free_at(conn, first, self.window, short) if short > 0 else None
        return self.db.run(work)

    # -- transactions ---------------------------------------------------------------------
    def _transact(self, now: float, *, reserve: int | None = None, count: bool = False,
                  give_back: bool = False) -> int:
        """Hold self._tx. One transaction: write the unwritten counts and this node's held
        units, giving back an idle lease (all of it with ``give_back``); with ``reserve``,
        under the cap's lock, also take up to ``reserve`` units for the caller plus the
        batch's extra for the lease. Returns the units granted to the caller. Skipped when
        there is nothing to write, reserve or count."""
        with self._lock:
            minutes = dict(self._pending)
            idle = time.monotonic() - self._lease_touched >= LEASE_IDLE
            returned = self._lease if (give_back or idle) and reserve is None else 0
            self._lease -= returned
            held = self._in_use + self._lease
        recovered = self.db.in_flight_recovered
        if reserve is None and not count and not minutes and held == self._written and recovered:
            return 0
        node, first = self.db.node, first_minute(now, self.window)

        dead: list[tuple[str, int]] = []

        def work(conn: Conn) -> tuple[int, int, int, float | None]:
            mine = conn.execute("SELECT n, since, seen FROM relayd_cap_in_flight WHERE node = %s",
                                (node,)).fetchone()
            # Dead: not seen for stale_after before this node's own last word, so that an
            # outage of the database, which silences every node at once, kills none.
            before = None if mine is None else float(str(mine[2])) - self.stale_after
            # Every write of another node's rows (a reservation, a dead node's units) is
            # under the cap's lock, taken first; a refresh takes it only to count the dead.
            locked = reserve is not None or (
                count and before is not None and _any_dead(conn, node, before))
            if locked:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (CAP_LOCK,))
            if not recovered and mine is not None and int(str(mine[0])) > 0:
                # This process's first write: what an earlier one held when it died counts
                # as delivered now (the row is then set to what this process holds).
                _add_minute(conn, node, minute_of(max(now, float(str(mine[1])))), int(str(mine[0])))
            # A refresh also says that this node is alive (``seen``), every few seconds.
            # Written before the minutes, in the order a count of the dead writes them.
            if reserve is None and (held != self._written or not recovered or count):
                conn.execute(_WRITE_HELD, (node, held, now))
            if minutes:
                conn.execute(_WRITE_MINUTES, (node, list(minutes), list(minutes.values())))
            if locked and before is not None:
                dead[:] = _count_the_dead(conn, node, before, now)
            used, others = _count(conn, first, node)
            if reserve is None:
                return used, others, 0, None
            free = self.cap - used - others - held
            grant, free_at = max(0, min(reserve, free)), None
            if free > reserve:
                grant += min(BATCH_MAX, (free - reserve) // BATCH_SHARE)
            elif grant < reserve:
                free_at = _free_at(conn, first, self.window, reserve - grant)
            if self._pruned != first:   # rows that left the window: once a minute
                conn.execute("DELETE FROM relayd_cap_minutes WHERE minute < %s", (first,))
                self._pruned = first
            conn.execute(_WRITE_HELD, (node, held + grant, now))
            return used, others, grant, free_at

        try:
            used, others, grant, free_at = self.db.run(work)
        except BaseException:
            with self._lock:
                self._lease += returned
            raise
        self.db.in_flight_recovered = True
        for other, n in dead:
            log.warning("shared state: node %s was not seen for %.0fs: the %d unit(s) of the "
                        "daily cap it held now count as delivered", other, self.stale_after, n)
        mine = min(grant, reserve or 0)
        with self._lock:
            for minute, n in minutes.items():
                left = self._pending[minute] - n
                if left:
                    self._pending[minute] = left
                else:
                    del self._pending[minute]
            self._pending_total -= sum(minutes.values())
            # What was counted meanwhile waits for the next write, FLUSH_AFTER from now.
            self._pending_since = time.monotonic() if self._pending else None
            self._in_use += mine
            if grant > mine:
                self._lease += grant - mine
                self._lease_touched = time.monotonic()
            self._written = held + grant
            self._used, self._others = used, others
            if reserve is not None:
                self._next_free = free_at
            self._wake.notify()
        return mine

    # -- the flusher ----------------------------------------------------------------------
    def _ensure_flusher(self) -> None:
        if self._flusher is not None:   # the usual case, without the lock (checked again)
            return
        with self._lock:
            if self._flusher is not None or self._closing:
                return
            self._flusher = threading.Thread(target=self._flush_loop, name="relayd-cap-flush",
                                             daemon=True)
        self._flusher.start()

    def _due(self) -> float | None:
        """Hold self._lock: when the flusher has work (time.monotonic()), or None."""
        due: list[float] = []
        if self._pending_since is not None:
            due.append(self._pending_since + FLUSH_AFTER)
        if self._lease:
            due.append(self._lease_touched + LEASE_IDLE)
        return max(min(due), self._retry_at) if due else None

    def _flush_loop(self) -> None:
        """Write counts within FLUSH_AFTER and give an idle lease back, in its own thread
        (the deliveries' threads never wait for these writes)."""
        while True:
            with self._lock:
                while True:
                    if self._closing:
                        self._flusher = None
                        return
                    due = self._due()
                    wait = None if due is None else due - time.monotonic()
                    if wait is not None and wait <= 0:
                        break
                    self._wake.wait(wait)
            try:
                with self._tx:
                    self._transact(self._clock())
            except StateUnavailable:
                self._retry_at = time.monotonic() + RETRY   # the counts wait in memory
            except Exception:
                log.exception("shared state: writing the daily cap's counts failed")
                self._retry_at = time.monotonic() + RETRY
