"""``oauth.provider: generic``: tokens from any RFC 6749 token endpoint.

``client_credentials`` (RFC 6749 section 4.4) or ``refresh_token`` (section 6) as a form POST
to ``token_url`` (``relayd.oauth.endpoint``); a refresh token the server rotates is stored
again. Blocking: call it in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from relayd.config.schema import OAuthConfig, OAuthGrant, Smarthost
from relayd.errors import OAuthError
from relayd.oauth.endpoint import authorize_hint, post_form
from relayd.oauth.store import OAuthStore, current_refresh_token, save_refresh_token
from relayd.oauth.token import Token, lifetime
from relayd.secrets import Secret


@dataclass
class GenericFetcher:
    """``client_credentials`` or ``refresh_token`` against any RFC 6749 token endpoint."""

    smarthost: str
    token_url: str
    client_id: str | None
    client_secret: Secret | None
    scope: str | None
    grant: OAuthGrant
    refresh_token_file: Path | None
    store: OAuthStore
    account: str
    timeout: float

    @property
    def description(self) -> str:
        return f"generic {self.grant.value} at {self.token_url}"

    def fetch(self, now: float) -> Token:
        form: dict[str, str] = {"grant_type": self.grant.value}
        refresh_hint = (authorize_hint(self.smarthost) + " or put a new token in "
                        "oauth.refresh_token_file" if self.grant is OAuthGrant.REFRESH_TOKEN
                        else "check client_id and client_secret")
        used: str | None = None
        if self.grant is OAuthGrant.REFRESH_TOKEN:
            rt = current_refresh_token(self.store, self.refresh_token_file)
            if rt is None:
                raise OAuthError("no refresh token is stored for this smarthost",
                                 hint="set oauth.refresh_token_file", permanent=True)
            used = rt.value.reveal()
            form["refresh_token"] = used
        if self.scope:
            form["scope"] = self.scope
        if self.client_id:
            form["client_id"] = self.client_id
        if self.client_secret is not None:
            form["client_secret"] = self.client_secret.reveal()
        answer = post_form(self.token_url, form, timeout=self.timeout, smarthost=self.smarthost,
                           refresh_hint=refresh_hint)
        new_rt = answer.get("refresh_token")
        # RFC 6749 6: the server MAY issue a new refresh token; the old one may then be revoked.
        if isinstance(new_rt, str) and new_rt and new_rt != used:
            save_refresh_token(self.store, new_rt, self.refresh_token_file)
        return Token(Secret(answer["access_token"]), now + lifetime(answer), now, self.account)


def build(smarthost: Smarthost, oauth: OAuthConfig, store: OAuthStore) -> GenericFetcher:
    if not oauth.token_url:
        raise OAuthError("oauth.token_url is not set", hint="set auth.oauth.token_url",
                         permanent=True)
    return GenericFetcher(
        smarthost=smarthost.name, token_url=oauth.token_url, client_id=oauth.client_id,
        client_secret=oauth.client_secret, scope=oauth.scope,
        grant=oauth.grant or (OAuthGrant.REFRESH_TOKEN if oauth.refresh_token_file
                              else OAuthGrant.CLIENT_CREDENTIALS),
        refresh_token_file=oauth.refresh_token_file, store=store,
        account=smarthost.auth.username or oauth.client_id or "", timeout=smarthost.timeout)
