"""OAuth2 access tokens for XOAUTH2: one cached, single-flight token source per smarthost.

``build_token_source(smarthost, state_dir=..., key_file=...)`` picks the provider fetcher
(``relayd.oauth.azure`` MSAL, ``relayd.oauth.google`` google-auth, ``relayd.oauth.generic``
RFC 6749) and wraps it in ``OAuthTokenSource``, which owns the lifecycle the SPEC asks for:

* the token is cached in memory and encrypted on disk (``relayd.oauth.store``), so a restart
  reuses it; in a fleet also in the database, and a node that waited for another's refresh
  takes its token instead of asking the endpoint again;
* it is refreshed ahead of expiry: 10 minutes before, or half its lifetime for short-lived ones;
* one refresh at a time however many deliveries wait (an ``asyncio.Lock``), and after a failure
  callers get the same error without a new request until a short back-off has passed;
* ``invalidate(token)`` drops a token the server rejected so the next call fetches a new one;
* failures raise ``OAuthError``: ``permanent=True`` (dead refresh token, wrong client secret)
  with a hint saying what to do, ``permanent=False`` for network trouble the caller retries.

Fetchers are blocking (MSAL, google-auth and urllib all are) and run in ``asyncio.to_thread``.
The ``Token`` record and the ``Fetcher`` protocol live in ``relayd.oauth.token``, which the
providers import: they never import this module, so the arrows point one way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from relayd.config.schema import OAuthConfig, OAuthProvider, Smarthost
from relayd.errors import OAuthError
from relayd.oauth.store import OAuthStore, SharedCopies, fingerprint
from relayd.oauth.token import REFRESH_MARGIN, Fetcher, Token
from relayd.secrets import Secret

log = logging.getLogger("relayd.oauth")

FAILURE_BACKOFF = (2.0, 60.0)  # pause between failed token requests (callers back off too)


@dataclass(frozen=True)
class TokenStatistics:
    """What the daemon and metrics need to know about one token source.

    ``expires_at`` feeds ``relayd_oauth_token_expiry_seconds``; ``last_error_permanent`` is the
    condition for the ``token_refresh_failed`` alert (a dead refresh token: mail waits).
    """

    smarthost: str
    provider: str
    account: str | None = None
    expires_at: float | None = None
    refreshed_at: float | None = None
    refreshes: int = 0
    failures: int = 0
    last_error: str | None = None
    last_error_permanent: bool = False
    hint: str = ""


StatusCallback = Callable[[TokenStatistics], None]


class OAuthTokenSource:
    """A ``relayd.model.TokenSource``: cached, refreshed ahead of time, one refresh at a time."""

    def __init__(self, smarthost: str, fetcher: Fetcher, store: OAuthStore | None, *,
                 provider: str, settings_digest: str, clock: Callable[[], float] = time.time,
                 on_status: StatusCallback | None = None,
                 margin: float = REFRESH_MARGIN) -> None:
        self.smarthost = smarthost
        self.description = fetcher.description
        self._fetcher = fetcher
        self._store = store
        self._digest = settings_digest
        self._clock = clock
        self._margin = margin
        self._on_status = on_status
        self._lock = asyncio.Lock()
        self._token: Token | None = None
        self._rejected = ""  # digest of the token the server refused: never taken from a cache
        self._loaded = store is None
        self._failure: OAuthError | None = None
        self._retry_at = 0.0
        self._backoff = FAILURE_BACKOFF[0]
        self._stats = TokenStatistics(smarthost=smarthost, provider=provider)

    # -- TokenSource ---------------------------------------------------------------------------
    async def get_token(self) -> str:
        """A token valid for at least the refresh margin; refreshes if needed (single flight)."""
        return (await self.token()).access_token.reveal()

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (the server rejected it); the next ``get_token`` fetches anew."""
        if self._token is not None and self._token.access_token.reveal() == token:
            log.info("oauth: smarthost %s: token rejected by the server; will fetch a new one",
                     self.smarthost)
            self._token = None
            self._rejected = fingerprint((token,))
            self._stats = replace(self._stats, expires_at=None)

    def forget_failure(self) -> None:
        """The next ``get_token`` asks the endpoint at once, even within the failure backoff."""
        self._retry_at = 0.0
        self._backoff = FAILURE_BACKOFF[0]

    # -- richer API (CLI, daemon) --------------------------------------------------------------
    async def token(self, *, force: bool = False) -> Token:
        """The current token record; ``force`` fetches a new one even if the cache is good."""
        token = self._usable()
        if token is not None and not force:
            return token
        async with self._lock:
            if not self._loaded:
                await asyncio.to_thread(self._load)
            token = self._usable()
            # Another waiter may have refreshed while we queued on the lock (single flight).
            if token is not None and not force:
                return token
            now = self._clock()
            if self._failure is not None and now < self._retry_at and not force:
                raise self._failure
            try:
                fresh, fetched = await asyncio.to_thread(self._fetch_and_save, now, force)
            except OAuthError as exc:
                self._failed(exc, now)
                raise
            except Exception as exc:  # a library bug or an unexpected transport error
                # Only the type: the text of an unexpected exception might quote a request.
                err = OAuthError(f"token request failed unexpectedly ({type(exc).__name__})",
                                 hint="retried automatically; run 'relayd oauth token "
                                 f"--smarthost {self.smarthost}' to check", permanent=False)
                self._failed(err, now)
                raise err from exc
            self._succeeded(fresh, fetched)
            return fresh

    def statistics(self) -> TokenStatistics:
        """A snapshot for metrics and alerts (expiry, last error, counts)."""
        return self._stats

    # -- internals -----------------------------------------------------------------------------
    def _usable(self) -> Token | None:
        token = self._token
        if token is not None and self._clock() < token.refresh_at(self._margin):
            return token
        return None

    def _load(self) -> None:
        """Read the encrypted cache left by a previous run (blocking; in a thread)."""
        self._loaded = True
        token = self._read_cached()
        if token is not None:
            self._token = token
            self._stats = replace(self._stats, account=token.account, expires_at=token.expires_at)

    def _read_cached(self) -> Token | None:
        """The stored token for these settings (in a fleet, the fleet's), or None."""
        if self._store is None:
            return None
        try:
            data = self._store.read("token")
        except (OAuthError, OSError) as exc:
            log.warning("oauth: smarthost %s: token cache not used: %s", self.smarthost, exc)
            self._store = None
            return None
        if not data or data.get("settings") != self._digest:
            return None
        try:
            return Token(Secret(str(data["access_token"])), float(data["expires_at"]),
                         float(data["issued_at"]), str(data.get("account", "")))
        except (KeyError, TypeError, ValueError):
            return None

    def _fetch_and_save(self, now: float, force: bool = False) -> tuple[Token, bool]:
        """Fetch a token and persist it (blocking; in a thread, under the cross-process lock);
        (the token, whether this node fetched it)."""
        store = self._store
        if store is None:
            return self._fetcher.fetch(now), True
        with store.lock():
            if store.shared is not None and not force:
                # In a fleet another node may have refreshed while this one waited for the
                # lock: its token serves here too (one request to the endpoint for all).
                cached = self._read_cached()
                if (cached is not None and now < cached.refresh_at(self._margin)
                        and fingerprint((cached.access_token.reveal(),)) != self._rejected):
                    return cached, False
            token = self._fetcher.fetch(now)
            try:
                store.write("token", {
                    "version": 1, "settings": self._digest,
                    "access_token": token.access_token.reveal(), "expires_at": token.expires_at,
                    "issued_at": token.issued_at, "account": token.account})
            except (OSError, OAuthError) as exc:
                # The token is good; only the restart cache is lost. Say so once.
                log.warning("oauth: smarthost %s: cannot write the token cache: %s",
                            self.smarthost, exc)
        return token, True

    def _succeeded(self, token: Token, fetched: bool = True) -> None:
        self._token = token
        self._failure = None
        self._backoff = FAILURE_BACKOFF[0]
        self._stats = replace(self._stats, account=token.account, expires_at=token.expires_at,
                              refreshed_at=token.issued_at,
                              refreshes=self._stats.refreshes + (1 if fetched else 0),
                              last_error=None, last_error_permanent=False, hint="")
        if fetched:
            log.info("oauth: smarthost %s: new access token for %s, valid for %d s",
                     self.smarthost, token.account, int(token.expires_at - token.issued_at))
        else:
            log.info("oauth: smarthost %s: using the access token for %s that another node of "
                     "the fleet fetched, valid for %d s more", self.smarthost, token.account,
                     int(token.expires_at - self._clock()))
        self._notify()

    def _failed(self, exc: OAuthError, now: float) -> None:
        self._failure = exc
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, FAILURE_BACKOFF[1])
        self._stats = replace(self._stats, failures=self._stats.failures + 1, last_error=str(exc),
                              last_error_permanent=exc.permanent, hint=exc.hint)
        log.warning("oauth: smarthost %s: cannot get a token (%s): %s%s", self.smarthost,
                    "permanent" if exc.permanent else "temporary", exc,
                    f"; {exc.hint}" if exc.hint else "")
        self._notify()

    def _notify(self) -> None:
        if self._on_status is not None:
            try:
                self._on_status(self._stats)
            except Exception:  # an alerting bug must not break token handling
                log.exception("oauth: status callback failed")


def settings_digest(smarthost: Smarthost, oauth: OAuthConfig) -> str:
    """Digest of the settings a cached token depends on; editing them discards the cache."""
    return fingerprint((oauth.provider, oauth.tenant_id, oauth.client_id, oauth.token_url,
                        oauth.scope, oauth.grant, oauth.subject, oauth.service_account_file,
                        oauth.authority, smarthost.auth.username,
                        oauth.client_secret is not None))


def oauth_config(smarthost: Smarthost) -> OAuthConfig:
    """The smarthost's ``auth.oauth`` slice; OAuthError if it has none."""
    oauth = smarthost.auth.oauth
    if oauth is None:
        raise OAuthError(f"smarthost {smarthost.name} has no auth.oauth settings",
                         hint="set auth.method: xoauth2 and auth.oauth", permanent=True)
    return oauth


def build_fetcher(smarthost: Smarthost, store: OAuthStore) -> Fetcher:
    """The provider-specific fetcher for the smarthost's ``auth.oauth`` settings."""
    oauth = oauth_config(smarthost)
    # Only the provider in use is imported: MSAL, google-auth and requests each take 15-25 MB
    # and about 0.1 s to import, and an installation uses one provider.
    if oauth.provider is OAuthProvider.AZURE:
        from relayd.oauth import azure  # lazy: MSAL only where a smarthost uses Entra ID
        return azure.build(smarthost, oauth, store)
    if oauth.provider is OAuthProvider.GOOGLE:
        from relayd.oauth import google  # lazy: google-auth only where a smarthost uses it
        return google.build(smarthost, oauth, store)
    from relayd.oauth import generic  # lazy: requests only for a generic provider
    return generic.build(smarthost, oauth, store)


class _Unusable:
    """Stands in for a fetcher whose settings are unusable: every fetch raises the reason, so
    the daemon still starts and the mail waits with a clear error instead of crashing."""

    def __init__(self, error: OAuthError) -> None:
        self._error = error

    @property
    def description(self) -> str:
        return "unusable settings"

    def fetch(self, now: float) -> Token:
        raise self._error


def build_token_source(smarthost: Smarthost, *, state_dir: Path, key_file: Path,
                       clock: Callable[[], float] = time.time,
                       on_status: StatusCallback | None = None,
                       shared: SharedCopies | None = None) -> OAuthTokenSource:
    """The token source for an ``auth.method: xoauth2`` smarthost.

    Does no I/O and never raises for bad settings: key and cache files are read, and setting
    problems reported as OAuthError, on the first ``get_token``. ``on_status`` is called after
    every refresh attempt with ``statistics()`` (for the ``token_refresh_failed`` alert and the
    expiry metric). ``shared`` is the fleet's copy of the records (with ``shared_state``): one
    node's refresh then serves every node.
    """
    oauth = oauth_config(smarthost)
    store = OAuthStore(state_dir, smarthost.name, key_file, shared)
    fetcher: Fetcher
    try:
        fetcher = build_fetcher(smarthost, store)
    except OAuthError as exc:
        fetcher = _Unusable(exc)
    return OAuthTokenSource(smarthost.name, fetcher, store,
                            provider=oauth.provider.value,
                            settings_digest=settings_digest(smarthost, oauth),
                            clock=clock, on_status=on_status)
