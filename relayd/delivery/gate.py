"""The delivery gate: what the queue manager asks before and after each attempt. The
do-not-email list is checked again (it changes while mail waits), the rolling 24 h
``daily_cap`` is reserved and settled, ``rate`` paces the sends, and a hard bounce may join
the list (``do_not_email.auto_add: [hard_bounce]``). With a ``users_file``, mail from an
authenticated submission user also waits for that user's own cap and rate
(relayd/users/limits.py). Rebuilt on reload.

It compiles the policy without DKIM keys: delivery never signs (acceptance did).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from relayd.config.schema import Config, LimitsConfig
from relayd.delivery.limits import (
    WINDOW,
    Cap,
    CapFactory,
    Pacer,
    PacerFactory,
    RateLimiter,
    limited,
    local_cap,
)
from relayd.delivery.outcomes import is_hard_bounce
from relayd.errors import StateUnavailable
from relayd.model import Envelope, Reply
from relayd.policy.pipeline import build_policy, recheck_at_delivery
from relayd.policy.records import Policy, PolicyContext
from relayd.policy.suppressions import SuppressionList
from relayd.spool.records import Entry

if TYPE_CHECKING:
    from relayd.users.limits import UserLimits

log = logging.getLogger("relayd.policy")


class LimitsUnavailable(Exception):
    """A reload's daily cap or users' limits could not be opened; the text names the key."""


@dataclass(frozen=True)
class Prepared:
    """What ``DeliveryGate.prepare`` opened for a config: its cap and users' limits."""

    cap: Cap | None
    users: UserLimits | None


class DeliveryGate:
    """The queue manager's ``Gate``: suppression recheck, daily cap and rate."""

    def __init__(self, cfg: Config, store: SuppressionList, *, cap_window: float = WINDOW,
                 alert: Callable[[str, str, str], None] | None = None,
                 cap_factory: CapFactory | None = None,
                 rate_factory: PacerFactory | None = None) -> None:
        self.store = store
        self._cap_window = cap_window  # 24 h; tests use a short window instead of waiting a day
        # The node's own count under state_dir, or the fleet's (the assembly decides).
        self._cap_factory = cap_factory or local_cap(cfg.state_dir)
        # The node's own token bucket, or the fleet's rate (the assembly decides).
        self._rate_factory: PacerFactory = rate_factory or RateLimiter
        self._cap: Cap | None = None
        self._retired: list[Cap] = []  # replaced by a reload, closed by close_retired()
        self._retired_users: list[UserLimits] = []
        self._grants: dict[str, int] = {}
        self._alert = alert
        self._users: UserLimits | None = None
        self._reasons: dict[str, str] = {}
        self.apply(cfg)

    def prepare(self, cfg: Config) -> Prepared:
        """Blocking (a worker thread on reload): the cap and the users' limits ``cfg`` asks
        for, the running ones where they stay the same. A new cap opens its SQLite file (or
        a fleet's database), the users' limits theirs."""
        cap: Cap | None = None
        if cfg.limits.daily_cap is not None:
            if self._cap is not None and self._cap.cap == cfg.limits.daily_cap:
                cap = self._cap
            else:
                try:
                    cap = self._cap_factory(cfg.limits.daily_cap, self._cap_window)
                except Exception as exc:
                    raise LimitsUnavailable(f"limits.daily_cap: {exc}") from exc
        users = self._users
        path = cfg.users_file
        if users is not None and (path is None or users.users.path != path):
            users = None
        if path is not None and users is None:
            # lazy: the users room only where submission users are configured.
            from relayd.users.limits import UserLimits

            try:
                users = UserLimits(path, cfg.state_dir, window=self._cap_window, alert=self._alert)
            except BaseException as exc:
                if cap is not None and cap is not self._cap:
                    cap.close()  # opened for this config, which will not be applied
                if isinstance(exc, Exception):
                    raise LimitsUnavailable(f"users_file {path}: {exc}") from exc
                raise
        return Prepared(cap, users)

    def running(self) -> Prepared:
        """The cap and users' limits in force now (kept by a reload that could not open new
        ones)."""
        return Prepared(self._cap, self._users)

    def apply(self, cfg: Config, prepared: Prepared | None = None) -> None:
        """(Re)build from a validated config: the list's rules, cap and rate settings, with
        the cap and users' limits ``prepare(cfg)`` made (made here when not given)."""
        made = self.prepare(cfg) if prepared is None else prepared
        self.auto_add = cfg.do_not_email.auto_add
        self.policy: Policy = build_policy(cfg, {})
        self.limits: LimitsConfig = cfg.limits
        if self._cap is not None and self._cap is not made.cap:
            # Closing writes its last counts (a fleet's: to the database): not here, where
            # a reload runs on the event loop, but in close_retired().
            self._retired.append(self._cap)
        self._cap = made.cap
        self.rate: Pacer | None = (self._rate_factory(cfg.limits.rate)
                                   if cfg.limits.rate is not None else None)
        if self._users is not None and self._users is not made.users:
            self._retired_users.append(self._users)
        self._users = made.users

    def close_retired(self) -> None:
        """Worker thread: close the caps and users' limits a reload replaced (blocking:
        their last writes)."""
        while self._retired:
            try:
                self._retired.pop().close()
            except Exception as exc:  # its counts stay where they were; the new cap goes on
                log.error("could not close the daily cap a reload replaced: %s", exc)
        while self._retired_users:
            try:
                self._retired_users.pop().close()
            except Exception as exc:
                log.error("could not close the users' limits a reload replaced: %s", exc)

    def close(self) -> None:
        """Worker thread (blocking, like close_retired)."""
        self.close_retired()
        if self._cap is not None:
            self._cap.close()
        if self._users is not None:
            self._users.close()

    def recheck(self, entry: Entry, rcpts: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        env: Envelope = replace(entry.envelope, rcpt_tos=rcpts)
        ctx = PolicyContext(now=0.0, suppressed=self.store.snapshot())
        return recheck_at_delivery(self.policy, env, ctx)

    def hold_for(self, entry: Entry, count: int, now: float) -> float:
        """0 when the message may go now (its recipients are reserved against the cap), else
        how long to wait. Mail over the cap waits in the spool; it is never bounced. Raises
        StateUnavailable when a shared cap cannot be asked (the message waits too)."""
        user = entry.envelope.user
        if self._users is not None and user and count > 0:
            # The user's own limits first: they apply to priority mail too (they are there
            # to stop that user's runaway job, whatever it marks as priority).
            wait, why = self._users.hold(entry.id, user, count, now)
            if wait > 0:
                self._reasons[entry.id] = why
                return wait
        wait = self._hold_daily_cap(entry, count, now)
        if wait > 0 and self._users is not None and user:
            self._users.delivered(entry.id, 0, now)  # give the user's reservation back
        return wait

    def hold_reason(self, entry: Entry) -> str | None:
        """What the wait ``hold_for`` just gave is for, when it is not ``limits.daily_cap``."""
        return self._reasons.pop(entry.id, None)

    def _hold_daily_cap(self, entry: Entry, count: int, now: float) -> float:
        cap = self._cap
        if cap is None or count <= 0:
            return 0.0
        if not limited(self.limits, entry.envelope.priority):
            return 0.0  # exempt priority mail still counts (record in delivered())
        granted = cap.acquire(min(count, cap.cap), now)
        if granted >= min(count, cap.cap):
            self._grants[entry.id] = granted
            return 0.0
        cap.settle(granted, 0, now)
        free_at = cap.next_free_at(now, count)
        return max(1.0, (free_at - now) if free_at is not None else 5.0)

    async def wait_rate(self, entry: Entry, count: int = 1) -> None:
        """Pace ``limits.rate``; StateUnavailable when the fleet's rate cannot be asked."""
        if self.rate is not None and limited(self.limits, entry.envelope.priority):
            await self.rate.wait(max(1, count))

    def counts_deliveries(self) -> bool:
        return self._cap is not None or self._users is not None

    def delivered(self, entry: Entry, count: int, now: float) -> None:
        if self._users is not None and entry.envelope.user:
            self._users.delivered(entry.id, count, now)
        cap = self._cap
        granted = self._grants.pop(entry.id, 0)
        if cap is None:
            return
        if granted:
            cap.settle(granted, count, now)
        elif count:
            cap.record(count, now)

    def hard_bounce(self, rcpt: str, reply: Reply) -> None:
        """``do_not_email.auto_add: [hard_bounce]``: a 5.1.x "no such user" joins the list."""
        if "hard_bounce" in self.auto_add and is_hard_bounce(reply):
            try:
                self.store.add([rcpt], "hard_bounce")
            except StateUnavailable as exc:
                # The fleet's list cannot be written now; the bounce itself is final anyway.
                log.warning("could not add <%s> to the do-not-email list after a hard bounce: %s",
                            rcpt, exc)
                return
            log.info("added <%s> to the do-not-email list after a hard bounce (%s)", rcpt, reply)

    def shift(self, delta: float, now: float) -> None:
        """The wall clock jumped by ``delta`` (noticed at ``now``): the daily cap and the users'
        caps keep counting real time. In memory, for the event loop; ``flush`` writes them."""
        if self._cap is not None:
            self._cap.shift(delta, now)
        if self._users is not None:
            self._users.shift(delta, now)

    def flush(self) -> None:
        """Worker thread: write what ``shift`` moved to the caps' files."""
        if self._cap is not None:
            self._cap.flush()
        if self._users is not None:
            self._users.flush()

    def refresh_cap(self, now: float) -> None:
        """Worker thread: re-read a shared cap's count for the gauge (kept as it was while
        the database cannot be reached)."""
        cap = self._cap
        if cap is not None:
            # While down: relayd_shared_state_up and the alert say so; the gauge keeps the last.
            with contextlib.suppress(StateUnavailable):
                cap.refresh(now)

    def cap_remaining(self, now: float) -> int | None:
        return None if self._cap is None else self._cap.remaining(now)
