"""``relayd send-test``: send one test message now through the configured smarthost(s).

Bypasses the spool and needs no daemon: builds a small message, delivers it with the same
forwarder the daemon uses (same TLS, AUTH and timeouts from the config file), prints the
SMTP conversation with secrets redacted and, on failure, a plain-language diagnosis
(``relayd.delivery.diagnose``). Tries the named smarthost, or each in order until one works.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
from email.utils import formatdate, make_msgid

from relayd.commands.io import IO
from relayd.config.schema import DEFAULT_ROUTE, AuthMethod, Config, Smarthost
from relayd.delivery.diagnose import diagnose
from relayd.delivery.smtp.pool import SmarthostPool
from relayd.model import DeliveryResult, Status, TokenSource
from relayd.routing import match

EXIT_DELIVERED = 0
EXIT_FAILED = 1


def pick_sender(config: Config, smarthost: Smarthost, explicit: str | None) -> str:
    """--from, else the envelope sender, else the authenticated mailbox, else relayd@hostname.

    The authenticated mailbox comes before sender.from because Office 365 and Gmail refuse a
    From that is not the login (SendAsDenied).
    """
    if explicit:
        return explicit
    if config.sender.envelope_from:
        return config.sender.envelope_from
    user = smarthost.auth.username or ""
    if "@" in user:
        return user
    if config.sender.from_ is not None:
        return config.sender.from_.address
    return f"relayd@{config.hostname}"


def build_message(config: Config, smarthost: Smarthost, sender: str, to: str) -> bytes:
    """A short 7-bit test message with CRLF line ends."""
    lines = [
        f"From: <{sender}>",
        f"To: <{to}>",
        f"Subject: relayd test message via {smarthost.name}",
        f"Date: {formatdate(localtime=True)}",
        f"Message-ID: {make_msgid(domain=config.hostname)}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Transfer-Encoding: 7bit",
        "Auto-Submitted: auto-generated",
        "X-Mailer: relayd send-test",
        "",
        f"This test message was sent by 'relayd send-test' on {config.hostname}",
        f"through the smarthost {smarthost.relay}.",
        "",
        "If you can read this, relayd can deliver mail through that smarthost.",
    ]
    return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")


def _token_source(config: Config, smarthost: Smarthost) -> tuple[TokenSource | None, str]:
    """The XOAUTH2 token source for an ``auth.method: xoauth2`` smarthost, else None."""
    if smarthost.auth.method is not AuthMethod.XOAUTH2:
        return None, ""
    # lazy: OAuth brings cryptography and a provider's HTTP library (MSAL, google-auth or
    # requests: tens of MB), which a send-test through any other smarthost does not need
    from relayd.oauth.source import build_token_source

    try:
        source: TokenSource = build_token_source(smarthost, state_dir=config.state_dir,
                                                 key_file=config.secrets.key_file)
    except Exception as exc:  # the OAuth settings are unusable: report, do not crash
        return None, f"cannot set up OAuth: {exc}"
    return source, ""


def _secrets_of(smarthost: Smarthost) -> list[str]:
    """Every form in which this smarthost's secrets could appear, for a last scrub."""
    out: list[str] = []
    auth = smarthost.auth
    if auth.password is not None and auth.password.reveal():
        pw = auth.password.reveal()
        out += [pw, base64.b64encode(pw.encode()).decode()]
        user = (auth.username or "").encode()
        out.append(base64.b64encode(b"\0" + user + b"\0" + pw.encode()).decode())
    if auth.oauth is not None and auth.oauth.client_secret is not None:
        out.append(auth.oauth.client_secret.reveal())
    return [s for s in out if len(s) >= 3]


class _Printer:
    def __init__(self, io: IO, secrets: list[str]) -> None:
        self._io = io
        self._secrets = secrets

    def __call__(self, line: str = "") -> None:
        for s in self._secrets:
            line = line.replace(s, "<redacted>")
        print(line, file=self._io.out, flush=True)


async def _try(config: Config, smarthost: Smarthost, sender: str, to: str,
               out: _Printer) -> bool:
    auth = smarthost.auth
    desc = "outbox" if smarthost.outbox is not None else (
        f"tls: {smarthost.tls.value}, auth: {auth.method.value}"
        + (f" as {auth.username}" if auth.username and auth.method is not AuthMethod.NONE else ""))
    out(f"== smarthost {smarthost.relay} ({desc})")
    out(f"   from <{sender}> to <{to}>")
    token_source, oauth_problem = _token_source(config, smarthost)
    if oauth_problem:
        out(f"   error: {oauth_problem}")
        out("   result: not sent")
        out("   meaning: this smarthost uses XOAUTH2 but no access token can be obtained.")
        out("   fix: run 'relayd oauth token --smarthost "
            f"{smarthost.name}' to see why.")
        return False
    silent = logging.Logger("relayd.commands.send_test")  # not registered: transcripts only go to stdout
    silent.addHandler(logging.NullHandler())
    pool = SmarthostPool(smarthost, hostname=config.hostname, token_source=token_source,
                         transcripts=True, logger=silent)
    try:
        result = await pool.deliver("send-test", build_message(config, smarthost, sender, to),
                                    sender, [to])
    finally:
        await pool.aclose()
    for line in result.transcript:
        out(f"   {line}")
    return _report(result, out)


def _report(result: DeliveryResult, out: _Printer) -> bool:
    outcome = result.outcomes[0]
    if outcome.status is Status.SENT:
        out(f"   result: delivered ({outcome.reply})")
        return True
    word = ("temporary error (the daemon would keep the mail and retry)"
            if outcome.status is Status.DEFERRED else "permanent error")
    out(f"   result: NOT delivered, {word}: {outcome.reply}")
    if result.error and f"error: {result.error}" not in result.transcript:
        out(f"   error: {result.error}")
    found = diagnose(outcome.reply, result.error)
    if found is not None:
        out(f"   meaning: {found.meaning}")
        out(f"   fix: {found.fix}")
    return False


def main(args: argparse.Namespace, io: IO) -> int:
    """``relayd send-test --to ADDR [--smarthost NAME | --route NAME] [--from ADDR]``: 0
    delivered, 1 failed. ``--route`` tries the route's smarthosts in its order, with the
    route's ``envelope_from`` as the sender unless ``--from`` is given."""
    config = io.config(args)
    route_sender: str | None = None
    if getattr(args, "route", None):
        if args.smarthost:
            print("relayd send-test: give --smarthost or --route, not both", file=io.err)
            return EXIT_FAILED
        found = match.find(config, args.route)
        if found is None and args.route != DEFAULT_ROUTE:
            known = ", ".join([r.name for r in config.routes] + [DEFAULT_ROUTE])
            print(f"relayd send-test: no route named {args.route!r} (known: {known})",
                  file=io.err)
            return EXIT_FAILED
        targets: tuple[Smarthost, ...] = match.smarthosts_of(config.smarthosts, found)
        route_sender = found.sender.envelope_from if found and found.sender else None
    elif args.smarthost:
        try:
            targets = (config.smarthost(args.smarthost),)
        except KeyError as exc:
            print(f"relayd send-test: {exc.args[0]}", file=io.err)
            return EXIT_FAILED
    else:
        targets = config.smarthosts
    secrets = [s for sh in targets for s in _secrets_of(sh)]
    out = _Printer(io, secrets)

    async def run() -> bool:
        for sh in targets:
            sender = pick_sender(config, sh, args.from_ or route_sender)
            if await _try(config, sh, sender, args.to, out):
                return True
            out()
        return False

    delivered = asyncio.run(run())
    out("send-test: delivered" if delivered else "send-test: NOT delivered")
    return EXIT_DELIVERED if delivered else EXIT_FAILED
