"""Retry arithmetic: exponential, jittered, bounded, and expiry."""

from __future__ import annotations

import random

import pytest

from relayd.config.schema import RetryConfig
from relayd.delivery.backoff import backoff_delay, is_expired

RETRY = RetryConfig(initial=60, max_interval=3600)


@pytest.mark.parametrize(("failures", "base"), [(1, 60), (2, 120), (3, 240), (6, 1920), (7, 3600), (50, 3600)])
def test_backoff_doubles_within_bounds(failures: int, base: float) -> None:
    rng = random.Random(1)
    for _ in range(50):
        d = backoff_delay(failures, RETRY, rng)
        assert 0.75 * base <= d <= min(1.25 * base, 3600)
        assert 45 <= d <= 3600


def test_backoff_is_jittered() -> None:
    rng = random.Random(2)
    assert len({round(backoff_delay(3, RETRY, rng), 3) for _ in range(20)}) > 10


def test_expiry_counts_from_age_base() -> None:
    assert not is_expired(1000, 1000 + 4 * 86400 - 1, 4 * 86400)
    assert is_expired(1000, 1000 + 4 * 86400, 4 * 86400)
