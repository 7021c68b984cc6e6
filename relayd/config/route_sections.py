"""Builders for the routing keys: ``routes`` and ``reply_rules`` (each problem path-named).

Kept beside ``sections.py`` rather than in it: a route refers to other sections (smarthost
names, ``dkim`` domains, ``listen``), so it is checked against them here, after they are read.
"""

from __future__ import annotations

import re
from typing import Any

from relayd.config.reader import Reader
from relayd.config.schema import (
    DEFAULT_ROUTE,
    DkimKey,
    OnCap,
    ReplyAction,
    ReplyRule,
    Route,
    RouteMatch,
    SenderConfig,
    Smarthost,
)
from relayd.config.sections import _rewrite
from relayd.units import HostPort

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_DSN = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_ROUTE_KEYS = {"name", "match", "smarthosts", "on_cap", "envelope_from", "sender", "dkim"}
_MATCH_KEYS = {"from", "from_header_domain", "to_domain", "user", "priority"}
_LOOPBACK = ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::")


def _words(r: Reader, p: str, value: Any) -> list[tuple[str, str]]:
    """A string or a list of strings, each with its path."""
    if isinstance(value, str):
        return [(p, value)]
    return [(f"{p}[{i}]", v) for i, v in enumerate(r.sequence(p, value) or [])
            if r.string(f"{p}[{i}]", v) is not None]


def _domain(r: Reader, p: str, value: Any) -> str | None:
    text = str(value).strip().lstrip("@").lower()
    if not text:
        r.fail(p, "must be a domain name")
        return None
    return r.hostname(p, text)


def _match(r: Reader, p: str, value: Any) -> RouteMatch:
    m = r.section(p, value, _MATCH_KEYS) or {}
    senders: list[str] = []
    for q, v in _words(r, f"{p}.from", m.get("from")):
        text = str(v).strip().lower()
        if text.startswith("@"):
            if _domain(r, q, text) is not None:
                senders.append(text)
        elif (addr := r.address(q, text)) is not None:
            if "@" not in addr:
                r.fail(q, f"must be an address or @domain (got {text!r})")
            else:
                senders.append(addr.lower())
    header_domains = [d for q, v in _words(r, f"{p}.from_header_domain",
                                           m.get("from_header_domain"))
                      if (d := _domain(r, q, v)) is not None]
    to_domains = [d for q, v in _words(r, f"{p}.to_domain", m.get("to_domain"))
                  if (d := _domain(r, q, v)) is not None]
    users = [str(v) for _, v in _words(r, f"{p}.user", m.get("user"))]
    priority = (r.boolean(f"{p}.priority", m["priority"], True)
                if m.get("priority") is not None else None)
    return RouteMatch(from_=tuple(senders), from_header_domain=tuple(header_domains),
                      to_domain=tuple(to_domains), user=tuple(users), priority=priority)


def _loops(sh: Smarthost, listen: tuple[HostPort, ...]) -> bool:
    """The smarthost is relayd's own listener: mail sent there comes straight back."""
    if sh.host is None:
        return False
    host = sh.host.strip("[]").lower()
    return any(sh.port == hp.port and (host == hp.host.strip("[]").lower()
                                       or (host in _LOOPBACK and hp.host.strip("[]") in _LOOPBACK))
               for hp in listen)


def _shadowed_by(route: RouteMatch, earlier: RouteMatch) -> bool:
    """Every message ``route`` matches, ``earlier`` matched first (a catch-all, or the same
    conditions)."""
    return earlier.catch_all or earlier == route


def routes_section(r: Reader, value: Any, smarthosts: tuple[Smarthost, ...],
                   dkim: tuple[DkimKey, ...], listen: tuple[HostPort, ...]) -> tuple[Route, ...]:
    by_name = {s.name: s for s in smarthosts}
    known = ", ".join(by_name) or "none"
    routes: list[Route] = []
    names: set[str] = set()
    for i, item in enumerate(r.sequence("routes", value) or []):
        p = f"routes[{i}]"
        m = r.section(p, item, _ROUTE_KEYS)
        if m is None:
            continue
        name = r.string(f"{p}.name", m.get("name"), max_len=64)
        if name is None:
            if m.get("name") is None:
                r.fail(f"{p}.name", "is required (it names the route in the log and metrics)")
            name = f"route{i}"
        elif not _NAME.match(name):
            r.fail(f"{p}.name", f"may only use letters, digits, '_', '.', '-' (got {name!r})")
        elif name == DEFAULT_ROUTE:
            r.fail(f"{p}.name", f"{DEFAULT_ROUTE!r} is reserved for mail that no route matches")
        elif name in names:
            r.fail(f"{p}.name", f"{name!r} is used twice; route names must be unique")
        names.add(name)
        if m.get("match") is None:
            r.fail(f"{p}.match", "is required (use match: {} for a route that takes every "
                   "message)")
        match = _match(r, f"{p}.match", m.get("match"))
        hosts: list[str] = []
        listed = r.sequence(f"{p}.smarthosts", m.get("smarthosts")) or []
        if m.get("smarthosts") is None or (isinstance(m.get("smarthosts"), list) and not listed):
            r.fail(f"{p}.smarthosts", "needs at least one name from smarthosts")
        for j, v in enumerate(listed):
            q = f"{p}.smarthosts[{j}]"
            sh_name = r.string(q, v)
            if sh_name is None:
                continue
            if sh_name not in by_name:
                r.fail(q, f"no smarthost named {sh_name!r} (known: {known})")
            elif sh_name in hosts:
                r.fail(q, f"{sh_name!r} is listed twice: a loop back to a smarthost already "
                       "tried for this mail")
            elif _loops(by_name[sh_name], listen):
                r.fail(q, f"{sh_name!r} is relayd's own listen address: mail would loop")
            else:
                hosts.append(sh_name)
        sender = _route_sender(r, p, m)
        signer: str | None = None
        if m.get("dkim") is False:
            signer = ""
        elif m.get("dkim") is not None:
            signer = (r.string(f"{p}.dkim", m["dkim"]) or "").lower().lstrip("@")
            if signer not in {k.domain for k in dkim}:
                r.fail(f"{p}.dkim", f"no dkim entry for domain {signer!r} (give a dkim[].domain, "
                       "or false to leave the route's mail unsigned)")
        route = Route(name=name, match=match, smarthosts=tuple(hosts),
                      on_cap=r.choice(f"{p}.on_cap", m.get("on_cap"), OnCap, OnCap.WAIT),
                      sender=sender, dkim=signer)
        for k, earlier in enumerate(routes):
            if _shadowed_by(match, earlier.match):
                why = "matches every message" if earlier.match.catch_all else "has the same match"
                r.warn(p, f"is never used: routes[{k}] ({earlier.name}) {why} and comes first")
                break
        routes.append(route)
    return tuple(routes)


def _route_sender(r: Reader, p: str, m: dict[str, Any]) -> SenderConfig | None:
    """The route's ``sender`` (from, reply_to, envelope_from) and ``envelope_from`` keys."""
    if m.get("sender") is None and m.get("envelope_from") is None:
        return None
    s = r.section(f"{p}.sender", m.get("sender"), {"from", "reply_to", "envelope_from"}) or {}
    if s.get("envelope_from") is not None and m.get("envelope_from") is not None:
        r.fail(f"{p}.envelope_from", f"give only one of {p}.envelope_from and "
               f"{p}.sender.envelope_from")
    envelope = (r.address(f"{p}.envelope_from", m["envelope_from"])
                if m.get("envelope_from") is not None
                else r.address(f"{p}.sender.envelope_from", s.get("envelope_from")))
    return SenderConfig(from_=_rewrite(r, f"{p}.sender.from", s.get("from")),
                        reply_to=_rewrite(r, f"{p}.sender.reply_to", s.get("reply_to")),
                        envelope_from=envelope)


def reply_rules_section(r: Reader, value: Any) -> tuple[ReplyRule, ...]:
    rules: list[ReplyRule] = []
    for i, item in enumerate(r.sequence("reply_rules", value) or []):
        p = f"reply_rules[{i}]"
        m = r.section(p, item, {"match", "action", "duration", "rate"})
        if m is None:
            continue
        cond = r.section(f"{p}.match", m.get("match"), {"code", "dsn", "text"}) or {}
        if not any(cond.get(k) is not None for k in ("code", "dsn", "text")):
            r.fail(f"{p}.match", "needs at least one of code, dsn, text")
        code = (r.integer(f"{p}.match.code", cond["code"], 400, 599)
                if cond.get("code") is not None else None)
        dsn = r.string(f"{p}.match.dsn", cond.get("dsn"))
        if dsn is not None and not _DSN.match(dsn):
            r.fail(f"{p}.match.dsn", f"must be an enhanced status code like 4.7.28 (got {dsn!r})")
        text = r.string(f"{p}.match.text", cond.get("text"))
        if text is not None:
            try:
                re.compile(text)
            except re.error as exc:
                r.fail(f"{p}.match.text", f"is not a valid regular expression: {exc}")
        if m.get("action") is None:
            r.fail(f"{p}.action", "is required: defer | pause_smarthost | slow_down | fail")
        action = r.choice(f"{p}.action", m.get("action"), ReplyAction, ReplyAction.DEFER)
        duration = (r.duration(f"{p}.duration", m["duration"], 0.0)
                    if m.get("duration") is not None else None)
        if action is ReplyAction.PAUSE_SMARTHOST and duration is None:
            r.fail(f"{p}.duration", "is required for action pause_smarthost")
        if duration is not None and action is ReplyAction.FAIL:
            r.fail(f"{p}.duration", "is not used with action fail")
        if m.get("rate") is not None and action is not ReplyAction.SLOW_DOWN:
            r.fail(f"{p}.rate", "is only used with action slow_down")
        rules.append(ReplyRule(action=action, code=code, dsn=dsn, text=text, duration=duration,
                               rate=r.rate(f"{p}.rate", m.get("rate")), name=p))
    return tuple(rules)
