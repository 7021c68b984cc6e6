"""Microsoft Entra ID (Office 365 / Exchange Online) tokens through MSAL, ``provider: azure``.

Two modes, chosen by the config:

* app-only (``client_secret`` set): OAuth 2.0 client credentials with the scope
  ``https://outlook.office365.com/.default``; the Exchange service principal must have
  ``SMTP.SendAsApp`` and mailbox permission (docs/oauth.md).
* delegated (no ``client_secret``, or ``grant: refresh_token``): a person signs in once with the
  device code flow (RFC 8628) in ``relayd oauth authorize``; MSAL's token cache, which holds the
  refresh token, is kept encrypted under ``state_dir`` and written back whenever MSAL rotates
  the refresh token.

MSAL is synchronous (requests); everything here runs in a worker thread. Its own access-token
cache is bypassed (``OAuthTokenSource`` owns caching), so a fetch always asks Entra ID.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TextIO

import msal
import requests

from relayd.config.schema import OAuthConfig, OAuthGrant, Smarthost
from relayd.errors import OAuthError
from relayd.oauth.endpoint import authorize_hint, classify_error
from relayd.oauth.store import OAuthStore
from relayd.oauth.token import Token, lifetime
from relayd.secrets import Secret

APP_SCOPE = "https://outlook.office365.com/.default"
DELEGATED_SCOPE = "https://outlook.office.com/SMTP.Send"
# MSAL adds these itself (offline_access is what yields the refresh token) and refuses them.
RESERVED_SCOPES = {"openid", "profile", "offline_access"}


def authority_url(oauth: OAuthConfig, *, app_only: bool) -> str:
    """``authority`` if set, else the tenant's login URL (MSAL warns that /common is unreliable
    for app-only tokens, so app-only needs ``tenant_id``)."""
    if oauth.authority:
        return oauth.authority.rstrip("/")
    if oauth.tenant_id:
        return f"https://login.microsoftonline.com/{oauth.tenant_id}"
    if app_only:
        raise OAuthError("provider azure with client_secret needs oauth.tenant_id",
                         hint="set auth.oauth.tenant_id to the directory (tenant) ID", permanent=True)
    return "https://login.microsoftonline.com/organizations"


def delegated_scopes(oauth: OAuthConfig) -> list[str]:
    words = (oauth.scope or DELEGATED_SCOPE).split()
    return [w for w in words if w not in RESERVED_SCOPES] or [DELEGATED_SCOPE]


def is_delegated(oauth: OAuthConfig) -> bool:
    return oauth.grant is OAuthGrant.REFRESH_TOKEN or oauth.client_secret is None


def _refused(smarthost: str, result: dict[str, Any], refresh_hint: str) -> OAuthError:
    return classify_error(smarthost, str(result.get("error", "")),
                          str(result.get("error_description", "")),
                          what="Entra ID refused the token request:", refresh_hint=refresh_hint)


def _network(exc: Exception, authority: str) -> OAuthError:
    return OAuthError(f"cannot reach Entra ID at {authority}: {type(exc).__name__}",
                      hint="retried automatically with back-off; check network and proxy",
                      permanent=False)


def _bad_authority(exc: ValueError, authority: str) -> OAuthError:
    return OAuthError(f"Entra ID authority {authority} is not usable: {str(exc).splitlines()[0][:200]}",
                      hint="check auth.oauth.tenant_id (or authority)", permanent=True)


@dataclass
class AppOnlyFetcher:
    """Client credentials for a daemon with no user (``SMTP.SendAsApp``)."""

    smarthost: str
    client_id: str
    client_secret: Secret
    authority: str
    scope: str
    account: str
    timeout: float
    _app: Any = field(default=None, repr=False)

    @property
    def description(self) -> str:
        return f"azure app-only (client credentials), client id {self.client_id}"

    def fetch(self, now: float) -> Token:
        try:
            if self._app is None:
                self._app = msal.ConfidentialClientApplication(
                    self.client_id, client_credential=self.client_secret.reveal(),
                    authority=self.authority, instance_discovery=False, timeout=self.timeout)
            self._app.remove_tokens_for_client()   # we cache; ask Entra ID every time
            result = self._app.acquire_token_for_client(scopes=[self.scope])
        except requests.RequestException as exc:
            raise _network(exc, self.authority) from None
        except ValueError as exc:
            raise _bad_authority(exc, self.authority) from None
        if "access_token" not in result:
            raise _refused(self.smarthost, result, "check client_id, client_secret and tenant_id "
                           "(a client secret also expires: see Certificates & secrets)")
        return Token(Secret(result["access_token"]), now + lifetime(result), now, self.account)


@dataclass
class DelegatedFetcher:
    """A signed-in mailbox: refresh token from ``relayd oauth authorize`` (device code)."""

    smarthost: str
    client_id: str
    authority: str
    scopes: list[str]
    username: str | None
    store: OAuthStore
    timeout: float
    _cache: Any = field(default=None, repr=False)
    _app: Any = field(default=None, repr=False)

    @property
    def description(self) -> str:
        return f"azure delegated (device code sign-in), client id {self.client_id}"

    def fetch(self, now: float) -> Token:
        hint = authorize_hint(self.smarthost)
        stored = self.store.read("msal")
        if not stored or not isinstance(stored.get("cache"), str):
            raise OAuthError("no Microsoft sign-in is stored for this smarthost", hint=hint,
                             permanent=True)
        try:
            if self._app is None:
                self._cache = msal.SerializableTokenCache()
                self._app = msal.PublicClientApplication(
                    self.client_id, authority=self.authority, token_cache=self._cache,
                    instance_discovery=False, timeout=self.timeout)
            # Re-read every time: `relayd oauth authorize` or another process may have rotated it.
            self._cache.deserialize(stored["cache"])
            accounts = self._app.get_accounts()
            wanted = [a for a in accounts
                      if self.username and str(a.get("username", "")).lower() == self.username.lower()]
            if not accounts:
                raise OAuthError("the stored Microsoft sign-in has no account", hint=hint,
                                 permanent=True)
            account = (wanted or accounts)[0]
            result = self._app.acquire_token_silent_with_error(
                self.scopes, account=account, force_refresh=True)
        except requests.RequestException as exc:
            raise _network(exc, self.authority) from None
        except ValueError as exc:
            raise _bad_authority(exc, self.authority) from None
        if self._cache.has_state_changed:   # a rotated refresh token: keep it
            self.store.write("msal", {"version": 1, "cache": self._cache.serialize()})
            self._cache.has_state_changed = False
        if result is None:
            raise OAuthError("the stored Microsoft sign-in has no usable refresh token",
                             hint=hint, permanent=True)
        if "access_token" not in result:
            raise _refused(self.smarthost, result, hint)
        return Token(Secret(result["access_token"]), now + lifetime(result), now,
                     str(account.get("username") or self.username or ""))


def build(smarthost: Smarthost, oauth: OAuthConfig, store: OAuthStore) -> AppOnlyFetcher | DelegatedFetcher:
    if not oauth.client_id:
        raise OAuthError("provider azure needs oauth.client_id", hint="set auth.oauth.client_id",
                         permanent=True)
    if is_delegated(oauth):
        return DelegatedFetcher(smarthost=smarthost.name, client_id=oauth.client_id,
                                authority=authority_url(oauth, app_only=False),
                                scopes=delegated_scopes(oauth), username=smarthost.auth.username,
                                store=store, timeout=smarthost.timeout)
    assert oauth.client_secret is not None
    return AppOnlyFetcher(smarthost=smarthost.name, client_id=oauth.client_id,
                          client_secret=oauth.client_secret,
                          authority=authority_url(oauth, app_only=True),
                          scope=oauth.scope or APP_SCOPE,
                          account=f"{smarthost.auth.username or ''} (app-only)".strip(),
                          timeout=smarthost.timeout)


def authorize(smarthost: Smarthost, oauth: OAuthConfig, store: OAuthStore, out: TextIO) -> str:
    """Device code sign-in (RFC 8628): show the code, wait for the person, store the cache.

    Returns the signed-in account name. Blocking: it polls until the user finished or the code
    expired (about 15 minutes).
    """
    if not oauth.client_id:
        raise OAuthError("provider azure needs oauth.client_id", hint="set auth.oauth.client_id",
                         permanent=True)
    if not is_delegated(oauth):
        raise OAuthError("this smarthost uses app-only client credentials (client_secret is set); "
                         "there is nothing to sign in",
                         hint=f"run 'relayd oauth token --smarthost {smarthost.name}' to test it, or "
                         "remove client_secret to use a delegated (signed-in mailbox) token",
                         permanent=True)
    authority = authority_url(oauth, app_only=False)
    store.keyring()   # fail before the person signs in if the token cannot be stored
    cache = msal.SerializableTokenCache()
    try:
        app = msal.PublicClientApplication(oauth.client_id, authority=authority, token_cache=cache,
                                           instance_discovery=False, timeout=smarthost.timeout)
        flow = app.initiate_device_flow(scopes=delegated_scopes(oauth))
        if "user_code" not in flow:
            raise OAuthError(
                f"Entra ID refused the device code request: {flow.get('error', '')}: "
                f"{str(flow.get('error_description', '')).splitlines()[0:1]}",
                hint="in the app registration enable Authentication > 'Allow public client flows' "
                "and add the delegated permission SMTP.Send", permanent=True)
        print(flow["message"], file=out, flush=True)
        print(f"Sign in as {smarthost.auth.username or 'the mailbox to send as'}. Waiting ...",
              file=out, flush=True)
        result = app.acquire_token_by_device_flow(flow)
    except requests.RequestException as exc:
        raise _network(exc, authority) from None
    except ValueError as exc:
        raise _bad_authority(exc, authority) from None
    if "access_token" not in result:
        raise _refused(smarthost.name, result, "run 'relayd oauth authorize' again and finish "
                       "the sign-in before the code expires")
    store.write("msal", {"version": 1, "cache": cache.serialize()})
    store.delete("token")
    claims = result.get("id_token_claims") or {}
    return str(claims.get("preferred_username") or smarthost.auth.username or "")
