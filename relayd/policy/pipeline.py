"""The sending policy as an ordered tuple of pure steps, and the records they pass along.

``build_policy(config, dkim_keys)`` compiles the config slices once (regexes, keys);
``run_pipeline(policy, message, ctx)`` applies ``steps_in_order()`` in SPEC order (priority ->
do-not-email -> rewrite -> headers -> unsubscribe -> long lines -> DKIM) and returns a
``PipelineResult``.
No step does I/O, reads the clock or logs: the time and the do-not-email snapshot come in
``PolicyContext``, and every decision is returned as data (``steps`` notes for explain/logs).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping

from relayd.config.schema import Config, SuppressAction
from relayd.model import Envelope, Message, Reply
from relayd.policy.dkim import DkimKeyError, load_private_key
from relayd.policy.records import (
    CompiledRule,
    Copy,
    DkimSigner,
    Draft,
    Note,
    PipelineResult,
    Policy,
    PolicyContext,
    Step,
)

__all__ = ["Note", "PipelineResult", "Policy", "PolicyContext", "build_policy", "log_summary",
           "rcpt_decision", "recheck_at_delivery", "run_pipeline", "steps_in_order"]

@functools.cache
def steps_in_order() -> tuple[tuple[str, Step], ...]:
    """The SPEC order, in one place: priority -> do-not-email -> rewrite -> headers ->
    unsubscribe -> long lines -> DKIM (DKIM last, so the signature covers every other change,
    including the re-encoding of lines over 998 octets, relayd/policy/long_lines.py).

    Imported on first use: the steps need the email package (~1.5 MB), which the delivery
    process, using only ``recheck_at_delivery``, never loads."""
    # lazy: the email package, see above
    from relayd.policy import long_lines, signing, steps, unsubscribe

    return (
        ("priority", steps.classify),
        ("do_not_email", steps.suppress),
        ("rewrite", steps.rewrite),
        ("headers", steps.edit_headers),
        ("unsubscribe", unsubscribe.apply),
        (long_lines.STEP, long_lines.step),
        ("dkim", signing.sign),
    )


def build_policy(config: Config, dkim_keys: Mapping[str, bytes]) -> Policy:
    """Compile the policy slices of ``config``; ``dkim_keys`` maps a ``dkim[].private_key_file``
    (as a string) to its PEM, or, where a domain has one entry, the domain to its PEM.

    Entries of ``config.dkim`` without a usable key in ``dkim_keys`` are left out (the caller
    reads the key files and reports unreadable or unsuitable ones: ``read_dkim_keys``).
    """
    rules = tuple(
        CompiledRule(
            index=i, rule=r, header=r.header,
            pattern=re.compile(r.pattern) if r.pattern else None,
            subject=re.compile(r.subject) if r.subject else None,
            sender=re.compile(r.sender) if r.sender else None,
        )
        for i, r in enumerate(config.priority)
    )
    unsub = config.unsubscribe
    secret = unsub.secret.reveal().encode("utf-8") if unsub and unsub.secret else None
    signers: list[DkimSigner] = []
    for k in config.dkim:
        pem = dkim_keys.get(str(k.private_key_file), dkim_keys.get(k.domain))
        if pem is None:
            continue
        try:
            key = load_private_key(pem, k.algorithm)
        except DkimKeyError:
            continue
        signers.append(DkimSigner(k.domain.lower(), k.selector, str(k.algorithm), key))
    return Policy(sender=config.sender, headers=config.headers, rules=rules,
                  do_not_email=config.do_not_email, unsubscribe=unsub,
                  unsubscribe_secret=secret, dkim=tuple(signers))


def run_pipeline(policy: Policy, message: Message, ctx: PolicyContext) -> PipelineResult:
    """Apply every step in order; pure (no I/O, no clock, no logging)."""
    draft = Draft(envelope=message.envelope,
                  copies=(Copy(message.envelope.rcpt_tos, message.content),),
                  priority=message.envelope.priority)
    for _, step in steps_in_order():
        draft = step(draft, policy, ctx)
    outputs = tuple(
        Message(dataclasses.replace(draft.envelope, rcpt_tos=c.rcpts, priority=draft.priority),
                c.content)
        for c in draft.copies if c.rcpts
    )
    return PipelineResult(priority=draft.priority, why_priority=draft.why_priority,
                          rejected=draft.rejected, suppressed=draft.suppressed,
                          outputs=outputs, steps=draft.notes)


def is_listed(policy: Policy, rcpt: str, ctx: PolicyContext) -> bool:
    return rcpt.lower() in ctx.suppressed


def rcpt_decision(policy: Policy, mail_from: str, rcpt: str, ctx: PolicyContext) -> Reply | None:
    """At RCPT time: a 550 5.7.1 reply for a listed recipient when ``action: reject``.

    Only sender rules can make mail priority this early (headers and Subject arrive with
    DATA), so ``priority_bypass`` applies here when a ``sender`` rule matches MAIL FROM.
    Returns None to accept the recipient.
    """
    dne = policy.do_not_email
    if dne.action is not SuppressAction.REJECT or dne.bypass_all:
        return None
    if not is_listed(policy, rcpt, ctx):
        return None
    if dne.priority_bypass and any(r.sender and r.sender.search(mail_from) for r in policy.rules):
        return None
    return Reply(550, "5.7.1 Recipient is on the do-not-email list")


def recheck_at_delivery(policy: Policy, envelope: Envelope,
                        ctx: PolicyContext) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """At delivery: (recipients still allowed, recipients now suppressed).

    The list changes while mail waits in the spool; a recipient listed since acceptance is
    suppressed (never rejected: the message was already accepted), unless ``bypass_all`` or
    priority mail with ``priority_bypass``.
    """
    dne = policy.do_not_email
    if dne.bypass_all or (envelope.priority and dne.priority_bypass):
        return envelope.rcpt_tos, ()
    allowed = tuple(r for r in envelope.rcpt_tos if not is_listed(policy, r, ctx))
    dropped = tuple(r for r in envelope.rcpt_tos if is_listed(policy, r, ctx))
    return allowed, dropped


def log_summary(result: PipelineResult) -> str:
    """Short tags for the acceptance log line, e.g. ``policy=priority,rewrite,footer,dkim``."""
    tags: list[str] = []
    if result.priority:
        tags.append("priority")
    if result.suppressed:
        tags.append(f"suppressed={len(result.suppressed)}")
    if result.rejected:
        tags.append(f"rejected={len(result.rejected)}")
    texts = {(n.step, n.text) for n in result.steps}
    if any(s == "rewrite" and not t.startswith(("nothing", "From kept", "Reply-To kept"))
           for s, t in texts):
        tags.append("rewrite")
    if any(s == "headers" and not t.startswith("nothing") for s, t in texts):
        tags.append("headers")
    if any(s == "unsubscribe" and "footer added" in t for s, t in texts):
        tags.append("footer")
    if any(s == "unsubscribe" and t.startswith("List-Unsubscribe:") for s, t in texts):
        tags.append("list-unsubscribe")
    if any(s == "dkim" and t.startswith("signed") for s, t in texts):
        tags.append("dkim")
    return "policy=" + (",".join(tags) or "none")
