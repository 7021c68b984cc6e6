"""Brute-force protection for AUTH: failures counted per client address, lockout after N.

Like Postfix's anvil with ``smtpd_client_auth_rate_limit`` and fail2ban's findtime/bantime:
``limit`` failed AUTH attempts from one address within ``window`` seconds lock that address
out for ``lockout`` seconds, during which AUTH (and a new session) gets ``421 4.7.0``. Pure
bookkeeping with an injected clock; the listener does the waiting and the replies. The table
is bounded: a flood of distinct addresses cannot grow it without end.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

MAX_TRACKED = 10_000


@dataclass
class _Client:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0


class AuthGuard:
    """Failed AUTH per client address."""

    def __init__(self, *, limit: int, window: float, lockout: float) -> None:
        self.limit = limit
        self.window = window
        self.lockout = lockout
        self._clients: dict[str, _Client] = {}

    def locked(self, address: str, now: float) -> bool:
        """True while ``address`` is locked out."""
        client = self._clients.get(address)
        return client is not None and client.locked_until > now

    def failed(self, address: str, now: float) -> int:
        """Record one failure; how many are left before the lockout (0: locked out now)."""
        if address not in self._clients and len(self._clients) >= MAX_TRACKED:
            self._forget(now)
        client = self._clients.setdefault(address, _Client())
        client.failures.append(now)
        while client.failures and client.failures[0] <= now - self.window:
            client.failures.popleft()
        if len(client.failures) >= self.limit:
            client.locked_until = now + self.lockout
            client.failures.clear()
            return 0
        return self.limit - len(client.failures)

    def _forget(self, now: float) -> None:
        for address, client in list(self._clients.items()):
            if client.locked_until <= now and (not client.failures
                                               or client.failures[-1] <= now - self.window):
                del self._clients[address]
        while len(self._clients) >= MAX_TRACKED:  # all recent: drop the oldest entries
            del self._clients[next(iter(self._clients))]
