"""The header-level policy steps: priority classification, do-not-email, From/Reply-To/
envelope rewrite, and headers add/remove. Each is ``(Draft, Policy, PolicyContext) -> Draft``
and pure; the byte edits go through ``relayd.policy._mime``.
"""

from __future__ import annotations

import dataclasses

from relayd.config.schema import AddressRewrite, RewriteMode, SuppressAction
from relayd.policy import _mime
from relayd.policy.records import Draft, Policy, PolicyContext

PRIORITY_HEADER = "X-Relayd-Priority"
CONCEAL = ("Sender", "Return-Path", "X-Sender", "X-Original-From", "X-Original-Sender")


def classify(draft: Draft, policy: Policy, ctx: PolicyContext) -> Draft:
    """Priority: ``X-Relayd-Priority: high`` (always removed) or the first matching rule."""
    h = _mime.Headers(tuple(_mime.header_fields(draft.copies[0].content)))
    why: str | None = None
    marker = h.get(PRIORITY_HEADER)
    if marker is not None and marker.strip().lower() == "high":
        why = f"{PRIORITY_HEADER}: high"
    if why is None and policy.rules:
        subject = _mime.decoded_header(h.get("Subject") or "")
        sender = draft.envelope.mail_from
        for rule in policy.rules:
            hit = (bool(rule.header and rule.pattern and any(
                       rule.pattern.search(_mime.decoded_header(v)) for v in h.get_all(rule.header)))
                   or bool(rule.subject and rule.subject.search(subject))
                   or bool(rule.sender and rule.sender.search(sender)))
            if hit:
                why = rule.describe()
            if why:
                break
    if why is None and draft.priority:
        why = "marked priority before the policy ran"
    if marker is not None:
        # The internal marker never leaves relayd.
        draft = draft.map_content(lambda c: _strip(c, PRIORITY_HEADER))
    draft = dataclasses.replace(draft, priority=why is not None, why_priority=why)
    return draft.note("priority", f"yes ({why})" if why else "no (no rule matched)")


def _strip(content: bytes, name: str) -> bytes:
    return _mime.edit_header(content, lambda h: h.remove(name))


def suppress(draft: Draft, policy: Policy, ctx: PolicyContext) -> Draft:
    """Do-not-email: listed recipients are dropped (accepted, never delivered) or rejected."""
    dne = policy.do_not_email
    rcpts = draft.envelope.rcpt_tos
    listed = tuple(r for r in rcpts if r.lower() in ctx.suppressed)
    if not listed:
        return draft.note("do_not_email", "no recipient is on the list")
    if dne.bypass_all:
        return draft.note("do_not_email", f"{', '.join(listed)} listed but delivered (bypass_all)")
    if draft.priority and dne.priority_bypass:
        return draft.note("do_not_email",
                          f"{', '.join(listed)} listed but delivered (priority_bypass)")
    keep = tuple(r for r in rcpts if r not in listed)
    copies = tuple(dataclasses.replace(c, rcpts=tuple(r for r in c.rcpts if r in keep))
                   for c in draft.copies)
    if dne.action is SuppressAction.REJECT:
        draft = dataclasses.replace(draft, copies=copies, rejected=(*draft.rejected, *listed))
        return draft.note("do_not_email", f"rejected (550 5.7.1): {', '.join(listed)}")
    draft = dataclasses.replace(draft, copies=copies, suppressed=(*draft.suppressed, *listed))
    return draft.note("do_not_email", f"suppressed (never delivered): {', '.join(listed)}")


def _rewrite_one(h: _mime.Headers, name: str, rw: AddressRewrite,
                 conceal: tuple[str, ...] = ()) -> tuple[_mime.Headers, str]:
    value = _mime.format_address(rw.address, rw.name)
    if rw.mode is RewriteMode.ALWAYS:
        # Exactly one remains, and nothing else that names the original (RFC 5322 §3.6.2).
        return h.remove(name, *conceal).add(name, value), f"{name} set to {value} (always)"
    if h.has(name):
        return h, f"{name} kept (present; mode missing)"
    return h.add(name, value), f"{name} added: {value} (was missing)"


def rewrite(draft: Draft, policy: Policy, ctx: PolicyContext) -> Draft:
    """``sender.from`` / ``sender.reply_to`` header rewrite and ``envelope_from`` as MAIL FROM."""
    cfg = policy.sender
    notes: list[str] = []

    def edit_fields(h: _mime.Headers) -> _mime.Headers:
        if cfg.from_ is not None:
            # These would reveal the concealed original: Sender (RFC 5322 §3.6.2), and a
            # Return-Path that should not be in transit anyway (RFC 5321 §4.4).
            h, note = _rewrite_one(h, "From", cfg.from_, conceal=CONCEAL)
            notes.append(note)
        if cfg.reply_to is not None:
            h, note = _rewrite_one(h, "Reply-To", cfg.reply_to)
            notes.append(note)
        return h

    if cfg.from_ is not None or cfg.reply_to is not None:
        draft = draft.map_content(lambda c: _mime.edit_header(c, edit_fields))
    env = draft.envelope
    new_from = env.mail_from
    if env.mail_from == "":
        pass  # the null sender of bounces stays null (RFC 5321 §4.5.5)
    elif cfg.envelope_from:
        new_from = cfg.envelope_from
    elif cfg.from_ is not None and cfg.from_.mode is RewriteMode.ALWAYS:
        # The receiver records MAIL FROM as Return-Path: conceal the original there too.
        new_from = cfg.from_.address
    if new_from != env.mail_from:
        draft = dataclasses.replace(draft, envelope=dataclasses.replace(env, mail_from=new_from))
        notes.append(f"MAIL FROM <{env.mail_from}> -> <{new_from}>")
    for n in dict.fromkeys(notes) if notes else ["nothing to rewrite"]:
        draft = draft.note("rewrite", n)
    return draft


def edit_headers(draft: Draft, policy: Policy, ctx: PolicyContext) -> Draft:
    """``headers.remove`` then ``headers.add`` (so add+remove of one name replaces it)."""
    cfg = policy.headers
    if not cfg.add and not cfg.remove:
        return draft.note("headers", "nothing to add or remove")

    def edit_fields(h: _mime.Headers) -> _mime.Headers:
        h = h.remove(*cfg.remove)
        for name, value in cfg.add:
            h = h.add(name, _mime.encode_unstructured(value))
        return h

    draft = draft.map_content(lambda c: _mime.edit_header(c, edit_fields))
    parts = []
    if cfg.remove:
        parts.append("removed " + ", ".join(cfg.remove))
    if cfg.add:
        parts.append("added " + ", ".join(n for n, _ in cfg.add))
    return draft.note("headers", "; ".join(parts))
