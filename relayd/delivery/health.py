"""Smarthost health: which smarthosts are paused, until when, and why.

The queue manager reports every attempt's result here. A failure that concerns the server
or the account (refused or dropped connection, timeout, TLS, authentication, 421, quota)
pauses the smarthost at once with the spool's backoff, so queued mail waits instead of
meeting the same fault one message at a time. A temporary reply about one message does
not; only ``BREAKER_MESSAGES`` different messages in a row deferred by the same smarthost,
with no delivery in between, show that the server is the problem (a circuit breaker).
`relayd queue retry` lifts the pauses, as `postqueue -f` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from relayd.config.schema import RetryConfig, Smarthost
from relayd.control.metrics import Recorder
from relayd.delivery.backoff import backoff_delay
from relayd.model import DeliveryResult

log = logging.getLogger("relayd.qmgr")

# This many different messages in a row deferred by one smarthost's replies, with no delivery
# in between, show that the server rather than the messages is the problem: pause it.
BREAKER_MESSAGES = 5


class Alerter(Protocol):
    def fire(self, event: str, key: str, message: str) -> None: ...

    def clear(self, event: str, key: str, message: str) -> None: ...


@dataclass
class SmarthostState:
    """Health of one smarthost: paused until a time after consecutive whole-host failures."""

    failures: int = 0
    paused_until: float = 0.0
    last_error: str = ""
    up: bool = True
    # A smarthost_down / auth_failed alert fired for this pause and not yet cleared.
    alerted: bool = False
    # Messages deferred by this smarthost's replies since its last delivery (the breaker).
    deferred_messages: set[str] = field(default_factory=set)


class Health:
    """The health of every smarthost by name (one queue manager's view)."""

    def __init__(self, retry: RetryConfig, clock: Callable[[], float], *,
                 metrics: Recorder | None = None, alerts: Alerter | None = None) -> None:
        self.retry = retry
        self._clock = clock
        self._metrics = metrics
        self._alerts = alerts
        self._states: dict[str, SmarthostState] = {}

    def of(self, name: str) -> SmarthostState:
        return self._states.setdefault(name, SmarthostState())

    def forget(self, name: str) -> None:
        """New settings for ``name`` (a reload): try it again now, from a clean slate."""
        self._states.pop(name, None)

    def paused(self, now: float) -> tuple[str, ...]:
        return tuple(n for n, h in self._states.items() if h.paused_until > now)

    def available_at(self, names: Iterable[str], now: float) -> float:
        """When at least one of ``names`` is not paused (``now`` if one is available)."""
        soonest = min((self.of(n).paused_until for n in names), default=now)
        return max(now, soonest)

    def shift(self, jump: float) -> None:
        """The wall clock jumped: pauses keep their real length."""
        for h in self._states.values():
            if h.paused_until:
                h.paused_until += jump

    def lift(self, smarthosts: Iterable[Smarthost]) -> None:
        """`relayd queue retry`: the paused smarthosts are tried again now."""
        now = self._clock()
        for sh in smarthosts:
            h = self._states.get(sh.name)
            if h is None:
                continue
            h.deferred_messages.clear()
            if h.paused_until > now:
                log.info("smarthost %s: pause lifted by 'relayd queue retry'", sh.relay)
                h.paused_until = 0.0
                if self._metrics:
                    self._metrics.set_smarthost(sh.name, up=h.up, paused=False)

    def note(self, sh: Smarthost, result: DeliveryResult, queue_id: str) -> None:
        """Record one attempt's result for ``queue_id`` on ``sh``."""
        h = self.of(sh.name)
        error = result.error or (str(result.outcomes[0].reply) if result.outcomes else "")
        if not result.smarthost_fault:
            sent = bool(result.delivered)
            if sent or not result.deferred:
                self._up(sh, h, sent=sent)
                return
            # A temporary reply about this message. Only several different messages in a row
            # make it the server's problem (one message deferred again and again never does).
            h.deferred_messages.add(queue_id)
            if len(h.deferred_messages) < BREAKER_MESSAGES:
                self._up(sh, h, sent=False)
                return
            error = (f"{len(h.deferred_messages)} different messages in a row deferred, "
                     f"the last with: {error}")
        elif h.paused_until > self._clock():
            # An attempt that began before the pause met the same fault: one outage, one
            # pause (otherwise each of the concurrent attempts doubled it again).
            return
        self._pause(sh, h, error)

    def pause_for(self, sh: Smarthost, seconds: float, error: str) -> None:
        """A reply rule (``pause_smarthost``) says how long the provider wants: that long,
        not the backoff."""
        h = self.of(sh.name)
        now = self._clock()
        if h.paused_until >= now + seconds:
            return
        h.deferred_messages.clear()
        h.up, h.last_error = False, error
        h.paused_until = now + seconds
        log.warning("smarthost %s paused for %.0fs by a reply rule: %s", sh.relay, seconds, error)
        # A provider that says "stop" (a daily quota, a suspended account, SendAs denied)
        # holds all mail for this smarthost: the operator is told, not only the log.
        if self._alerts:
            h.alerted = True
            self._alerts.fire("smarthost_down", sh.name,
                              f"smarthost {sh.relay} paused for {seconds:.0f}s by {error}")
        if self._metrics:
            self._metrics.set_smarthost(sh.name, up=False, paused=True)

    def _pause(self, sh: Smarthost, h: SmarthostState, error: str) -> None:
        h.deferred_messages.clear()
        h.failures += 1
        h.up = False
        h.last_error = error
        now = self._clock()
        h.paused_until = now + backoff_delay(h.failures, self.retry)
        log.warning("smarthost %s paused for %.0fs after %d failure(s): %s", sh.relay,
                    h.paused_until - now, h.failures, h.last_error)
        if self._alerts:
            h.alerted = True
            event = "auth_failed" if "auth" in error.lower() else "smarthost_down"
            self._alerts.fire(event, sh.name, f"smarthost {sh.relay}: {error}")
        if self._metrics:
            self._metrics.set_smarthost(sh.name, up=False, paused=True)

    def _up(self, sh: Smarthost, h: SmarthostState, *, sent: bool) -> None:
        """The smarthost answered the transaction: it delivered, or refused the message."""
        if sent:
            h.deferred_messages.clear()
        if h.alerted and self._alerts:
            h.alerted = False
            self._alerts.clear("smarthost_down", sh.name, f"smarthost {sh.relay} is reachable again")
            self._alerts.clear("auth_failed", sh.name, f"smarthost {sh.relay} accepts the login again")
        h.failures = 0
        h.up = True
        h.paused_until = 0.0
        if self._metrics:
            self._metrics.set_smarthost(sh.name, up=True, paused=False)
