"""The DKIM step: the ``dkim`` entry whose domain is the From domain signs each copy last.

RFC 6376 with dkimpy, relaxed/relaxed canonicalisation (survives the whitespace refolding
some smarthosts do). The signature covers From, To, Subject, Date, Message-ID,
List-Unsubscribe and List-Unsubscribe-Post when present (SPEC); RFC 8058 §4 needs the last
two covered for one-click unsubscribe to be honoured.
"""

from __future__ import annotations

import dataclasses

from relayd.policy import _mime
from relayd.policy.records import Copy, DkimSigner, Draft, Policy, PolicyContext

SIGNED_HEADERS = ("From", "To", "Subject", "Date", "Message-ID", "List-Unsubscribe",
                  "List-Unsubscribe-Post")


def signer_for(policy: Policy, content: bytes) -> tuple[DkimSigner | None, str | None]:
    """The signer matching the From domain, and that domain (None when there is no From)."""
    header, _ = _mime.split_message(content)
    addr = _mime.first_address(_mime.Headers.parse(header).get("From"))
    if addr is None:
        return None, None
    domain = _mime.domain_of(addr)
    if policy.dkim_forced and policy.dkim:
        return policy.dkim[0], domain  # a route chose the signer (routes[].dkim)
    for s in policy.dkim:
        if s.domain == domain:
            return s, domain
    return None, domain


def sign_bytes(signer: DkimSigner, content: bytes) -> bytes:
    """Prepend a DKIM-Signature header to ``content``."""
    # lazy: dkimpy pulls in dnspython, several MB in each of relayd run's processes, which
    # most installations (no dkim: entries) never use.
    import dkim

    header, _ = _mime.split_message(content)
    h = _mime.Headers.parse(header)
    include = [n.lower().encode("ascii") for n in SIGNED_HEADERS if h.has(n)]
    sig: bytes = dkim.sign(content, signer.selector.encode("ascii"),
                           signer.domain.encode("ascii"), signer.key,
                           canonicalize=(b"relaxed", b"relaxed"),
                           include_headers=include, linesep=b"\r\n")
    return sig + content


def sign(draft: Draft, policy: Policy, ctx: PolicyContext) -> Draft:
    """Sign every copy with the From domain's key; a missing key is a note, not an error."""
    if not policy.dkim:
        return draft.note("dkim", "not configured")
    if not draft.copies:
        return draft
    signer, domain = signer_for(policy, draft.copies[0].content)
    if signer is None:
        why = "no From header" if domain is None else f"no dkim entry for From domain {domain}"
        return draft.note("dkim", f"not signed: {why}")
    import dkim  # lazy: as in sign_bytes, only where a dkim: entry signs

    try:
        copies = tuple(Copy(c.rcpts, sign_bytes(signer, c.content)) for c in draft.copies)
    except dkim.DKIMException as exc:
        return draft.note("dkim", f"not signed: {exc}")
    h = _mime.Headers.parse(_mime.split_message(draft.copies[0].content)[0])
    covered = ":".join(n.lower() for n in SIGNED_HEADERS if h.has(n))
    draft = dataclasses.replace(draft, copies=copies)
    return draft.note("dkim", f"signed d={signer.domain} s={signer.selector} h={covered}")
