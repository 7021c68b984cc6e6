"""The shared state as the assemblies use it: one connection per process, the fleet's
do-not-email list, daily cap, rate, alerts and OAuth token copies over it, and its health
for the metric and the alert.

It has the shape of ``relayd.daemon.state.StateBackend``; ``LocalState`` there is the
embedded (SQLite) one.
"""

from __future__ import annotations

from pathlib import Path

from relayd.config.schema import SharedStateConfig
from relayd.shared.alerts import FleetAlerts
from relayd.shared.cap import SharedDailyCap
from relayd.shared.db import SharedDB
from relayd.shared.oauth import SharedOAuth
from relayd.shared.rate import SharedRate
from relayd.shared.suppressions import SharedSuppressions
from relayd.units import Rate


class SharedState:
    """The fleet's state in PostgreSQL, for one process of one node."""

    def __init__(self, cfg: SharedStateConfig, state_dir: Path) -> None:
        self.db = SharedDB(cfg)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.store = SharedSuppressions(self.db, cache_dir=state_dir)
        self._cap: SharedDailyCap | None = None
        self._oauth = SharedOAuth(self.db)
        self._rate: SharedRate | None = None
        self._alerts = FleetAlerts(self.db)

    def daily_cap(self, cap: int, window: float) -> SharedDailyCap:
        """One cap object per process whatever reloads change: it holds this node's pending
        settles, which must survive a new ``limits.daily_cap``."""
        if self._cap is None:
            self._cap = SharedDailyCap(self.db, cap, window=window)
        self._cap.cap, self._cap.window = cap, window
        return self._cap

    def rate(self, rate: Rate) -> SharedRate:
        """One pacer per process (the slots it holds stay valid across a reload)."""
        if self._rate is None:
            self._rate = SharedRate(self.db, rate)
        else:
            self._rate.update(rate)
        return self._rate

    def alert_fleet(self) -> FleetAlerts:
        return self._alerts

    def health(self) -> tuple[bool, str] | None:
        return self.db.up, self.db.problem

    def oauth_copies(self) -> SharedOAuth:
        return self._oauth

    def close(self) -> None:
        self.store.close()
        if self._cap is not None:
            self._cap.close()
        self.db.close()
