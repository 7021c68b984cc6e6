"""The unsubscribe step: footer in each text part, List-Unsubscribe headers, and the
per-recipient token that the one-click endpoint verifies.

A token is ``base64url(address) "." base64url(HMAC-SHA256(secret, address)[:16])`` with the
address lower-cased: it names the recipient on its own (the SPEC's example URL carries only
``{token}``) and cannot be forged without ``unsubscribe.secret``. When the URL or a footer
uses ``{token}`` or ``{email}``, each recipient gets its own copy.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
from urllib.parse import quote

from relayd.config.schema import UnsubscribeConfig
from relayd.policy import _mime
from relayd.policy.records import Copy, Draft, Policy, PolicyContext

_PER_RECIPIENT = ("{token}", "{email}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_token(secret: bytes, address: str) -> str:
    """The unsubscribe token for ``address`` (case-insensitive)."""
    addr = address.strip().lower().encode("utf-8")
    mac = hmac.new(secret, addr, hashlib.sha256).digest()[:16]
    return f"{_b64(addr)}.{_b64(mac)}"


def verify_token(secret: bytes, token: str) -> str | None:
    """The lower-cased address a genuine token names, or None for a forged/garbled one."""
    head, dot, tail = token.strip().partition(".")
    if not dot:
        return None
    try:
        addr = _unb64(head).decode("utf-8")
        mac = _unb64(tail)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    expected = make_token(secret, addr).partition(".")[2]
    if addr != addr.lower() or not hmac.compare_digest(_b64(mac), expected):
        return None
    return addr


def per_recipient(cfg: UnsubscribeConfig) -> bool:
    """True when the URL or a footer differs per recipient (then each gets its own copy)."""
    return any(p in (t or "") for t in (cfg.url, cfg.footer_text, cfg.footer_html)
               for p in _PER_RECIPIENT)


def recipient_url(cfg: UnsubscribeConfig, secret: bytes | None, rcpt: str | None) -> str | None:
    """``unsubscribe.url`` with ``{token}`` and ``{email}`` filled in for ``rcpt``."""
    if not cfg.url:
        return None
    url = cfg.url
    if rcpt is not None:
        if "{token}" in url and secret is not None:
            url = url.replace("{token}", quote(make_token(secret, rcpt), safe=""))
        url = url.replace("{email}", quote(rcpt.lower(), safe="@"))
    return _mime.clean(url)


def mailto_uri(cfg: UnsubscribeConfig) -> str | None:
    return f"mailto:{cfg.mailto}?subject=unsubscribe" if cfg.mailto else None


def list_unsubscribe(cfg: UnsubscribeConfig, url: str | None) -> str | None:
    """The RFC 2369 value: angle-bracketed URIs, mailto first, comma-separated."""
    uris = [u for u in (mailto_uri(cfg), url) if u]
    return ", ".join(f"<{u}>" for u in uris) if uris else None


def _fill(template: str | None, *, url: str, rcpt: str | None, token: str | None,
          escape: bool) -> str | None:
    if template is None:
        return None
    # lazy: html loads its 2,231-entity table, which a relay without an HTML footer never
    # needs in memory.
    import html

    esc = html.escape if escape else (lambda s: s)
    out = template.replace("{url}", esc(url))
    out = out.replace("{email}", esc(rcpt.lower() if rcpt else ""))
    return out.replace("{token}", esc(token or ""))


def _skip(leaf: _mime.Leaf) -> str | None:
    if leaf.disposition == "attachment":
        return "attachment"
    if leaf.content_type == "text/calendar":
        return "calendar"
    if leaf.content_type not in ("text/plain", "text/html"):
        return "not text/plain or text/html"
    return None


def decorate(policy: Policy, content: bytes, rcpt: str | None) -> tuple[bytes, list[str]]:
    """Headers and footers for one copy (``rcpt`` None: the copy shared by all recipients)."""
    cfg = policy.unsubscribe
    assert cfg is not None
    secret = policy.unsubscribe_secret
    url = recipient_url(cfg, secret, rcpt)
    notes: list[str] = []
    header, body = _mime.split_message(content)
    h = _mime.Headers.parse(header).remove("List-Unsubscribe", "List-Unsubscribe-Post")
    value = list_unsubscribe(cfg, url)
    if value:
        h = h.add("List-Unsubscribe", value)
        notes.append(f"List-Unsubscribe: {value}")
        if url:
            # RFC 8058 §3.1: one-click needs an HTTP(S) URI and this exact field.
            h = h.add("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")
            notes.append("List-Unsubscribe-Post: List-Unsubscribe=One-Click")
    content = _mime.join_message(h.to_bytes(), body)
    if not (cfg.footer_text or cfg.footer_html):
        return content, notes
    opaque = _mime.is_opaque(content)
    if opaque:
        notes.append(f"footer skipped: {opaque} is never modified")
        return content, notes
    link = url or mailto_uri(cfg) or ""
    token = make_token(secret, rcpt) if secret and rcpt else None
    text = _fill(cfg.footer_text, url=link, rcpt=rcpt, token=token, escape=False)
    html_footer = _fill(cfg.footer_html, url=link, rcpt=rcpt, token=token, escape=True)
    content, part_notes = _mime.decorate(content, text, html_footer, _skip)
    notes.extend(part_notes)
    return content, notes


def apply(draft: Draft, policy: Policy, ctx: PolicyContext) -> Draft:
    """Footer + List-Unsubscribe, one copy per recipient when they carry a token/address."""
    cfg = policy.unsubscribe
    if cfg is None:
        return draft.note("unsubscribe", "not configured")
    if draft.priority and cfg.skip_priority:
        return draft.note("unsubscribe", "skipped: priority mail (skip_priority)")
    if not any(c.rcpts for c in draft.copies):
        return draft.note("unsubscribe", "skipped: no recipient left")
    copies: list[Copy] = []
    notes: list[str] = []
    split = per_recipient(cfg)
    for c in draft.copies:
        if split:
            for rcpt in c.rcpts:
                content, n = decorate(policy, c.content, rcpt)
                copies.append(Copy((rcpt,), content))
                notes = notes or [f"(shown for {rcpt})", *n]
        else:
            content, n = decorate(policy, c.content, None)
            copies.append(Copy(c.rcpts, content))
            notes = notes or n
    draft = dataclasses.replace(draft, copies=tuple(copies))
    if split:
        draft = draft.note("unsubscribe", f"one copy per recipient ({len(copies)}): "
                           "the link carries each recipient's own token")
    for line in notes:
        draft = draft.note("unsubscribe", line)
    return draft
