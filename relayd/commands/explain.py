"""``relayd explain [FILE] [--from ADDR] [--to ADDR...]``: a dry run of the policy.

Reads one message (file or stdin), runs the same pure pipeline the daemon runs at acceptance
and prints every decision, a header diff of the rewrites, the cap state from the persisted
counter and the delivery plan. It sends nothing and writes nothing (the do-not-email list and
the cap counter are opened read-only). With ``shared_state`` the list and the cap are the
fleet's, read from its database (``relayd.shared``, imported only then). No secret is
printed: auth shows the method only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sqlite3
import time
from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from relayd.commands.io import IO
from relayd.config.schema import AuthMethod, Config, Smarthost
from relayd.delivery.limits import DailyCap, limited
from relayd.errors import StateUnavailable
from relayd.model import Envelope, Message
from relayd.policy import _mime
from relayd.policy.acceptance import load_dkim_keys
from relayd.policy.by_route import route_policy, split_by_route
from relayd.policy.pipeline import build_policy, run_pipeline
from relayd.policy.records import PipelineResult, PolicyContext
from relayd.policy.suppressions import read_snapshot
from relayd.routing.match import find, smarthosts_of

if TYPE_CHECKING:  # the type only: psycopg is imported for a relay in a fleet only
    from relayd.shared.db import SharedDB


def _read_input(args: argparse.Namespace, io: IO) -> bytes:
    if args.file:
        with open(args.file, "rb") as fh:
            data = fh.read()
    else:
        buffer = getattr(io.stdin, "buffer", None)
        data = buffer.read() if buffer is not None else io.stdin.read().encode("utf-8")
    # Submissions arrive with CRLF (RFC 5321 §2.3.8); files written by hand usually have LF.
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _envelope(args: argparse.Namespace, content: bytes, now: float) -> Envelope:
    h = _mime.Headers.parse(_mime.split_message(content)[0])
    sender = args.from_ or _mime.first_address(h.get("From")) or ""
    rcpts = list(args.to or []) or _mime.all_addresses(
        h.get_all("To") + h.get_all("Cc") + h.get_all("Bcc"))
    return Envelope(mail_from=sender, rcpt_tos=tuple(dict.fromkeys(rcpts)), client="explain",
                    received_at=now)


def _user_lines(cfg: Config, name: str, message: Message) -> tuple[list[str], Message]:
    """``--user NAME``: the sender authorization a submission session of NAME would meet
    (relayd/users/authorize.py), and the user's limits. No hash is printed."""
    # lazy: the users room only for --user
    from relayd.errors import ConfigError
    from relayd.users import authorize
    from relayd.users.store import read_users

    if cfg.users_file is None:
        return [f"user {name}: users_file is not set in the config"], message
    try:
        user = read_users(cfg.users_file).get(name)
    except ConfigError as exc:
        return [f"user {name}: {p}" for p in exc.problems], message
    if user is None:
        return [f"user {name}: no such user in {cfg.users_file} (AUTH would get 535 5.7.8)"], \
            message
    env = message.envelope
    why = (authorize.check_envelope(user.allowed_from, env.mail_from)
           or authorize.check_header(user.allowed_from, message.content))
    lines = [f"user:            {name}{' (disabled: AUTH gets 535 5.7.8)' if user.disabled else ''}",
             f"  allowed_from:  {', '.join(user.allowed_from) or '(none)'}",
             "  sender:        " + ("ok" if why is None else f"{authorize.REFUSAL} ({why})"),
             f"  daily_cap:     {user.daily_cap if user.daily_cap is not None else '-'}",
             f"  rate:          {user.rate if user.rate is not None else '-'}",
             f"  priority:      {'yes' if user.priority else 'no'}"]
    message = Message(dataclasses.replace(env, user=name, priority=env.priority or user.priority),
                      message.content)
    return lines, message


def _dkim_keys(cfg: Config, problems: list[str]) -> dict[str, bytes]:
    keys, found = load_dkim_keys(cfg)
    problems.extend(found)
    return keys


def header_diff(before: bytes, after: bytes) -> list[str]:
    """``- Name: value`` for fields gone, ``+ Name: value`` for fields new (order kept)."""
    old = _mime.Headers.parse(_mime.split_message(before)[0])
    new = _mime.Headers.parse(_mime.split_message(after)[0])
    old_count, new_count = Counter(old.fields), Counter(new.fields)
    lines: list[str] = []
    for f in old.fields:
        if new_count[f] > 0:
            new_count[f] -= 1
        else:
            lines.append("- " + _show(f))
    old_count = Counter(old.fields)
    for f in new.fields:
        if old_count[f] > 0:
            old_count[f] -= 1
        else:
            lines.append("+ " + _show(f))
    return lines


def _show(field: bytes) -> str:
    name = _mime.field_name(field)
    text = field.decode("utf-8", "replace").rstrip("\r\n").replace("\r\n", "\n    ")
    if name == "dkim-signature" and len(text) > 100:
        return text.split("\n")[0][:100] + " ..."
    return text


def _fmt_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render(cfg: Config, message: Message, result: PipelineResult, now: float,
           problems: list[str], fleet: SharedDB | None = None) -> list[str]:
    """The explain report as lines (``main`` reads the inputs and prints); the daily cap's
    count is read here, from ``fleet`` (the fleet's database) with ``shared_state``."""
    env = message.envelope
    out = [f"message: {len(message.content)} bytes, from=<{env.mail_from}>, "
           f"to={', '.join(f'<{r}>' for r in env.rcpt_tos) or '(none)'}"]
    out += [f"warning: {p}" for p in problems]
    for note in result.steps:
        out.append(f"{note.step}: {note.text}")
    if result.outputs:
        first = result.outputs[0]
        out.append("header diff" + (" (first copy; copies differ only in their token)"
                                    if len(result.outputs) > 1 else "") + ":")
        diff = header_diff(message.content, first.content)
        out += [f"  {line}" for line in diff] or ["  (no header changes)"]
        out.append(f"envelope upstream: MAIL FROM <{first.envelope.mail_from}>")
        for m in result.outputs[:10]:
            out.append(f"  copy of {len(m.content)} bytes to {', '.join(m.envelope.rcpt_tos)}")
        if len(result.outputs) > 10:
            out.append(f"  ... and {len(result.outputs) - 10} more copies")
    else:
        out.append("nothing to deliver: every recipient is suppressed or rejected")
    out += _limits(cfg, result, now, fleet)
    if not cfg.routes:
        return out + _plan(cfg.smarthosts, "delivery plan (tried in order):")
    for name in dict.fromkeys(m.envelope.route for m in result.outputs):
        rcpts = [r for m in result.outputs if m.envelope.route == name for r in m.envelope.rcpt_tos]
        route = find(cfg, name)
        head = (f"delivery plan, route {name} for {', '.join(rcpts)} (tried in order"
                + (f", on_cap: {route.on_cap.value}" if route is not None else "") + "):")
        out += _plan(smarthosts_of(cfg.smarthosts, route), head)
    return out


def _limits(cfg: Config, result: PipelineResult, now: float, fleet: SharedDB | None) -> list[str]:
    lim = cfg.limits
    out: list[str] = []
    exempt = not limited(lim, result.priority)
    rcpts = sum(len(m.envelope.rcpt_tos) for m in result.outputs)
    if lim.daily_cap is None:
        out.append("daily cap: none")
    elif fleet is not None:
        out.append(_fleet_cap(fleet, lim.daily_cap, rcpts, exempt, now))
    else:
        try:
            cap = DailyCap(lim.daily_cap, cfg.state_dir, readonly=True)
            used, remaining = cap.used(now), cap.remaining(now)
        except sqlite3.Error as exc:
            out.append(f"daily cap: {lim.daily_cap} (counter unreadable: {exc})")
            return out
        line = (f"daily cap: {used} of {lim.daily_cap} used in the last 24 h, "
                f"{remaining} remaining")
        if exempt:
            line += "; priority mail is exempt (priority_exempt)"
        elif remaining >= rcpts:
            line += f"; these {rcpts} recipient(s) would go now"
        else:
            at = cap.next_free_at(now, rcpts)
            line += ("; would wait in the spool" +
                     (f" until about {_fmt_time(at)}" if at is not None else ""))
        out.append(line)
    if lim.rate is None:
        out.append("rate: no limit")
    else:
        out.append(f"rate: {lim.rate.per_second:g}/s (burst {max(1.0, lim.rate.per_second):g})"
                   + ("; priority mail is exempt" if exempt else ""))
    return out


def _fleet_cap(db: SharedDB, cap: int, rcpts: int, exempt: bool, now: float) -> str:
    """The daily cap's line in a fleet: the whole fleet's count, from its database."""
    # lazy: psycopg only for a relay in a fleet (test_command_imports.py checks)
    from relayd.delivery.limits import WINDOW
    from relayd.shared.cap import SharedDailyCap

    try:
        used, in_flight, at = SharedDailyCap(db, cap, window=WINDOW).state(now, rcpts)
    except StateUnavailable as exc:
        return (f"daily cap: {cap} for the fleet (shared_state: {exc}); deliveries that need "
                "the cap would wait in the spool until the database answers")
    remaining = max(0, cap - used - in_flight)
    line = (f"daily cap: {used} of {cap} used by the fleet in the last 24 h"
            + (f", {in_flight} held for deliveries under way" if in_flight else "")
            + f", {remaining} remaining (shared_state, node {db.node})")
    if exempt:
        return line + "; priority mail is exempt (priority_exempt)"
    if remaining >= rcpts:
        return line + f"; these {rcpts} recipient(s) would go now"
    return line + "; would wait in the spool" + (f" until about {_fmt_time(at)}" if at is not None else "")


def _plan(smarthosts: tuple[Smarthost, ...], head: str) -> list[str]:
    out = [head]
    for i, sh in enumerate(smarthosts, 1):
        if sh.outbox is not None:
            out.append(f"  {i}. {sh.name}: write an .eml file to {sh.outbox} (no SMTP)")
            continue
        auth = sh.auth.method.value
        if sh.auth.method is AuthMethod.XOAUTH2 and sh.auth.oauth is not None:
            auth += f" (oauth provider {sh.auth.oauth.provider.value})"
        verify = "" if sh.verify_certificate else ", certificate NOT verified"
        own = "".join(f", {k} {v}" for k, v in (("daily_cap", sh.daily_cap), ("rate", sh.rate))
                      if v is not None)
        out.append(f"  {i}. {sh.name}: {sh.host}:{sh.port}, tls={sh.tls.value}{verify}, "
                   f"auth={auth}{own}")
    return out


def main(args: argparse.Namespace, io: IO) -> int:
    cfg = io.config(args)
    try:
        content = _read_input(args, io)
    except OSError as exc:
        print(f"relayd: cannot read {args.file}: {exc.strerror or exc}", file=io.err)
        return 1
    now = time.time()
    problems: list[str] = []
    keys = _dkim_keys(cfg, problems)
    fleet = None
    if cfg.shared_state is not None:
        # lazy: psycopg only for a relay in a fleet (test_command_imports.py checks)
        from relayd.shared.db import SharedDB as FleetDB

        fleet = FleetDB(cfg.shared_state)
    try:
        suppressed = _suppressed(cfg, fleet, problems)
        return _report(cfg, args, io, content, now, problems, keys, suppressed, fleet)
    finally:
        if fleet is not None:
            fleet.close()


def _suppressed(cfg: Config, fleet: SharedDB | None, problems: list[str]) -> frozenset[str]:
    """The do-not-email list the relay would check: the fleet's with ``shared_state`` (or,
    while its database cannot be reached, this node's last copy of it, as the daemon does)."""
    if fleet is None:
        try:
            return read_snapshot(cfg.state_dir)
        except sqlite3.Error as exc:
            problems.append(f"do-not-email list unreadable: {exc}")
            return frozenset()
    # lazy: see main
    from relayd.shared.suppressions import SharedSuppressions

    listed = SharedSuppressions(fleet, cache_dir=cfg.state_dir)
    try:
        return frozenset(listed.list())
    except StateUnavailable as exc:
        problems.append(f"do-not-email list: shared_state: {exc}; this node's last copy of the "
                        "fleet's list is used")
        return listed.last_seen()


def _report(cfg: Config, args: argparse.Namespace, io: IO, content: bytes, now: float,
            problems: list[str], keys: dict[str, bytes], suppressed: frozenset[str],
            fleet: SharedDB | None) -> int:
    message = Message(_envelope(args, content, now), content)
    if getattr(args, "user", None):
        lines, message = _user_lines(cfg, args.user, message)
        for line in lines:
            print(line, file=io.out)
    policy = build_policy(cfg, keys)
    ctx = PolicyContext(now=now, suppressed=suppressed)
    result = run_pipeline(policy, message, ctx)
    if cfg.routes:
        policies = {r.name: route_policy(policy, r) for r in cfg.routes if r.changes_content}
        result = split_by_route(cfg.routes, policies, message, ctx, result)
    for line in render(cfg, message, result, now, problems, fleet):
        print(line, file=io.out)
    return 0
