"""Google / Gmail tokens through google-auth, ``provider: google``.

* Service account with domain-wide delegation (Workspace): ``service_account_file`` and
  ``subject`` (the mailbox to act as); a signed JWT assertion (RFC 7523) is exchanged for a token
  with the scope ``https://mail.google.com/`` (the only scope Gmail's SMTP accepts).
* A user's refresh token: obtained once by ``relayd oauth authorize`` (authorization code with
  PKCE, RFC 7636, pasted back from the browser because Google's device flow does not allow the
  mail scope), or put in ``refresh_token_file``; ``client_id``/``client_secret`` of a "Desktop
  app" OAuth client.

``token_url`` overrides the token endpoint (tests, proxies). google-auth is synchronous; all of
this runs in a worker thread.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import secrets
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import google.auth.exceptions
import google.auth.transport.requests
import requests
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account

from relayd.config.schema import OAuthConfig, Smarthost
from relayd.errors import OAuthError
from relayd.oauth.endpoint import authorize_hint, classify_error, post_form
from relayd.oauth.store import OAuthStore, current_refresh_token, save_refresh_token
from relayd.oauth.token import DEFAULT_LIFETIME, Token
from relayd.secrets import Secret

MAIL_SCOPE = "https://mail.google.com/"
TOKEN_URI = "https://oauth2.googleapis.com/token"
AUTH_URI = "https://accounts.google.com/o/oauth2/auth"
# A loopback redirect nothing listens on: the browser shows an error page whose address holds
# the code, which the operator pastes back (works on a headless server).
REDIRECT_URI = "http://127.0.0.1/"


def _remaining(expiry: dt.datetime | None) -> float:
    """Seconds until google-auth's naive-UTC ``expiry``."""
    if expiry is None:
        return DEFAULT_LIFETIME
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    return max(1.0, (expiry - now).total_seconds())


def _refresh(creds: Any, smarthost: str, what: str, refresh_hint: str) -> None:
    """``creds.refresh`` with google-auth's exceptions mapped onto OAuthError."""
    request = google.auth.transport.requests.Request(session=requests.Session())
    try:
        creds.refresh(request)
    except google.auth.exceptions.RefreshError as exc:
        detail = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
        code = str(detail.get("error", "")) or str(exc.args[0] if exc.args else "").split(":")[0]
        desc = str(detail.get("error_description", ""))
        err = classify_error(smarthost, code, desc, what=what, refresh_hint=refresh_hint)
        if getattr(exc, "retryable", False):
            err.permanent = False
        raise err from None
    except google.auth.exceptions.TransportError as exc:
        raise OAuthError(f"cannot reach Google's token endpoint: {type(exc.__cause__ or exc).__name__}",
                         hint="retried automatically with back-off; check network and proxy",
                         permanent=False) from None


@dataclass
class ServiceAccountFetcher:
    """JWT bearer with domain-wide delegation: acts as ``subject``."""

    smarthost: str
    key_file: Path
    subject: str | None
    scope: str
    token_url: str | None

    @property
    def description(self) -> str:
        return f"google service account {self.key_file} (domain-wide delegation)"

    def fetch(self, now: float) -> Token:
        try:
            creds = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                str(self.key_file), scopes=[self.scope], subject=self.subject)
        except (OSError, ValueError, KeyError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else type(exc).__name__
            raise OAuthError(f"cannot load service_account_file {self.key_file} ({reason})",
                             hint="download the service account's JSON key again", permanent=True) from None
        if self.token_url:
            creds = creds.with_token_uri(self.token_url)
        hint = ("in the Google Admin console, authorise the service account's client ID for the "
                f"scope {self.scope} (domain-wide delegation) and check oauth.subject")
        _refresh(creds, self.smarthost, "Google refused the service account token:", hint)
        account = self.subject or creds.service_account_email
        return Token(Secret(str(creds.token)), now + _remaining(creds.expiry), now, account)


@dataclass
class RefreshTokenFetcher:
    """A user's refresh token (from ``relayd oauth authorize`` or ``refresh_token_file``)."""

    smarthost: str
    client_id: str | None
    client_secret: Secret | None
    token_url: str
    refresh_token_file: Path | None
    store: OAuthStore
    account: str

    @property
    def description(self) -> str:
        return f"google user refresh token, client id {self.client_id}"

    def fetch(self, now: float) -> Token:
        hint = authorize_hint(self.smarthost)
        rt = current_refresh_token(self.store, self.refresh_token_file)
        if rt is None:
            raise OAuthError("no Google refresh token is stored for this smarthost", hint=hint,
                             permanent=True)
        creds = user_credentials.Credentials(  # type: ignore[no-untyped-call]
            token=None, refresh_token=rt.value.reveal(), token_uri=self.token_url,
            client_id=self.client_id,
            client_secret=self.client_secret.reveal() if self.client_secret else None)
        _refresh(creds, self.smarthost, "Google refused the refresh token:", hint)
        if creds.refresh_token and creds.refresh_token != rt.value.reveal():
            save_refresh_token(self.store, creds.refresh_token, self.refresh_token_file)
        return Token(Secret(str(creds.token)), now + _remaining(creds.expiry), now, self.account)


def build(smarthost: Smarthost, oauth: OAuthConfig,
          store: OAuthStore) -> ServiceAccountFetcher | RefreshTokenFetcher:
    if oauth.service_account_file is not None:
        return ServiceAccountFetcher(smarthost=smarthost.name, key_file=oauth.service_account_file,
                                     subject=oauth.subject or smarthost.auth.username,
                                     scope=oauth.scope or MAIL_SCOPE, token_url=oauth.token_url)
    return RefreshTokenFetcher(smarthost=smarthost.name, client_id=oauth.client_id,
                               client_secret=oauth.client_secret,
                               token_url=oauth.token_url or TOKEN_URI,
                               refresh_token_file=oauth.refresh_token_file, store=store,
                               account=smarthost.auth.username or "")


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(64)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _code_from(answer: str, state: str) -> str:
    """The ``code`` from a pasted redirect address (state checked) or a bare code."""
    answer = answer.strip()
    if "code=" not in answer:
        return answer
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(answer).query or answer)
    if "error" in query:
        raise OAuthError(f"Google reported: {query['error'][0]}",
                         hint="run 'relayd oauth authorize' again and allow access", permanent=True)
    if query.get("state", [state])[0] != state:
        raise OAuthError("the pasted address belongs to another sign-in (state mismatch)",
                         hint="use the link printed by this run", permanent=True)
    return query.get("code", [""])[0]


def authorize(smarthost: Smarthost, oauth: OAuthConfig, store: OAuthStore, out: TextIO,
              inp: TextIO) -> str:
    """Consent in a browser, paste the result back, store the refresh token encrypted."""
    if oauth.service_account_file is not None:
        raise OAuthError("this smarthost uses a service account; there is nothing to sign in",
                         hint=f"run 'relayd oauth token --smarthost {smarthost.name}' to test it",
                         permanent=True)
    if not oauth.client_id or oauth.client_secret is None:
        raise OAuthError("provider google without a service account needs client_id and "
                         "client_secret of a Desktop app OAuth client",
                         hint="create one in Google Cloud console > APIs & Services > Credentials",
                         permanent=True)
    store.keyring()   # fail before the person signs in if the token cannot be stored
    verifier, challenge = _pkce()
    state = secrets.token_urlsafe(16)
    url = AUTH_URI + "?" + urllib.parse.urlencode({
        "client_id": oauth.client_id, "redirect_uri": REDIRECT_URI, "response_type": "code",
        "scope": oauth.scope or MAIL_SCOPE, "access_type": "offline", "prompt": "consent",
        "state": state, "code_challenge": challenge, "code_challenge_method": "S256",
        "login_hint": smarthost.auth.username or ""})
    print("1. Open this address in a browser (on any machine) and sign in as "
          f"{smarthost.auth.username or 'the sending account'}:", file=out)
    print(f"   {url}", file=out)
    print("2. After you allow access the browser goes to http://127.0.0.1/ and shows an error "
          "page. Copy that page's whole address from the address bar.", file=out)
    print("3. Paste it here and press Enter:", file=out, flush=True)
    code = _code_from(inp.readline(), state)
    if not code:
        raise OAuthError("no authorization code was pasted", hint="run it again", permanent=True)
    answer = post_form(oauth.token_url or TOKEN_URI, {
        "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI,
        "client_id": oauth.client_id, "client_secret": oauth.client_secret.reveal(),
        "code_verifier": verifier}, timeout=smarthost.timeout, smarthost=smarthost.name,
        refresh_hint="run 'relayd oauth authorize' again; a code can be used once, within minutes")
    refresh = answer.get("refresh_token")
    if not isinstance(refresh, str) or not refresh:
        raise OAuthError("Google returned no refresh token",
                         hint="remove relayd's access at https://myaccount.google.com/permissions "
                         "and run 'relayd oauth authorize' again", permanent=True)
    save_refresh_token(store, refresh, oauth.refresh_token_file)
    store.delete("token")
    return smarthost.auth.username or ""
