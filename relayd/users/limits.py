"""Per-user limits at delivery: a user's ``daily_cap`` and ``rate`` (from the users file).

They protect the smarthost account from one runaway job (a cron loop sending 50,000 mails):
mail over a user's limit is accepted and waits in the spool like mail over ``limits.daily_cap``,
never bounced. The cap counts delivered recipients in a rolling window and persists in
``state_dir/users/NAME/daily_cap.sqlite3`` (relayd.delivery.limits.DailyCap); the rate is a
token bucket that answers how long to wait instead of sleeping, so waiting mail does not hold
a delivery slot. ``user_limit_reached`` fires at 90 % and at 100 % of a cap, and at a rate wait.
Called from worker threads (the gate's checks run off the loop), except ``shift``. Both read the
wall clock the queue manager hands them: a jump shifts the caps' stamps (``shift``), and the
bucket never counts a clock set back as negative time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from relayd.delivery.limits import DailyCap
from relayd.errors import ConfigError
from relayd.units import Rate
from relayd.users.store import User, UsersFile

log = logging.getLogger("relayd.policy")

# A waiting message is looked at again at least this often, so that a cap raised in the users
# file (or a user removed) applies within minutes, not when the old window ends.
MAX_WAIT = 300.0
WARN_AT = 0.9

Alert = Callable[[str, str, str], None]


class _Bucket:
    """A token bucket with a burst of one second's worth (as ``limits.rate``, SPEC)."""

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self.burst = max(1.0, rate.per_second)
        self.tokens = self.burst
        self.last: float | None = None

    def take(self, n: int, now: float) -> float:
        """0 and the tokens taken, or the seconds until ``n`` (at most a burst) are there."""
        if self.last is not None:
            # Never less than 0: a clock set back by days would leave the bucket that deep in debt.
            elapsed = max(0.0, now - self.last)
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate.per_second)
        self.last = now
        need = min(float(n), self.burst)
        if self.tokens >= need:
            self.tokens -= n  # a message to many recipients may go into debt, as limits.rate
            return 0.0
        return (need - self.tokens) / self.rate.per_second


class UserLimits:
    """The users' caps and rates; ``hold`` before an attempt, ``delivered`` after it."""

    def __init__(self, users_file: Path, state_dir: Path, *, window: float,
                 alert: Alert | None = None) -> None:
        self.users = UsersFile(users_file)
        self._state_dir = state_dir
        self._window = window
        self._alert = alert
        self._lock = threading.Lock()
        self._caps: dict[str, DailyCap] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._grants: dict[str, tuple[str, int]] = {}  # queue ID -> (user, recipients granted)

    def _refresh(self) -> None:
        try:
            self.users.refresh()
        except ConfigError as exc:
            log.error("users_file %s not re-read, the users before stay in force: %s",
                      self.users.path, "; ".join(str(p) for p in exc.problems))

    def _cap(self, user: User) -> DailyCap | None:
        if user.daily_cap is None:
            return None
        cap = self._caps.get(user.name)
        if cap is None or cap.cap != user.daily_cap:
            if cap is not None:
                cap.close()
            cap = DailyCap(user.daily_cap, self._state_dir / "users" / user.name,
                           window=self._window)
            self._caps[user.name] = cap
        return cap

    def _bucket(self, user: User) -> _Bucket | None:
        if user.rate is None:
            self._buckets.pop(user.name, None)
            return None
        bucket = self._buckets.get(user.name)
        if bucket is None or bucket.rate != user.rate:
            bucket = self._buckets[user.name] = _Bucket(user.rate)
        return bucket

    def hold(self, queue_id: str, name: str, count: int, now: float) -> tuple[float, str]:
        """(0, "") when the message may go now (its recipients reserved against the user's
        cap), else (seconds to wait, what it waits for: the text of `queue list`'s
        last_error)."""
        self._refresh()
        user = self.users.get(name)
        if user is None or count <= 0:
            return 0.0, ""  # a removed user's waiting mail is not held forever
        with self._lock:
            cap = self._cap(user)
            granted = 0
            if cap is not None:
                need = min(count, cap.cap)
                granted = cap.acquire(need, now)
                if granted < need:
                    cap.settle(granted, 0, now)
                    self._fire(user, "100%", f"user {user.name} reached its daily_cap of "
                               f"{cap.cap}: its mail waits in the queue")
                    free_at = cap.next_free_at(now, count)
                    wait = (free_at - now) if free_at is not None else 5.0
                    return _bounded(wait), f"waiting for the daily_cap of user {user.name}"
            bucket = self._bucket(user)
            wait = bucket.take(count, now) if bucket is not None else 0.0
            if wait > 0:
                if cap is not None:
                    cap.settle(granted, 0, now)
                self._fire(user, "rate", f"user {user.name} is over its rate of "
                           f"{user.rate}: its mail waits in the queue")
                return _bounded(wait), f"waiting for the rate of user {user.name}"
            if cap is not None:
                self._grants[queue_id] = (user.name, granted)
                if cap.cap - cap.remaining(now) >= WARN_AT * cap.cap:
                    self._fire(user, "90%", f"user {user.name} used 90 % of its daily_cap of "
                               f"{cap.cap}")
        return 0.0, ""

    def delivered(self, queue_id: str, count: int, now: float) -> None:
        """Count the delivered recipients of a message ``hold`` let go (SQLite: a worker thread)."""
        with self._lock:
            name, granted = self._grants.pop(queue_id, ("", 0))
            cap = self._caps.get(name)
        if cap is not None:
            cap.settle(granted, count, now)

    def shift(self, delta: float, now: float) -> None:
        """The wall clock jumped: the users' caps count real time (in memory; ``flush`` writes)."""
        with self._lock:
            for cap in self._caps.values():
                cap.shift(delta, now)

    def flush(self) -> None:
        """Worker thread: write what ``shift`` moved to the caps' files."""
        with self._lock:
            caps = list(self._caps.values())
        for cap in caps:
            cap.flush()

    def _fire(self, user: User, level: str, message: str) -> None:
        if self._alert is not None:
            self._alert("user_limit_reached", f"{user.name} {level}", message)

    def close(self) -> None:
        with self._lock:
            for cap in self._caps.values():
                cap.close()
            self._caps.clear()


def _bounded(wait: float) -> float:
    return min(MAX_WAIT, max(1.0, wait))
