"""Per-smarthost limits: each provider account's own ``daily_cap`` and ``rate``
(``smarthosts[].daily_cap`` / ``rate``), and the slow-downs that reply rules impose.

They come on top of the global ``limits`` (relayd/delivery/gate.py): the global ones are the
site's budget, these the provider account's quota. A smarthost at its cap is skipped
(``on_cap: next``) or makes the message wait (``on_cap: wait``); the queue manager decides,
this module only answers. The caps persist like the global one, one SQLite file per
smarthost under ``state_dir``; their writes (``settle``) belong in a worker thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from relayd.config.schema import ReplyAction, Smarthost
from relayd.delivery.health import Health
from relayd.delivery.limits import WINDOW, DailyCap, RateLimiter
from relayd.delivery.records import Tally
from relayd.routing.rules import Verdict
from relayd.units import Rate

log = logging.getLogger("relayd.qmgr")

# A wait for the rate longer than this gives the delivery slot back: the message is due again
# when its turn comes, instead of holding a slot (and a connection) while it sleeps.
MAX_RATE_SLEEP = 1.0
SLOWEST = Rate(1.0, 60.0)  # a slow-down never goes below one message a minute


@dataclass(frozen=True, slots=True)
class Grant:
    """A reservation of ``count`` recipients on one smarthost's cap (0: none needed), or the
    time its cap frees up (``free_at``) when it is at its cap."""

    count: int
    free_at: float | None = None

    @property
    def at_cap(self) -> bool:
        return self.free_at is not None


class _Slowed:
    def __init__(self, limiter: RateLimiter, until: float, rate: Rate) -> None:
        self.limiter = limiter
        self.until = until
        self.rate = rate


class HostLimits:
    """The smarthosts' own caps and rates, rebuilt on reload (``apply``)."""

    def __init__(self, state_dir: Path | None, clock: Callable[[], float], *,
                 cap_window: float = WINDOW) -> None:
        self._state_dir = state_dir
        self._clock = clock
        self._window = cap_window
        self._caps: dict[str, DailyCap] = {}
        self._rates: dict[str, RateLimiter] = {}
        self._configured: dict[str, Smarthost] = {}
        self._slowed: dict[str, _Slowed] = {}
        self._lock = threading.Lock()

    def apply(self, smarthosts: Sequence[Smarthost]) -> None:
        """Caps and rates from the (reloaded) smarthost settings; a changed cap keeps its
        count (the provider's window does not restart with our config)."""
        keep = {s.name: s for s in smarthosts if s.daily_cap is not None or s.rate is not None}
        for name in list(self._caps):
            sh = keep.get(name)
            if sh is None or sh.daily_cap is None or self._caps[name].cap != sh.daily_cap:
                self._caps.pop(name).close()
        for name, sh in keep.items():
            if sh.daily_cap is not None and name not in self._caps:
                if self._state_dir is not None:
                    self._state_dir.mkdir(parents=True, exist_ok=True)
                self._caps[name] = DailyCap(sh.daily_cap, self._state_dir, window=self._window,
                                            db_name=f"daily_cap.{name}.sqlite3")
            if sh.rate is None:
                self._rates.pop(name, None)
            elif self._configured.get(name) is None or self._configured[name].rate != sh.rate:
                self._rates[name] = RateLimiter(sh.rate)
        for name in set(self._rates) - set(keep):
            self._rates.pop(name)
        self._configured = keep

    def close(self) -> None:
        for cap in self._caps.values():
            cap.close()
        self._caps.clear()

    def shift(self, delta: float, now: float) -> None:
        """The wall clock jumped (relayd/delivery/qmgr.py): the caps' stamps and the slow-downs'
        ends move with it, so both keep their real length. No I/O: ``flush`` writes the caps."""
        for cap in self._caps.values():
            cap.shift(delta, now)
        with self._lock:
            for slowed in self._slowed.values():
                slowed.until += delta

    def flush(self) -> None:
        """Worker thread: write what ``shift`` moved to the caps' files."""
        for cap in list(self._caps.values()):
            cap.flush()

    def limits(self, name: str) -> bool:
        """Whether ``name`` has a cap, a rate or a slow-down at all (else: no work per send)."""
        return name in self._caps or name in self._rates or name in self._slowed

    # -- daily cap -----------------------------------------------------------------------------
    def reserve(self, name: str, count: int, now: float) -> Grant:
        """Reserve ``count`` recipients on ``name``'s cap (all or none)."""
        cap = self._caps.get(name)
        if cap is None or count <= 0:
            return Grant(0)
        need = min(count, cap.cap)
        granted = cap.acquire(need, now)
        if granted >= need:
            return Grant(granted)
        cap.settle(granted, 0, now)
        free_at = cap.next_free_at(now, count)
        return Grant(0, max(now + 1.0, free_at if free_at is not None else now + 5.0))

    def settle(self, name: str, granted: int, delivered: int, now: float) -> None:
        """Count ``delivered`` recipients on ``name``'s cap (SQLite: a worker thread)."""
        cap = self._caps.get(name)
        if cap is not None:
            cap.settle(granted, delivered, now)

    def remaining(self, name: str, now: float) -> int | None:
        cap = self._caps.get(name)
        return None if cap is None else cap.remaining(now)

    # -- rate ------------------------------------------------------------------------------------
    def _limiter(self, name: str, now: float) -> RateLimiter | None:
        with self._lock:
            slowed = self._slowed.get(name)
            if slowed is not None and slowed.until <= now:
                del self._slowed[name]
                log.info("smarthost %s: back to its own rate after a slow-down", name)
                slowed = None
        return slowed.limiter if slowed is not None else self._rates.get(name)

    def rate_delay(self, name: str, count: int, now: float) -> float:
        """Take ``count`` sends from ``name``'s rate; the seconds to wait before sending."""
        limiter = self._limiter(name, now)
        return 0.0 if limiter is None else limiter.reserve(max(1, count))

    def refund(self, name: str, count: int, now: float) -> None:
        """Give back sends taken by ``rate_delay`` that will not happen now."""
        limiter = self._limiter(name, now)
        if limiter is not None:
            limiter.reserve(-max(1, count))

    def slow_down(self, sh: Smarthost, rate: Rate | None, duration: float, now: float) -> Rate:
        """A reply rule said the provider throttles ``sh``: use ``rate`` (default: half the
        current one, at most one a second) for ``duration`` seconds; the rate now in force."""
        current = self.current_rate(sh.name, now)
        if rate is None:
            per_second = min(1.0, (current.per_second if current is not None else 2.0) / 2)
            rate = Rate(per_second, 1.0)
        if rate.per_second < SLOWEST.per_second:
            rate = SLOWEST
        with self._lock:
            limiter = RateLimiter(rate)
            limiter.reserve(int(limiter.burst))  # start with an empty bucket: the provider said stop
            self._slowed[sh.name] = _Slowed(limiter, now + duration, rate)
        log.warning("smarthost %s slowed down to %g/s for %.0fs", sh.relay, rate.per_second,
                    duration)
        return rate

    def current_rate(self, name: str, now: float) -> Rate | None:
        """The rate in force for ``name`` (a slow-down's, or its own), for ``route test``."""
        with self._lock:
            slowed = self._slowed.get(name)
            if slowed is not None and slowed.until > now:
                return slowed.rate
        sh = self._configured.get(name)
        return sh.rate if sh is not None else None


@dataclass(frozen=True, slots=True)
class Wait:
    """A smarthost cannot take the message now (its cap, or far behind its rate): until
    when, and the sentence for ``last_error``."""

    until: float
    why: str


def host_gate(limits: HostLimits, sh: Smarthost, count: int, now: float) -> Wait | tuple[int, float]:
    """``sh``'s own cap and rate for ``count`` recipients: (recipients reserved on its cap,
    seconds to wait for its rate), or a ``Wait``. In memory only: no I/O."""
    grant = limits.reserve(sh.name, count, now)
    if grant.at_cap:
        assert grant.free_at is not None
        return Wait(grant.free_at, f"waiting for smarthost {sh.name}'s daily_cap to free up")
    delay = limits.rate_delay(sh.name, count, now)
    if delay > MAX_RATE_SLEEP:
        # Far behind its rate (a slow-down): give the slot back, due again at its turn.
        limits.refund(sh.name, count, now)
        if grant.count:
            limits.settle(sh.name, grant.count, 0, now)  # nothing delivered: no write
        return Wait(now + delay, f"waiting for smarthost {sh.name}'s rate")
    return grant.count, delay


def obey(ruled: Verdict, sh: Smarthost, tally: Tally, at: float, health: Health,
         limits: HostLimits | None, fallback_pause: float) -> Tally:
    """Carry out a reply rule's verdict on the smarthost; the tally with the message's wait."""
    rule = ruled.rule
    if ruled.action is ReplyAction.PAUSE_SMARTHOST:
        pause = ruled.delay or fallback_pause
        health.pause_for(sh, pause, f"reply rule {rule.name}: {tally.last_error}")
        return replace(tally, throttled=True)
    if ruled.action is ReplyAction.SLOW_DOWN:
        if limits is None:
            return tally
        rate = limits.slow_down(sh, rule.rate, rule.duration or 600.0, at)
        # Due again at its turn under the lower rate, or when the reply said.
        wait = ruled.said if ruled.said is not None else 1 / rate.per_second
        return replace(tally, throttled=True, wait_until=at + max(1.0, wait))
    if ruled.action is ReplyAction.DEFER and ruled.delay is not None:
        return replace(tally, wait_until=at + ruled.delay)
    return tally
