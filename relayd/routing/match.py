"""Choosing a route: the first ``routes`` entry whose ``match`` fits, per recipient (pure).

A message's sender facts (envelope sender after rewriting, From header domain, the
authenticated user, priority) are the same for every recipient; only ``to_domain`` differs,
so a message whose recipients fall under different routes is split into one part per route
(``split``), each with its own envelope and queue ID. No I/O, no clock, no logging.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from relayd.config.schema import DEFAULT_ROUTE, Config, Route, RouteMatch, Smarthost


@dataclass(frozen=True, slots=True)
class Facts:
    """What a route can match on, for one message (recipients aside)."""

    mail_from: str
    from_header_domain: str | None = None
    user: str | None = None
    priority: bool = False


@dataclass(frozen=True, slots=True)
class Choice:
    """The route one recipient takes and why (``route`` None: ``default``)."""

    name: str
    route: Route | None
    why: str


def domain_of(address: str) -> str:
    """The lower-cased domain of ``address`` ("" for the null sender or a bare name)."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


def _from_matches(patterns: tuple[str, ...], mail_from: str) -> bool:
    sender = mail_from.lower()
    domain = "@" + domain_of(sender)
    return any(p == sender or (p.startswith("@") and p == domain) for p in patterns)


def explain_match(m: RouteMatch, facts: Facts, rcpt: str) -> str | None:
    """Why ``m`` fits (a short sentence), or None when a key does not."""
    why: list[str] = []
    if m.from_:
        if not _from_matches(m.from_, facts.mail_from):
            return None
        why.append(f"from <{facts.mail_from}>")
    if m.from_header_domain:
        if (facts.from_header_domain or "").lower() not in m.from_header_domain:
            return None
        why.append(f"From header domain {facts.from_header_domain}")
    if m.to_domain:
        if domain_of(rcpt) not in m.to_domain:
            return None
        why.append(f"to domain {domain_of(rcpt)}")
    if m.user:
        # Only mail submitted with AUTH (the submission listener) has a user.
        if facts.user is None or facts.user not in m.user:
            return None
        why.append(f"user {facts.user}")
    if m.priority is not None:
        if facts.priority is not m.priority:
            return None
        why.append("priority" if facts.priority else "not priority")
    return ", ".join(why) if why else "matches every message"


def choose(routes: Sequence[Route], facts: Facts, rcpt: str) -> Choice:
    """The first route whose match fits ``rcpt`` of a message with ``facts``."""
    for i, route in enumerate(routes):
        why = explain_match(route.match, facts, rcpt)
        if why is not None:
            return Choice(route.name, route, f"routes[{i}] ({route.name}): {why}")
    return Choice(DEFAULT_ROUTE, None, "no route matches: all smarthosts in order")


def split(routes: Sequence[Route], facts: Facts,
          rcpts: Sequence[str]) -> tuple[tuple[Choice, tuple[str, ...]], ...]:
    """The recipients grouped by route, in the order each route first appears."""
    groups: dict[str, tuple[Choice, list[str]]] = {}
    for rcpt in rcpts:
        choice = choose(routes, facts, rcpt)
        groups.setdefault(choice.name, (choice, []))[1].append(rcpt)
    return tuple((choice, tuple(members)) for choice, members in groups.values())


def find(config: Config, name: str) -> Route | None:
    """The route called ``name`` (None for ``default`` or a name no longer configured)."""
    return next((r for r in config.routes if r.name == name), None)


def smarthosts_of(smarthosts: Sequence[Smarthost], route: Route | None) -> tuple[Smarthost, ...]:
    """The route's smarthosts in its order (all of them, in order, for ``default``)."""
    if route is None:
        return tuple(smarthosts)
    by_name = {s.name: s for s in smarthosts}
    return tuple(by_name[n] for n in route.smarthosts if n in by_name)


_FROM = re.compile(rb"^from:[ \t]*((?:.*)(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_ANGLE = re.compile(r"<([^<>@\s]+@[^<>\s]+)>")
_BARE = re.compile(r"([^\s<>\"(),;:]+@[^\s<>\"(),;:]+)")


def header_from_domain(content: bytes) -> str | None:
    """The domain of the From header's first address (the header block only; None if absent).

    A light reading for the delivery process, which never loads the email package; the
    accepting process reads the same with relayd/policy/_mime.py."""
    end = content.find(b"\r\n\r\n")
    head = content if end < 0 else content[:end + 2]
    m = _FROM.search(head)
    if m is None:
        return None
    value = m.group(1).decode("utf-8", "replace")
    found = _ANGLE.search(value) or _BARE.search(value)
    return domain_of(found.group(1)) or None if found else None
