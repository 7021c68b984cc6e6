"""Hostile envelopes and AUTH attempts on the loopback listener, as the operator meets them:
`relayd run` with a real config file, a fake smarthost, a client writing raw bytes, and only
what a person sees: the replies, what arrives upstream, and the log file's bytes.

Complements test_hostile_input.py (the listener in-process) and test_command_syntax.py (bare
CR and LF in command lines).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

from tests.support.operator import Operator
from tests.support.relay import upstream_smarthost, wait_until
from tests.support.smtpclient import RawClient
from tests.support.upstream import Upstreams

# Not a Mailbox relayd forwards (RFC 5321 §4.1.2): control characters (NUL, TAB), a quoted
# local part hiding a second "@" (valid syntax, but the classic parse differential between
# hops: refused with 553 "mailbox name not allowed"), a domain ending in a dot.
HOSTILE = {
    "NUL": "app\x00evil@example.com",
    "TAB": "app\tevil@example.com",
    "quoted local part": '"app@evil.example"@example.com',
    "trailing dot": "app@example.com.",
}


async def _sent(op: Operator, qid: str) -> str:
    """The delivery log line of ``qid`` once it says sent (logged after the smarthost's 250)."""
    return await wait_until(lambda: next((line for line in op.delivery_lines(qid)
                                          if "status=sent" in line), None),
                            10, lambda: f"the sent line of {qid}; log:\n{op.log()}")


async def test_hostile_addresses_are_refused_and_a_source_route_is_ignored(
        tmp_path: Path, upstream: Upstreams) -> None:
    """T41. RFC 5321 §4.1.1.3 and Appendix C: a server must be prepared for a source route and
    should ignore the route; relayd accepts it and passes only the mailbox on. Nothing hostile
    reaches the smarthost, and no control character reaches the log: the HELO name, which
    relayd takes as it comes, is logged escaped and reaches the Received header as "?"."""
    up = await upstream()
    op = Operator(tmp_path, [upstream_smarthost(up)])
    await op.start()
    try:
        c = await RawClient.greeted(op.port)
        await c.send(b"EHLO app\x00\tname.test\r\n")
        assert (await c.reply())[0] == 250
        refused = {}
        for what, address in HOSTILE.items():
            refused[f"MAIL {what}"] = await c.cmd(f"MAIL FROM:<{address}>")
        assert (await c.cmd("MAIL FROM:<@relay.example:app@example.com>"))[0] == 250
        for what, address in HOSTILE.items():
            refused[f"RCPT {what}"] = await c.cmd(f"RCPT TO:<{address.replace('app', 'user')}>")
        for what, (code, text) in refused.items():
            assert code == 553 and re.match(r"5\.1\.\d ", text), (what, code, text)
        assert (await c.cmd("RCPT TO:<@a.example,@b.example:user@example.net>"))[0] == 250
        assert (await c.cmd("DATA"))[0] == 354
        code, text = await c.cmd("Subject: routes\r\n\r\nbody\r\n.")
        assert code == 250, text
        await c.close()
        qid = text.rsplit(" ", 1)[-1]

        line = await _sent(op, qid)
        assert f"{qid}: to=<user@example.net>, relay=primary[" in line
        assert [(m.mail_from, m.rcpt_tos) for m in up.messages] == [("app@example.com", ["user@example.net"])]
        envelope = [cmd for cmd in up.commands if cmd.startswith(("MAIL", "RCPT"))]
        assert [cmd.split(" ", 1)[1].split(">")[0] for cmd in envelope] == [
            "FROM:<app@example.com", "TO:<user@example.net"]
        assert up.messages[0].data.startswith(b"Received: from app??name.test ([127.0.0.1])\r\n")
        assert f"{qid}: client=[127.0.0.1], helo=<app\\x00\\x09name.test>, from=<app@example.com>," in op.log()
        log = op.relay.log_path.read_bytes()
        assert not re.search(rb"[\x00-\x09\x0b-\x1f\x7f]", log), log
        assert b"evil" not in log
    finally:
        assert await op.stop() == 0


async def test_auth_on_the_loopback_listener_is_refused_and_credentials_go_nowhere(
        tmp_path: Path, upstream: Upstreams) -> None:
    """T42, T43 on the loopback listener: neither AUTH nor STARTTLS is offered (access is by
    allowed_clients). An app that tries AUTH anyway gets 538 5.7.11 (encryption required,
    RFC 4954 §4) before any credential is asked for; credentials it sends along are never
    taken as credentials, logged or passed on. Its mail is still accepted without AUTH."""
    up = await upstream(auth=("PLAIN", "LOGIN"), credentials={"relay": "upstream-secret"})
    op = Operator(tmp_path, [upstream_smarthost(up, auth={"method": "plain", "username": "relay",
                                                             "password": "upstream-secret"})])
    await op.start()
    secret = "app-s3cret"
    try:
        c = await RawClient.greeted(op.port)
        code, features = await c.cmd("EHLO legacy.app")
        assert code == 250 and "AUTH" not in features and "STARTTLS" not in features, features
        plain = base64.b64encode(f"\0app\0{secret}".encode()).decode()
        code, text = await c.cmd(f"AUTH PLAIN {plain}")
        assert (code, text.split(" ", 1)[0]) == (538, "5.7.11"), text
        code, text = await c.cmd("AUTH LOGIN")
        assert (code, text.split(" ", 1)[0]) == (538, "5.7.11"), text
        # An app that sends its user name and password anyway: they are unknown commands.
        for line in (base64.b64encode(b"app").decode(), base64.b64encode(secret.encode()).decode()):
            assert (await c.cmd(line))[0] == 500
        assert (await c.cmd("STARTTLS"))[0] == 454
        for line in ("MAIL FROM:<app@example.com>", "RCPT TO:<user@example.net>", "DATA"):
            assert (await c.cmd(line))[0] in (250, 354)
        code, text = await c.cmd("Subject: no auth needed\r\n\r\nbody\r\n.")
        assert code == 250, text
        await c.close()

        await _sent(op, text.rsplit(" ", 1)[-1])
        # Upstream, relayd logs in with its own account, never with the app's.
        assert [(a.login, a.ok) for a in up.auth_attempts] == [("relay", True)]
        assert not any(secret in cmd or plain in cmd for cmd in up.commands)
        log = op.relay.log_path.read_bytes()
        for leaked in (secret, plain, base64.b64encode(secret.encode()).decode()):
            assert leaked.encode() not in log
    finally:
        assert await op.stop() == 0
