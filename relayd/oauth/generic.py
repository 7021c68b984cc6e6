"""RFC 6749 token requests for ``oauth.provider: generic`` (and code exchange for Google).

A plain form POST to ``token_url`` (RFC 6749 section 4.4 client credentials, section 6
refresh token), client authentication in the body (``client_secret_post``, section 2.3.1)
because that is what Microsoft, Google and most providers accept. Error responses (section 5.2)
are classified: ``invalid_grant`` means the refresh token is dead and a person must act
(permanent); ``invalid_client`` and friends are configuration mistakes (permanent); HTTP 5xx,
429, timeouts and connection errors are temporary. Uses requests like MSAL and google-auth do,
so ``REQUESTS_CA_BUNDLE`` and ``HTTPS_PROXY`` apply to every provider alike. Blocking: call it
in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from relayd.config.schema import OAuthConfig, OAuthGrant, Smarthost
from relayd.errors import OAuthError
from relayd.oauth.source import DEFAULT_LIFETIME, Token
from relayd.oauth.store import OAuthStore, current_refresh_token, save_refresh_token
from relayd.secrets import Secret

PERMANENT_ERRORS = {"invalid_grant", "invalid_client", "unauthorized_client", "invalid_scope",
                    "unsupported_grant_type", "invalid_request", "access_denied",
                    "interaction_required", "consent_required"}


def authorize_hint(smarthost: str) -> str:
    return f"run 'relayd oauth authorize --smarthost {smarthost}' to sign in again"


def classify_error(smarthost: str, code: str, description: str, *, what: str,
                   refresh_hint: str, status: int | None = None) -> OAuthError:
    """Turn an RFC 6749 5.2 error (``code``, ``description``) into an OAuthError.

    ``what`` says who answered; the request (which holds the secrets) is never echoed.
    """
    desc = description.splitlines()[0][:300] if description else ""
    text = what + (f" {code}" if code else "") + (f": {desc}" if desc else "")
    if code == "invalid_grant":
        return OAuthError(text + " (the refresh token or grant is no longer valid)",
                          hint=refresh_hint, permanent=True)
    if code in PERMANENT_ERRORS:
        return OAuthError(text, hint="check client_id, client_secret, scope and tenant in "
                          "auth.oauth, then run 'relayd oauth token "
                          f"--smarthost {smarthost}'", permanent=True)
    if status in (400, 401, 403) and not code:
        return OAuthError(text, hint="check auth.oauth settings", permanent=True)
    return OAuthError(text, hint="retried automatically with back-off", permanent=False)


def post_form(url: str, form: dict[str, str], *, timeout: float, smarthost: str,
              refresh_hint: str) -> dict[str, Any]:
    """POST ``form`` to the token endpoint and return the JSON answer, or raise OAuthError."""
    try:
        resp = requests.post(url, data=form, headers={"Accept": "application/json"},
                             timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        raise OAuthError(f"cannot reach the token endpoint {url}: {_reason(exc)}",
                         hint="retried automatically with back-off; check network and token_url",
                         permanent=False) from None
    try:
        answer = resp.json()
    except ValueError:
        answer = None
    if resp.status_code != 200:
        code = str(answer.get("error", "")) if isinstance(answer, dict) else ""
        desc = str(answer.get("error_description", "")) if isinstance(answer, dict) else ""
        raise classify_error(smarthost, code, desc,
                             what=f"token endpoint answered HTTP {resp.status_code}",
                             refresh_hint=refresh_hint, status=resp.status_code)
    if not isinstance(answer, dict) or not isinstance(answer.get("access_token"), str):
        raise OAuthError(f"token endpoint {url} answered without an access_token",
                         hint="check token_url", permanent=False)
    return answer


def _reason(exc: requests.RequestException) -> str:
    """A short cause (the innermost exception's text names the host, never the form)."""
    inner: BaseException = exc
    while inner.__context__ is not None and inner.__context__ is not inner:
        inner = inner.__context__
    text = str(inner) or type(inner).__name__
    return text.splitlines()[0][:200]


def lifetime(answer: dict[str, Any]) -> float:
    try:
        return max(1.0, float(answer.get("expires_in", DEFAULT_LIFETIME)))
    except (TypeError, ValueError):
        return DEFAULT_LIFETIME


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
