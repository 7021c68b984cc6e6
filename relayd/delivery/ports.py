"""What the queue manager needs from the rest of relayd, as protocols: a smarthost's connection
pool (relayd/delivery/smtp/pool.py) and the delivery gate (relayd/delivery/gate.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from relayd.model import DeliveryResult, Reply
from relayd.spool.records import Entry


class Pool(Protocol):
    """One smarthost's connection pool (relayd.delivery.smtp.pool.SmarthostPool)."""

    async def deliver(self, queue_id: str, content: bytes, mail_from: str, rcpts: Sequence[str],
                      *, smtputf8: bool = False) -> DeliveryResult: ...

    def retry_now(self) -> None:
        """The operator asked for delivery now: drop any wait of the pool's own."""

    async def aclose(self) -> None: ...


class Gate(Protocol):
    """Delivery-time policy: suppression recheck, daily cap and rate (relayd.policy glue)."""

    def recheck(self, entry: Entry, rcpts: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(still allowed, now suppressed) among ``rcpts``."""

    def hold_for(self, entry: Entry, count: int, now: float) -> float:
        """Seconds this message must wait for the daily cap (0: may go now); raises
        StateUnavailable when a shared cap cannot be asked."""

    def hold_reason(self, entry: Entry) -> str | None:
        """What the last wait of ``hold_for`` is for when not the daily cap (a user's limit)."""

    async def wait_rate(self, entry: Entry, count: int) -> None:
        """Pace deliveries to ``limits.rate``; raises StateUnavailable when the fleet's rate
        cannot be asked."""

    def delivered(self, entry: Entry, count: int, now: float) -> None:
        """Count delivered recipients against the cap (called after every gated attempt)."""

    def counts_deliveries(self) -> bool:
        """False when delivered() has nothing to record (no daily cap): no thread hop then."""

    def hard_bounce(self, rcpt: str, reply: Reply) -> None:
        """A 5.1.x-class failure (for do_not_email.auto_add: hard_bounce)."""
