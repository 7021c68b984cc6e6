"""The fake clock of the tests: a callable that returns ``now``, moved only by the test.

``FakeClock`` stands in for ``time.time`` wherever relayd takes a ``clock=`` argument;
``JumpingClock`` is the real wall clock plus an offset the test moves, for a daemon that must
keep running while an operator (or a broken NTP) sets the time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

START = 1_800_000_000.0   # 2027-01-15, a fixed "now" far from the epoch


@dataclass
class FakeClock:
    now: float = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class JumpingClock(FakeClock):
    """``time.time()`` shifted by ``now`` (0 at first): ``advance`` makes the wall clock jump."""

    def __init__(self) -> None:
        super().__init__(now=0.0)

    def __call__(self) -> float:
        return time.time() + self.now


__all__ = ["START", "FakeClock", "JumpingClock"]
