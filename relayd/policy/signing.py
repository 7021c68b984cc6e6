"""The DKIM step: every ``dkim`` entry whose domain is the From domain signs each copy, last.

Several entries for one domain sign side by side (dual signing, e.g. rsa-sha256 beside
ed25519-sha256 as RFC 8463 §1 expects while receivers adopt Ed25519): each signature is made
over the message without the others, and the fields are prepended in config order. The
signature covers From, To, Subject, Date, Message-ID, List-Unsubscribe and
List-Unsubscribe-Post when present (SPEC); RFC 8058 §4 needs the last two covered for
one-click unsubscribe to be honoured. Canonicalization and the key operation:
``relayd.policy.dkim``.
"""

from __future__ import annotations

import dataclasses

from relayd.policy import _mime, dkim
from relayd.policy.records import Copy, DkimSigner, Draft, Policy, PolicyContext

SIGNED_HEADERS = ("From", "To", "Subject", "Date", "Message-ID", "List-Unsubscribe",
                  "List-Unsubscribe-Post")


def signers_for(policy: Policy, fields: list[bytes]) -> tuple[tuple[DkimSigner, ...], str | None]:
    """The signers matching the From domain, and that domain (None when there is no From)."""
    addr = _mime.first_address(_mime.Headers(tuple(fields)).get("From"))
    if addr is None:
        return (), None
    domain = _mime.domain_of(addr)
    if policy.dkim_forced and policy.dkim:
        return policy.dkim, domain  # a route chose the signing domain (routes[].dkim)
    return tuple(s for s in policy.dkim if s.domain == domain), domain


def covered(fields: list[bytes]) -> tuple[str, ...]:
    """The SIGNED_HEADERS present in a header block (h=, lower-case)."""
    present = {_mime.field_name(f) for f in fields}
    return tuple(n.lower() for n in SIGNED_HEADERS if n.lower() in present)


def sign_bytes(signers: tuple[DkimSigner, ...], content: bytes, now: float) -> bytes:
    """Prepend one DKIM-Signature field per signer to ``content``."""
    fields = _mime.header_fields(content)
    body_at = _mime.body_offset(content)
    names = covered(fields)
    sigs = [dkim.signature_field(s.key, s.algorithm, s.domain, s.selector, fields, content,
                                 body_at, names, int(now))
            for s in signers]
    return b"".join(sigs) + content


def sign(draft: Draft, policy: Policy, ctx: PolicyContext) -> Draft:
    """Sign every copy with the From domain's keys; a missing key is a note, not an error."""
    if not policy.dkim:
        return draft.note("dkim", "not configured")
    if not draft.copies:
        return draft
    fields = _mime.header_fields(draft.copies[0].content)
    signers, domain = signers_for(policy, fields)
    if not signers:
        why = "no From header" if domain is None else f"no dkim entry for From domain {domain}"
        return draft.note("dkim", f"not signed: {why}")
    try:
        copies = tuple(Copy(c.rcpts, sign_bytes(signers, c.content, ctx.now))
                       for c in draft.copies)
    except (ValueError, UnicodeError) as exc:  # e.g. a non-ASCII selector or domain
        return draft.note("dkim", f"not signed: {exc}")
    h = ":".join(covered(fields))
    draft = dataclasses.replace(draft, copies=copies)
    for s in signers:
        draft = draft.note("dkim", f"signed d={s.domain} s={s.selector} a={s.algorithm} h={h}")
    return draft
