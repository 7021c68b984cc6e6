"""Shared pytest fixtures. They are thin: the classes live in tests/support/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.clock import FakeClock  # after the sys.path entry above


@pytest.fixture
def clock() -> FakeClock:
    """A fake ``time.time`` at a fixed instant; the test moves it with ``advance``."""
    return FakeClock()
