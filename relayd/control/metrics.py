"""Prometheus metrics: one ``Metrics`` object per daemon (its own registry, no globals).

Components call the recording methods of a ``Recorder``; the HTTP endpoint at
``metrics.listen`` renders the registry. Label values use the log's words and never carry
addresses (SPEC). The delivery process (relayd/daemon/child.py) records through a ``Recorder`` that
forwards to its parent and never loads prometheus_client (about 1.5 MB per process).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from relayd.model import State, Status

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge

AUTH_RESULTS = ("success", "failure", "locked_out", "malformed")


class Recorder:
    """What components record; this base records nothing (tests, and subclasses that
    send the recordings elsewhere)."""

    def declare_smarthosts(self, names: Iterable[str]) -> None:
        """Make every smarthost's series exist before its first delivery."""

    def message_received(self) -> None:
        """A message was accepted into the spool."""

    def delivery(self, smarthost: str, status: Status, seconds: float | None = None, *,
                 route: str | None = None) -> None:
        """One recipient attempt ended with ``status`` (``route``: with ``routes`` configured,
        the route it took)."""

    def suppressed(self, count: int = 1) -> None:
        """Recipients dropped because they are on the do-not-email list."""

    def set_queue(self, counts: Mapping[State, int], oldest_age: float) -> None:
        """The spool's counts by state and the oldest queued message's age."""

    def set_daily_cap_remaining(self, remaining: int | None) -> None:
        """Deliveries left under ``limits.daily_cap`` (None: no cap)."""

    def set_smarthost(self, name: str, *, up: bool, paused: bool) -> None:
        """Whether the smarthost was reached, and whether it is paused."""

    def set_token_expiry(self, smarthost: str, seconds: float) -> None:
        """Seconds until the smarthost's cached OAuth access token expires."""

    def declare_auth(self) -> None:
        """Make the AUTH series exist (only where ``submission`` listeners are configured)."""

    def auth(self, result: str) -> None:
        """One AUTH attempt on a submission listener: success, failure, locked_out or
        malformed."""

    def set_shared_state_up(self, up: bool) -> None:
        """With shared_state: whether the fleet's database answered this node last time."""

    def set_spool_writable(self, writable: bool) -> None:
        """Whether the last store into the spool succeeded (0 from a failed one until the
        next one succeeds)."""

    def set_node(self, node: str) -> None:
        """With shared_state: this node's name in the fleet (``relayd_node_info``)."""


class Metrics(Recorder):
    """The SPEC's metric names, registered in a private registry."""

    def __init__(self) -> None:
        # lazy: prometheus_client costs about 2 MB per process; without metrics.listen no
        # Metrics is built and neither process loads it (test_metrics_http.py checks)
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._received = Counter("relayd_messages_received", "Messages accepted into the spool",
                                 registry=r)
        self._deliveries = Counter("relayd_deliveries", "Recipient delivery attempts by outcome",
                                   ["smarthost", "status"], registry=r)
        self._queue = Gauge("relayd_queue_messages", "Messages in the spool by state", ["state"],
                            registry=r)
        self._oldest = Gauge("relayd_queue_oldest_age_seconds",
                             "Age of the oldest queued message", registry=r)
        self._delivery_seconds = Histogram("relayd_delivery_seconds",
                                           "Time from acceptance to delivery", registry=r,
                                           buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                                                    300, 3600, 86400))
        self._cap = Gauge("relayd_daily_cap_remaining",
                          "Deliveries left in the rolling 24 h window (-1: no cap)", registry=r)
        self._cap.set(-1)
        self._suppressed = Counter("relayd_suppressed", "Recipients not delivered because they "
                                   "are on the do-not-email list", registry=r)
        self._smarthost_up = Gauge("relayd_smarthost_up", "1 when the last attempt reached the "
                                   "smarthost", ["smarthost"], registry=r)
        self._smarthost_paused = Gauge("relayd_smarthost_paused", "1 while the smarthost is "
                                       "paused after a failure", ["smarthost"], registry=r)
        # Only with routes: relayd_deliveries_total keeps its two labels, so that existing
        # dashboards and alert rules keep their series.
        self._route_deliveries = Counter("relayd_route_deliveries", "Recipient delivery attempts "
                                         "by route and outcome", ["route", "smarthost", "status"],
                                         registry=r)
        self._token_expiry = Gauge("relayd_oauth_token_expiry_seconds",
                                   "Seconds until the cached access token expires",
                                   ["smarthost"], registry=r)
        self._spool_writable = Gauge("relayd_spool_writable", "0 from a failed store into the "
                                     "spool until the next store succeeds, else 1", registry=r)
        self._spool_writable.set(1)
        self._auth: Counter | None = None

        self._shared_up: Gauge | None = None
        self._node_info: Gauge | None = None

    def declare_smarthosts(self, names: Iterable[str]) -> None:
        """Create every smarthost's series at zero so dashboards and alerts see them before the
        first delivery (a missing series is not a zero)."""
        for name in names:
            for status in Status:
                self._deliveries.labels(smarthost=name, status=status.value)
            self._smarthost_up.labels(smarthost=name)
            self._smarthost_paused.labels(smarthost=name)

    def message_received(self) -> None:
        self._received.inc()

    def delivery(self, smarthost: str, status: Status, seconds: float | None = None, *,
                 route: str | None = None) -> None:
        self._deliveries.labels(smarthost=smarthost, status=status.value).inc()
        if route is not None:
            self._route_deliveries.labels(route=route, smarthost=smarthost,
                                          status=status.value).inc()
        if seconds is not None and status is Status.SENT:
            self._delivery_seconds.observe(seconds)

    def suppressed(self, count: int = 1) -> None:
        self._suppressed.inc(count)

    def set_queue(self, counts: Mapping[State, int], oldest_age: float) -> None:
        for state in (State.QUEUED, State.HELD, State.FAILED, State.ACTIVE):
            self._queue.labels(state=state.value).set(counts.get(state, 0))
        self._oldest.set(oldest_age)

    def set_daily_cap_remaining(self, remaining: int | None) -> None:
        self._cap.set(-1 if remaining is None else remaining)

    def set_smarthost(self, name: str, *, up: bool, paused: bool) -> None:
        self._smarthost_up.labels(smarthost=name).set(1 if up else 0)
        self._smarthost_paused.labels(smarthost=name).set(1 if paused else 0)

    def set_token_expiry(self, smarthost: str, seconds: float) -> None:
        self._token_expiry.labels(smarthost=smarthost).set(seconds)

    def declare_auth(self) -> None:
        from prometheus_client import Counter  # lazy: see __init__

        if self._auth is None:
            self._auth = Counter("relayd_auth", "AUTH attempts on the submission listeners by "
                                 "result", ["result"], registry=self.registry)
            for result in AUTH_RESULTS:
                self._auth.labels(result=result)

    def auth(self, result: str) -> None:
        if self._auth is not None:
            self._auth.labels(result=result).inc()

    def set_spool_writable(self, writable: bool) -> None:
        self._spool_writable.set(1 if writable else 0)

    def set_shared_state_up(self, up: bool) -> None:
        # Created on first use: the series exists only where shared_state is configured.
        if self._shared_up is None:
            from prometheus_client import Gauge  # lazy: see __init__

            self._shared_up = Gauge("relayd_shared_state_up", "1 when the fleet's shared "
                                    "state (PostgreSQL) answered this node", registry=self.registry)
        self._shared_up.set(1 if up else 0)

    def set_node(self, node: str) -> None:
        # Only in a fleet, and a series of its own: the node is not a label of the other
        # metrics (each node serves its own /metrics; Prometheus's instance label tells them
        # apart), so a join on this one shows the name.
        if self._node_info is None:
            from prometheus_client import Gauge  # lazy: see __init__

            self._node_info = Gauge("relayd_node_info", "This relay's shared_state.node name "
                                    "in the fleet (always 1)", ["node"], registry=self.registry)
        self._node_info.clear()
        self._node_info.labels(node=node).set(1)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        from prometheus_client import generate_latest  # lazy: see __init__

        return bytes(generate_latest(self.registry))
