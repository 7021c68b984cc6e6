"""Where a node keeps what is not its spool: the do-not-email list, the daily cap's count,
the rate's pace, who sends an alert and (in a fleet) the OAuth token cache's shared copy.

``build_state`` chooses once, from the config, for the assemblies: the embedded SQLite files
under ``state_dir`` (``LocalState``, a single relay) or the fleet's PostgreSQL database
(``relayd.shared.backend.SharedState``, with ``shared_state``). Nothing else asks which.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from relayd.config.schema import Config
from relayd.control.alerts import Fleet
from relayd.delivery.limits import Cap, Pacer, RateLimiter, local_cap
from relayd.policy.suppressions import SuppressionList, SuppressionStore
from relayd.units import Rate

if TYPE_CHECKING:  # only the type: the store loads cryptography, which this process may not need
    from relayd.oauth.store import SharedCopies


class StateBackend(Protocol):
    @property
    def store(self) -> SuppressionList:
        """The do-not-email list."""

    def daily_cap(self, cap: int, window: float) -> Cap:
        """The count behind ``limits.daily_cap`` (the gate's cap factory)."""

    def rate(self, rate: Rate) -> Pacer:
        """The pace behind ``limits.rate`` (the gate's pacer factory)."""

    def alert_fleet(self) -> Fleet | None:
        """None without shared state; else who of the fleet sends an alert."""

    def health(self) -> tuple[bool, str] | None:
        """None without shared state; else (reachable, why not)."""

    def oauth_copies(self) -> SharedCopies | None:
        """The fleet's copy of the OAuth token cache; None for a single relay."""

    def close(self) -> None: ...


class LocalState:
    """The embedded default: SQLite under ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.store: SuppressionStore = SuppressionStore(state_dir)
        self._cap = local_cap(state_dir)

    def daily_cap(self, cap: int, window: float) -> Cap:
        return self._cap(cap, window)

    def rate(self, rate: Rate) -> Pacer:
        return RateLimiter(rate)

    def alert_fleet(self) -> Fleet | None:
        return None

    def health(self) -> tuple[bool, str] | None:
        return None

    def oauth_copies(self) -> SharedCopies | None:
        return None

    def close(self) -> None:
        self.store.close()


def build_state(config: Config) -> StateBackend:
    if config.shared_state is None:
        return LocalState(config.state_dir)
    # lazy: psycopg (and libpq) only for a relay in a fleet (test_command_imports.py checks)
    from relayd.shared.backend import SharedState

    return SharedState(config.shared_state, config.state_dir)
