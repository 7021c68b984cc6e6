"""SMTP AUTH (RFC 4954) for the forwarder: PLAIN, LOGIN, CRAM-MD5, XOAUTH2 and ``auto``.

Drives the SASL exchange over an ``UpstreamConnection``'s ``command`` method, which redacts
every line marked secret in transcripts. Never calls aiosmtplib's ``login()``: it tries every
advertised mechanism in turn, multiplying failed logins into account lockouts. ``auto``
picks the strongest offered mechanism and moves on only when the server says the
mechanism itself is unavailable (``504 5.7.4`` from Office 365 for PLAIN), never after a
``535`` (wrong credentials would just be tried again).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Sequence

from relayd.config.schema import AuthConfig, AuthMethod
from relayd.errors import OAuthError
from relayd.model import Reply, TokenSource

# Sends one command line; ``secret=True`` redacts it in transcripts. Returns the reply.
Command = Callable[..., Awaitable[Reply]]

# Strongest first. CRAM-MD5 never sends the password; PLAIN before LOGIN because it is one
# round trip (both are clear text inside TLS).
AUTO_ORDER = ("CRAM-MD5", "PLAIN", "LOGIN")
# "Mechanism not available" (RFC 4954 §6: 504 unrecognized mechanism; 502 not implemented).
_TRY_NEXT = (502, 504)


class AuthFailed(Exception):
    """Authentication did not succeed; ``reply`` is the server's last answer (or a local one)."""

    def __init__(self, reply: Reply, message: str) -> None:
        super().__init__(message)
        self.reply = reply


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


async def authenticate(cmd: Command, auth: AuthConfig, offered: Sequence[str],
                       token_source: TokenSource | None) -> str | None:
    """Authenticate as ``auth`` says; returns the mechanism used (None for no AUTH).

    ``offered`` is the upper-cased mechanism list from EHLO. Raises ``AuthFailed`` (or
    ``OAuthError`` when no token can be had).
    """
    method = auth.method
    if method is AuthMethod.NONE or (method is AuthMethod.AUTO and not auth.username):
        return None
    if not offered:
        raise AuthFailed(Reply(451, "4.7.0 server does not offer AUTH"),
                         "the server does not offer AUTH (after TLS, if any); "
                         "authentication is configured")
    if method is AuthMethod.XOAUTH2:
        await _xoauth2(cmd, auth.username or "", token_source)
        return "XOAUTH2"
    if method is AuthMethod.AUTO:
        candidates = [m for m in AUTO_ORDER if m in offered]
        if not candidates:
            raise AuthFailed(Reply(504, "5.7.4 no supported mechanism offered"),
                             "the server offers none of " + ", ".join(AUTO_ORDER)
                             + f" (offers: {' '.join(offered)})")
    else:
        candidates = [method.value.upper()]
    last: AuthFailed | None = None
    for mech in candidates:
        try:
            await _password_mech(cmd, mech, auth)
            return mech
        except AuthFailed as exc:
            last = exc
            if exc.reply.code not in _TRY_NEXT or method is not AuthMethod.AUTO:
                raise
    assert last is not None
    raise last


async def _password_mech(cmd: Command, mech: str, auth: AuthConfig) -> None:
    user = (auth.username or "").encode("utf-8")
    password = (auth.password.reveal() if auth.password is not None else "").encode("utf-8")
    if mech == "PLAIN":
        # RFC 4616: authzid NUL authcid NUL passwd, as the initial response.
        reply = await cmd(b"AUTH PLAIN " + _b64(b"\0" + user + b"\0" + password), secret=True)
    elif mech == "LOGIN":
        reply = await cmd(b"AUTH LOGIN")
        if reply.code == 334:
            reply = await cmd(_b64(user), secret=True)
        if reply.code == 334:
            reply = await cmd(_b64(password), secret=True)
    elif mech == "CRAM-MD5":
        # RFC 2195: username SP hex(HMAC-MD5(password, challenge)).
        reply = await cmd(b"AUTH CRAM-MD5")
        if reply.code == 334:
            try:
                challenge = base64.b64decode(reply.text.strip(), validate=True)
            except ValueError:
                await cmd(b"*")  # RFC 4954 §4: cancel the exchange
                raise AuthFailed(Reply(501, "5.5.2 malformed CRAM-MD5 challenge"),
                                 "the server sent a malformed CRAM-MD5 challenge") from None
            digest = hmac.new(password, challenge, hashlib.md5).hexdigest().encode("ascii")
            reply = await cmd(_b64(user + b" " + digest), secret=True)
    else:  # pragma: no cover - config validation only allows the mechanisms above
        raise AuthFailed(Reply(504, "5.7.4 unsupported"), f"unsupported mechanism {mech}")
    if reply.code == 334:
        # A challenge we did not expect: cancel so the session stays in sync.
        reply = await cmd(b"*")
    if reply.code != 235:
        raise AuthFailed(reply, f"AUTH {mech} failed: {reply}")


async def _xoauth2(cmd: Command, username: str, token_source: TokenSource | None) -> None:
    """XOAUTH2 with one refresh-and-retry when the server rejects the token."""
    if token_source is None:
        raise OAuthError("no OAuth token source is configured for this smarthost",
                         hint="configure auth.oauth for this smarthost")
    token = await token_source.get_token()
    reply = await _xoauth2_once(cmd, username, token)
    if reply.code == 235:
        return
    if reply.code in (334, 535, 454) or reply.code >= 500:
        # The token was refused (expired or revoked early): drop it and try exactly once more.
        token_source.invalidate(token)
        token = await token_source.get_token()
        reply = await _xoauth2_once(cmd, username, token)
        if reply.code == 235:
            return
    raise AuthFailed(reply, f"AUTH XOAUTH2 failed: {reply}")


async def _xoauth2_once(cmd: Command, username: str, token: str) -> Reply:
    blob = f"user={username}\x01auth=Bearer {token}\x01\x01".encode()
    reply = await cmd(b"AUTH XOAUTH2 " + _b64(blob), secret=True)
    if reply.code == 334:
        # Google answers a bad token with 334 <base64 JSON error>; the client must send an
        # empty line to get the final 535 (Google XOAUTH2 protocol document).
        reply = await cmd(b"")
    return reply
