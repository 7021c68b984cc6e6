"""Splitting an accepted message by route: one part per route, each with its own envelope.

Runs after the pipeline, only with ``routes`` configured. The route is chosen on what the
pipeline made of the message (the envelope sender after rewriting, the From header domain,
priority), per recipient (``to_domain``); a route that changes the content (its own
``sender`` rewrite, ``envelope_from`` or ``dkim`` choice) has its part run through the
pipeline again with the route's settings, so that DKIM still signs last. Pure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from relayd.config.schema import Route, SenderConfig
from relayd.model import Message
from relayd.policy import _mime
from relayd.policy.pipeline import run_pipeline
from relayd.policy.records import Note, PipelineResult, Policy, PolicyContext
from relayd.routing.match import Facts, split


def route_policy(policy: Policy, route: Route) -> Policy:
    """``policy`` with the route's sender overrides and DKIM choice."""
    sender = policy.sender
    if route.sender is not None:
        rs = route.sender
        sender = SenderConfig(from_=rs.from_ or sender.from_,
                              reply_to=rs.reply_to or sender.reply_to,
                              envelope_from=rs.envelope_from or sender.envelope_from)
    dkim, forced = policy.dkim, False
    if route.dkim == "":
        dkim = ()
    elif route.dkim is not None:
        dkim, forced = tuple(s for s in policy.dkim if s.domain == route.dkim), True
    return dataclasses.replace(policy, sender=sender, dkim=dkim, dkim_forced=forced)


def facts_of(result: PipelineResult, user: str | None) -> Facts:
    """What routes match on, from the pipeline's first output."""
    first = result.outputs[0]
    header, _ = _mime.split_message(first.content)
    addr = _mime.first_address(_mime.Headers.parse(header).get("From"))
    return Facts(mail_from=first.envelope.mail_from,
                 from_header_domain=_mime.domain_of(addr) if addr else None,
                 user=user, priority=result.priority)


def split_by_route(routes: tuple[Route, ...], policies: Mapping[str, Policy], message: Message,
                   ctx: PolicyContext, result: PipelineResult) -> PipelineResult:
    """``result`` with its outputs split by route (each envelope naming its route)."""
    if not result.outputs:
        return result
    # Submission (the authenticating listener) records the user on the envelope; local mail
    # has none, so a ``user`` match never fits it.
    facts = facts_of(result, message.envelope.user or None)
    survivors = tuple(r for out in result.outputs for r in out.envelope.rcpt_tos)
    outputs: list[Message] = []
    notes = list(result.steps)
    for choice, rcpts in split(routes, facts, survivors):
        notes.append(Note("route", f"{choice.name} for {', '.join(rcpts)}: {choice.why}"))
        route_pol = policies.get(choice.name)
        if route_pol is not None:
            part = Message(dataclasses.replace(message.envelope, rcpt_tos=rcpts),
                           message.content)
            again = run_pipeline(route_pol, part, ctx)
            notes.extend(Note(f"route {choice.name}: {n.step}", n.text) for n in again.steps
                         if n.step in ("rewrite", "dkim"))
            produced = again.outputs
        else:
            members = set(rcpts)
            produced = tuple(
                dataclasses.replace(out, envelope=dataclasses.replace(
                    out.envelope, rcpt_tos=tuple(r for r in out.envelope.rcpt_tos if r in members)))
                for out in result.outputs if members.intersection(out.envelope.rcpt_tos))
        outputs.extend(dataclasses.replace(out, envelope=dataclasses.replace(
            out.envelope, route=choice.name)) for out in produced)
    return dataclasses.replace(result, outputs=tuple(outputs), steps=tuple(notes))

