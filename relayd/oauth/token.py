"""The access-token record and the fetcher protocol that the token source and every provider share.

``Token`` is what a provider returns and what ``OAuthTokenSource`` caches; ``Fetcher`` is
the one method a provider implements. Kept apart from ``relayd.oauth.source`` so that the
providers (azure, google, generic) import it without importing the source that picks them.
No I/O and no third-party imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from relayd.secrets import Secret

REFRESH_MARGIN = 600.0  # SPEC: refreshed at least 10 minutes before expiry
DEFAULT_LIFETIME = 3600.0  # RFC 6749 5.1: expires_in is only RECOMMENDED


@dataclass(frozen=True)
class Token:
    """An access token with its lifetime (``clock`` seconds) and the identity it acts for."""

    access_token: Secret
    expires_at: float
    issued_at: float
    account: str

    def refresh_at(self, margin: float = REFRESH_MARGIN) -> float:
        """When to fetch the next one: ``margin`` before expiry, or halfway for short lives."""
        lifetime = max(0.0, self.expires_at - self.issued_at)
        return self.expires_at - min(margin, lifetime / 2)


class Fetcher(Protocol):
    """Obtains a new access token from the provider; blocking; raises OAuthError."""

    @property
    def description(self) -> str:
        """How the token is obtained, for ``relayd oauth token`` (no secrets)."""
        ...

    def fetch(self, now: float) -> Token: ...


def lifetime(answer: Mapping[str, Any]) -> float:
    """Seconds a token endpoint's answer says the token lives (``expires_in``, RFC 6749
    5.1), at least 1; ``DEFAULT_LIFETIME`` when absent or not a number."""
    try:
        return max(1.0, float(answer.get("expires_in", DEFAULT_LIFETIME)))
    except (TypeError, ValueError):
        return DEFAULT_LIFETIME
