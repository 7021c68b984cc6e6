"""Sender authorization for authenticated submission: may this user send as this address?

Pure functions, shared by the submission listener (MAIL FROM, then the header From at the
end of DATA) and ``relayd explain --user``. Like Postfix's ``reject_sender_login_mismatch``
and maddy's ``authorize_sender``: a user owns the addresses its ``allowed_from`` lists
(``local@domain``), every address of a domain (``@domain``), or any address (``*``); by
default none. Comparison ignores case (domains are case-insensitive, RFC 5321 §2.4, and
no provider in practice tells local parts apart by case).
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable

REFUSAL = "553 5.7.1 Sender address not owned by the authenticated user"
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FROM = re.compile(rb"(?im)^from[ \t]*:(.*(?:\r?\n[ \t].*)*)")


def owns(allowed_from: Iterable[str], address: str) -> bool:
    """True when ``address`` matches one of the user's ``allowed_from`` patterns."""
    addr = address.strip().lower()
    if "@" not in addr:
        return False
    domain = "@" + addr.rpartition("@")[2]
    return any(p in ("*", addr, domain) for p in allowed_from)


def header_from_addresses(content: bytes) -> list[str] | None:
    """The addresses of every From header of the message's header section; None when a From
    header is there but holds no address (an unusable header, refused like a foreign one)."""
    m = _HEADER_END.search(content)
    head = content if m is None else content[:m.start()]
    out: list[str] = []
    for value in _FROM.findall(head):
        text = value.decode("utf-8", "replace").replace("\r", "").replace("\n", "")
        found = [a for _n, a in email.utils.getaddresses([text]) if a]
        if not found:
            return None
        out.extend(found)
    return out


def check_envelope(allowed_from: Iterable[str], mail_from: str) -> str | None:
    """Why the MAIL FROM is refused (for the log), or None. The null sender ``<>`` (a bounce or
    a delivery report, RFC 5321 §4.5.5) owns nothing to forge and is allowed."""
    if mail_from in ("", "<>"):
        return None
    if owns(allowed_from, mail_from):
        return None
    return f"MAIL FROM <{mail_from}> is not in the user's allowed_from"


def check_header(allowed_from: Iterable[str], content: bytes) -> str | None:
    """Why the header From is refused, or None. A message without From is let through here
    (its envelope sender was checked); every address of every From must be owned."""
    patterns = tuple(allowed_from)
    found = header_from_addresses(content)
    if found is None:
        return "the From header holds no address"
    for addr in found:
        if not owns(patterns, addr):
            return f"header From <{addr}> is not in the user's allowed_from"
    return None
