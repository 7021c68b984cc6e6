"""Retry arithmetic, pure: when to try a message or a paused smarthost again, and expiry.

Exponential backoff from ``spool.retry.initial`` doubling up to ``spool.retry.max_interval``,
with +-25% jitter so that a backlog released at once does not retry in lock-step.
"""

from __future__ import annotations

import random

from relayd.config.schema import RetryConfig

JITTER = 0.25


def backoff_delay(failures: int, retry: RetryConfig, rng: random.Random | None = None) -> float:
    """Delay before the next try after ``failures`` consecutive failures (>= 1)."""
    n = max(1, failures)
    base: float = min(retry.max_interval, retry.initial * (2 ** min(n - 1, 60)))
    r: float = rng.random() if rng is not None else random.random()
    delay = base * (1 - JITTER + 2 * JITTER * r)
    return max(retry.initial * (1 - JITTER), min(retry.max_interval, delay))


def is_expired(age_base: float, now: float, max_age: float) -> bool:
    """A message older than ``spool.max_age`` (counted from acceptance or the last
    operator retry) is failed instead of tried again."""
    return now - age_base >= max_age
