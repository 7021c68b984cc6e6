"""``relayd explain [FILE] [--from ADDR] [--to ADDR...]``: a dry run of the policy.

Reads one message (file or stdin), runs the same pure pipeline the daemon runs at acceptance
and prints every decision, a header diff of the rewrites, the cap state from the persisted
counter and the delivery plan. It sends nothing and writes nothing (the do-not-email list and
the cap counter are opened read-only). No secret is printed: auth shows the method only.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from collections import Counter
from datetime import UTC, datetime

from relayd.commands.io import IO
from relayd.config.schema import AuthMethod, Config
from relayd.delivery.limits import DailyCap, limited
from relayd.model import Envelope, Message
from relayd.policy import _mime
from relayd.policy.acceptance import load_dkim_keys
from relayd.policy.pipeline import build_policy, run_pipeline
from relayd.policy.records import PipelineResult, PolicyContext
from relayd.policy.suppressions import read_snapshot


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
           problems: list[str]) -> list[str]:
    """The explain report as lines (pure; ``main`` reads the inputs and prints)."""
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
    out += _limits(cfg, result, now)
    out += _plan(cfg)
    return out


def _limits(cfg: Config, result: PipelineResult, now: float) -> list[str]:
    lim = cfg.limits
    out: list[str] = []
    exempt = not limited(lim, result.priority)
    rcpts = sum(len(m.envelope.rcpt_tos) for m in result.outputs)
    if lim.daily_cap is None:
        out.append("daily cap: none")
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


def _plan(cfg: Config) -> list[str]:
    out = ["delivery plan (tried in order):"]
    for i, sh in enumerate(cfg.smarthosts, 1):
        if sh.outbox is not None:
            out.append(f"  {i}. {sh.name}: write an .eml file to {sh.outbox} (no SMTP)")
            continue
        auth = sh.auth.method.value
        if sh.auth.method is AuthMethod.XOAUTH2 and sh.auth.oauth is not None:
            auth += f" (oauth provider {sh.auth.oauth.provider.value})"
        verify = "" if sh.verify_certificate else ", certificate NOT verified"
        out.append(f"  {i}. {sh.name}: {sh.host}:{sh.port}, tls={sh.tls.value}{verify}, "
                   f"auth={auth}")
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
    try:
        suppressed = read_snapshot(cfg.state_dir)
    except sqlite3.Error as exc:
        problems.append(f"do-not-email list unreadable: {exc}")
        suppressed = frozenset()
    message = Message(_envelope(args, content, now), content)
    policy = build_policy(cfg, keys)
    result = run_pipeline(policy, message, PolicyContext(now=now, suppressed=suppressed))
    for line in render(cfg, message, result, now, problems):
        print(line, file=io.out)
    return 0
