"""Delivery limits: the rolling 24 h ``daily_cap`` and the ``rate`` token bucket.

Both take the time as an argument or an injected clock, so tests drive them without sleeping.
``DailyCap`` counts delivered recipients (one message to 3 recipients counts 3, as provider
quotas do) and persists each delivery in ``state_dir/daily_cap.sqlite3`` so a restart does not
reset the window. A delivery is on the disk before ``settle``/``record`` returns; deliveries
settled at the same time share one commit (``_Rows``), and the in-memory count never waits
for the disk, so reservations go on while a commit is under way. ``priority_exempt`` (see
``limited``) means priority mail never waits for the cap or the rate, but its deliveries
still count against the cap: the provider counts them too.

The cap's stamps are the wall clock's, and providers count real time: when the queue manager
notices a wall-clock jump, ``shift`` moves every stamp (and the file's rows) by the jump, so
the window keeps its real length. ``RateLimiter`` reads the monotonic clock, which never jumps.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from relayd.config.schema import LimitsConfig
from relayd.units import Rate

if TYPE_CHECKING:
    import sqlite3

log = logging.getLogger("relayd")

WINDOW = 86400.0
DB_NAME = "daily_cap.sqlite3"
PRUNE_INTERVAL = 60.0  # seconds between deletions of the rows that left the window
# For this long after a shift, readings of the clock taken before the jump was noticed (on the
# event loop, then handed to a worker thread) may still arrive, days off.
FENCE = 60.0


def limited(limits: LimitsConfig, priority: bool) -> bool:
    """True when cap and rate apply to this message (not priority mail with priority_exempt)."""
    return not (priority and limits.priority_exempt)


class Cap(Protocol):
    """The daily cap as the delivery gate uses it: ``DailyCap`` below (this node's count in
    SQLite) or ``relayd.shared.cap.SharedDailyCap`` (the fleet's, in PostgreSQL; its
    ``acquire`` raises ``StateUnavailable`` while the database cannot be reached)."""

    cap: int

    def acquire(self, n: int, now: float) -> int: ...

    def settle(self, granted: int, delivered: int, now: float) -> None: ...

    def record(self, n: int, now: float) -> None: ...

    def next_free_at(self, now: float, n: int = 1) -> float | None: ...

    def remaining(self, now: float) -> int: ...

    def refresh(self, now: float) -> None:
        """Re-read the count where other processes change it (blocking; the fleet's)."""

    def shift(self, delta: float, now: float) -> None:
        """The wall clock jumped by ``delta`` seconds, noticed at ``now``: no I/O (the event
        loop calls it)."""

    def flush(self) -> None:
        """Write what ``shift`` changed (blocking: a worker thread)."""

    def close(self) -> None: ...


# How the gate gets its cap for a ``limits.daily_cap`` and a window (the assemblies choose).
CapFactory = Callable[[int, float], Cap]


def local_cap(state_dir: Path) -> CapFactory:
    """This node's own cap, counted in ``state_dir`` (the default, without shared_state)."""
    def make(cap: int, window: float) -> Cap:
        state_dir.mkdir(parents=True, exist_ok=True)
        return DailyCap(cap, state_dir, window=window)
    return make


@dataclass(frozen=True)
class CapStatistics:
    """A snapshot for metrics and ``explain``."""

    cap: int
    used: int
    in_flight: int
    remaining: int
    next_free_at: float | None


class DailyCap:
    """At most ``cap`` delivered recipients in any rolling ``window`` seconds.

    For concurrent deliveries use ``acquire(n, now)`` before sending (it grants up to ``n``
    recipients and holds them as in flight, so parallel connections cannot overshoot) and
    ``settle(granted, delivered, now)`` afterwards. ``record(n, now)`` is the simple form.
    Methods that write (``record``, ``settle``, ``flush``) touch SQLite: call them via
    ``asyncio.to_thread`` from the event loop. ``remaining``/``next_free_at``/``shift`` are in
    memory.
    """

    def __init__(self, cap: int, state_dir: Path | None, *, window: float = WINDOW,
                 readonly: bool = False, db_name: str = DB_NAME,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.cap = cap
        self.window = window
        self._events: deque[tuple[float, int]] = deque()
        self._used = 0  # sum of the events' counts, kept as they come and go (no re-summing)
        self._in_flight = 0
        self._lock = threading.Lock()
        self._monotonic = monotonic
        self._fence: tuple[float, float] | None = None  # (when the last shift was noticed, its tick)
        self._db: sqlite3.Connection | None = None
        self._rows: _Rows | None = None
        if state_dir is None:
            return
        import sqlite3  # lazy: only with limits.daily_cap (about 1.5 MB per process)

        path = state_dir / db_name
        if readonly:
            if path.exists():
                db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
                try:
                    self._load(db.execute("SELECT at, n FROM deliveries ORDER BY at").fetchall())
                except sqlite3.OperationalError:
                    pass
                finally:
                    db.close()
            return
        state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, timeout=5.0, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA busy_timeout = 5000")
            self._db.execute("CREATE TABLE IF NOT EXISTS deliveries (at REAL NOT NULL, n INTEGER NOT NULL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS deliveries_at ON deliveries (at)")
            self._load(self._db.execute("SELECT at, n FROM deliveries ORDER BY at").fetchall())
        except sqlite3.Error as exc:
            if self._db is not None:
                self._db.close()
            # SQLite's own text ("unable to open database file") does not say which file.
            raise sqlite3.OperationalError(f"{path}: {exc}") from exc
        self._rows = _Rows(self._db, window)

    def _load(self, rows: list[tuple[float, int]]) -> None:
        self._events.extend(rows)
        self._used = sum(n for _, n in rows)

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()
            self._rows = None
        if self._db is not None:
            self._db.close()
            self._db = None

    def _time(self, now: float) -> float:
        """Hold the lock. The time to count with: ``now``, except within FENCE of a shift,
        where a reading from before the jump would empty the window or stamp a delivery days
        off; then the time the jump was noticed plus the real time since."""
        if self._fence is None:
            return now
        noticed, tick = self._fence
        elapsed = self._monotonic() - tick
        if elapsed >= FENCE:
            self._fence = None
            return now
        return noticed + max(0.0, elapsed)

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window:
            self._used -= self._events.popleft()[1]

    def used(self, now: float) -> int:
        """Recipients delivered in the window ending at ``now``."""
        with self._lock:
            self._expire(self._time(now))
            return self._used

    def remaining(self, now: float) -> int:
        """How many more recipients may be delivered now (never negative)."""
        with self._lock:
            self._expire(self._time(now))
            return max(0, self.cap - self._used - self._in_flight)

    def next_free_at(self, now: float, n: int = 1) -> float | None:
        """When ``n`` recipients (at most the cap) may go: ``now`` if already, else the time
        the oldest deliveries leave the window; None if only in-flight ones block it."""
        need = min(n, self.cap)
        with self._lock:
            t = self._time(now)
            self._expire(t)
            free = self.cap - self._used - self._in_flight
            if free >= need:
                return now
            for at, count in self._events:
                free += count
                if free >= need:
                    # As far from the caller's reading as from the time counted with.
                    return at + self.window if t == now else now + (at + self.window - t)
            return None

    def acquire(self, n: int, now: float) -> int:
        """Grant up to ``n`` recipients now (0 when the cap is reached); held until settle."""
        with self._lock:
            self._expire(self._time(now))
            free = max(0, self.cap - self._used - self._in_flight)
            granted = min(n, free)
            self._in_flight += granted
            return granted

    def settle(self, granted: int, delivered: int, now: float) -> None:
        """Release an ``acquire`` and count the ``delivered`` recipients (may exceed granted
        for exempt priority mail)."""
        self.record(delivered, now, released=granted)

    def record(self, n: int, now: float, *, released: int = 0) -> None:
        """Count ``n`` delivered recipients at ``now`` (persisted), releasing ``released``
        reserved ones in the same step: between two steps, another delivery would see the
        room of a reservation whose recipients are not counted yet, and overshoot the cap."""
        with self._lock:
            self._in_flight = max(0, self._in_flight - released)
            if n <= 0:
                return
            at = self._time(now)
            self._events.append((at, n))
            self._used += n
            # Queued under the lock, so the row is in the file's order of rows and shifts.
            ticket = self._rows.submit((at, n)) if self._rows is not None else 0
        if self._rows is not None:
            # Outside the lock: acquire() and remaining() must not wait for the disk.
            self._rows.wait(ticket)

    def shift(self, delta: float, now: float) -> None:
        """The wall clock jumped by ``delta`` seconds (noticed at ``now``, a reading after the
        jump): every stamp moves with it, so deliveries leave the window after the real 24 h.
        In memory only (the event loop calls this); the file's rows move with its next commit
        or ``flush``, in order with the rows queued before and after."""
        with self._lock:
            self._events = deque((at + delta, count) for at, count in self._events)
            self._fence = (now, self._monotonic())
            if self._rows is not None:
                self._rows.submit(_Shift(delta))

    def flush(self) -> None:
        """Commit what ``shift`` queued (blocking: a worker thread)."""
        if self._rows is not None:
            self._rows.flush()

    def refresh(self, now: float) -> None:
        """Nothing to re-read: this node's count is in memory."""

    def statistics(self, now: float) -> CapStatistics:
        return CapStatistics(cap=self.cap, used=self.used(now), in_flight=self._in_flight,
                             remaining=self.remaining(now), next_free_at=self.next_free_at(now))


@dataclass(frozen=True, slots=True)
class _Shift:
    """Every row of the cap file moves by ``delta`` seconds (a wall-clock jump)."""

    delta: float


_Op = tuple[float, int] | _Shift   # a delivery's row (at, n), or a shift of all rows


class _Rows:
    """The cap file's writes: each caller's row is committed before ``wait`` returns, and
    the rows of callers that arrive while a commit is under way go in the next one together
    (one fsync for all of them; before, every delivery had its own under the cap's lock,
    which held up the reservations of all other deliveries: docs/performance.md). Rows and
    shifts are committed in the order ``submit`` got them."""

    def __init__(self, db: sqlite3.Connection, window: float) -> None:
        self._db = db
        self._window = window
        self._cv = threading.Condition()
        self._pending: list[_Op] = []
        self._queued = 0      # ops handed to submit() so far
        self._durable = 0     # ops committed (or failed) so far
        self._errors: list[tuple[int, int, Exception]] = []  # (first, last, error) of failed commits
        self._writing = False
        self._prune_at = 0.0  # when the rows that left the window are deleted next

    def submit(self, op: _Op) -> int:
        """Queue ``op`` behind the ones before it (no I/O); its ticket for ``wait``."""
        with self._cv:
            self._pending.append(op)
            self._queued += 1
            return self._queued

    def flush(self) -> None:
        """Commit everything submitted so far (nothing to do when it is)."""
        with self._cv:
            if self._durable == self._queued:
                return
            ticket = self._queued
        self.wait(ticket)

    def wait(self, mine: int) -> None:
        """Return once the op of ticket ``mine`` is committed, committing the queue if no one
        else is; raises what its commit raised (sqlite3.Error, OSError)."""
        with self._cv:
            while self._durable < mine:
                if self._writing:
                    self._cv.wait()
                    continue
                rows, self._pending = self._pending, []
                first, last = self._durable + 1, self._queued
                self._writing = True
                self._cv.release()
                error: Exception | None = None
                try:
                    self._commit(rows)
                except Exception as exc:  # each waiting caller of this batch gets it
                    error = exc
                finally:
                    self._cv.acquire()
                    self._writing = False
                    self._durable = last
                    if error is not None:
                        self._errors = [*self._errors[-15:], (first, last, error)]
                    self._cv.notify_all()
            for first, last, error in self._errors:
                if first <= mine <= last:
                    raise error

    def _commit(self, ops: list[_Op]) -> None:
        db = self._db
        prune_at = self._prune_at
        db.execute("BEGIN")
        try:
            rows: list[tuple[float, int]] = []
            for op in ops:
                if isinstance(op, _Shift):
                    db.executemany("INSERT INTO deliveries (at, n) VALUES (?, ?)", rows)
                    db.execute("UPDATE deliveries SET at = at + ?", (op.delta,))
                    prune_at += op.delta
                    rows = []   # those before the shift moved with it
                else:
                    rows.append(op)
            db.executemany("INSERT INTO deliveries (at, n) VALUES (?, ?)", rows)
            latest = max((at for at, _ in rows), default=None)
            # Rows that left the window only cost disk: deleted once a minute, not with every
            # delivery (the window's count is in memory).
            if latest is not None and latest >= prune_at:
                prune_at = latest + PRUNE_INTERVAL
                db.execute("DELETE FROM deliveries WHERE at <= ?", (latest - self._window,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._prune_at = prune_at

    def close(self) -> None:
        """Commit what is queued (a shift that no delivery wrote yet) and wait for a commit
        under way (the connection is closed next)."""
        try:
            self.flush()
        except Exception as exc:  # its writer, if any, was told; the connection closes anyway
            log.error("daily cap: the last write before closing failed: %s", exc)


class Pacer(Protocol):
    """``limits.rate`` as the delivery gate uses it: ``RateLimiter`` below (this node's token
    bucket) or ``relayd.shared.rate.SharedRate`` (the fleet's, in PostgreSQL; its ``wait``
    raises ``StateUnavailable`` while the database cannot be reached)."""

    async def wait(self, n: int = 1) -> None: ...


# How the gate gets its pacer for a ``limits.rate`` (the assemblies choose).
PacerFactory = Callable[[Rate], Pacer]


class RateLimiter:
    """Token bucket: ``rate.per_second`` tokens a second, burst of one second's worth (SPEC).

    ``reserve(n)`` takes ``n`` tokens at once (going into debt) and returns how long the
    caller must wait before sending; concurrent callers queue up in call order.
    """

    def __init__(self, rate: Rate, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.per_second = rate.per_second
        self.burst = max(1.0, rate.per_second)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last: float | None = None

    def reserve(self, n: int = 1, now: float | None = None) -> float:
        """Take ``n`` tokens; returns the delay in seconds before they are really available."""
        t = self._clock() if now is None else now
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (t - self._last) * self.per_second)
        self._last = t
        self._tokens -= n
        return max(0.0, -self._tokens / self.per_second)

    async def wait(self, n: int = 1) -> None:
        """Wait until ``n`` deliveries may start."""
        delay = self.reserve(n)
        if delay > 0:
            await self._sleep(delay)
