"""RFC 6749 token endpoint requests and error classification, shared by every provider.

A plain form POST to the token endpoint, client authentication in the body
(``client_secret_post``, section 2.3.1) because that is what Microsoft, Google and most
providers accept. Error responses (section 5.2) are classified: ``invalid_grant`` means the
refresh token is dead and a person must act (permanent); ``invalid_client`` and friends are
configuration mistakes (permanent); HTTP 5xx, 429, timeouts and connection errors are
temporary. Uses requests like MSAL and google-auth do, so ``REQUESTS_CA_BUNDLE`` and
``HTTPS_PROXY`` apply to every provider alike. Blocking: call it in a thread.
"""

from __future__ import annotations

from typing import Any

import requests

from relayd.errors import OAuthError

PERMANENT_ERRORS = {"invalid_grant", "invalid_client", "unauthorized_client", "invalid_scope",
                    "unsupported_grant_type", "invalid_request", "access_denied",
                    "interaction_required", "consent_required"}


def authorize_hint(smarthost: str) -> str:
    """What to tell the operator when a person must sign in again (a dead refresh token)."""
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
