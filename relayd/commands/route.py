"""``relayd route test --from ADDR --to ADDR… [--user NAME] [--json]``: which route each
recipient takes, and what that route does.

Prints, per recipient, the route chosen (or ``default``) and why, its smarthosts in order
with their own limits (``daily_cap``, ``rate``), ``on_cap``, and the reply rules that would
apply to each smarthost's replies. Reads only the config: sends and writes nothing, and never
prints a secret. The sender is rewritten as the pipeline would (``sender.envelope_from``,
``sender.from`` with ``mode: always``) before it is matched; without a message, the From
header is taken to be the (rewritten) sender.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from relayd.commands.io import IO
from relayd.config.schema import Config, RewriteMode, Smarthost
from relayd.routing.match import Choice, Facts, choose, domain_of, smarthosts_of
from relayd.routing.rules import rules_for


def rewritten_sender(cfg: Config, sender: str) -> str:
    """The envelope sender the pipeline would send (relayd/policy/steps.py: rewrite)."""
    if sender == "":
        return sender  # the null sender stays null (RFC 5321 §4.5.5)
    if cfg.sender.envelope_from:
        return cfg.sender.envelope_from
    if cfg.sender.from_ is not None and cfg.sender.from_.mode is RewriteMode.ALWAYS:
        return cfg.sender.from_.address
    return sender


def _host(cfg: Config, sh: Smarthost) -> dict[str, Any]:
    return {"name": sh.name, "relay": sh.relay, "daily_cap": sh.daily_cap,
            "rate": str(sh.rate) if sh.rate is not None else None,
            "rules": list(rules_for(cfg.reply_rules, sh))}


def plan(cfg: Config, facts: Facts, rcpt: str) -> dict[str, Any]:
    """The route test of one recipient, as the JSON object printed for it."""
    choice: Choice = choose(cfg.routes, facts, rcpt)
    hosts = smarthosts_of(cfg.smarthosts, choice.route)
    return {"recipient": rcpt, "route": choice.name, "why": choice.why,
            "on_cap": choice.route.on_cap.value if choice.route is not None else "wait",
            "smarthosts": [_host(cfg, sh) for sh in hosts],
            "global_limits": {"daily_cap": cfg.limits.daily_cap,
                              "rate": str(cfg.limits.rate) if cfg.limits.rate else None}}


def _text(p: dict[str, Any]) -> list[str]:
    out = [f"{p['recipient']}: route {p['route']} ({p['why']})"]
    for i, sh in enumerate(p["smarthosts"], 1):
        own = [f"daily_cap {sh['daily_cap']}"] if sh["daily_cap"] is not None else []
        own += [f"rate {sh['rate']}"] if sh["rate"] is not None else []
        out.append(f"  {i}. {sh['relay']}: {', '.join(own) or 'no limits of its own'}")
        out.append(f"     reply rules: {', '.join(sh['rules']) or 'none'}")
    g = p["global_limits"]
    out.append(f"  on_cap: {p['on_cap']}; global limits: daily_cap {g['daily_cap'] or 'none'}, "
               f"rate {g['rate'] or 'none'}")
    return out


def main(args: argparse.Namespace, io: IO) -> int:
    cfg = io.config(args)
    sender = rewritten_sender(cfg, args.from_)
    facts = Facts(mail_from=sender, from_header_domain=domain_of(sender) or None,
                  user=args.user)
    plans = [plan(cfg, facts, rcpt) for rcpt in args.to]
    if args.json:
        print(json.dumps(plans, indent=2), file=io.out)
        return 0
    if not cfg.routes:
        print("no routes configured: every message takes route default (all smarthosts in "
              "order)", file=io.out)
    print(f"from <{args.from_}>" + (f" (rewritten to <{sender}>)" if sender != args.from_ else "")
          + (f", user {args.user}" if args.user else ""), file=io.out)
    for p in plans:
        for line in _text(p):
            print(line, file=io.out)
    return 0
