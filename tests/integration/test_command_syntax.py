"""Strict command syntax over real sockets, as a client sees it: an unclosed "<" in MAIL FROM
or RCPT TO gets 501 (RFC 5321 §4.1.2); a command line holding a bare CR or a bare LF is
refused whole with 500 5.5.2 (RFC 5321 §2.3.8: lines end with CRLF only), whichever command
it is and whether or not aiosmtpd alone would have split it. Nothing of a refused line takes
effect; the session goes on and the next correct transaction is stored exactly as its valid
lines said: in-process against the Listener, and once against `relayd run` as a process,
checked by what the fake smarthost receives.

Complements tests/integration/test_hostile_input.py (overlong lines, commands out of order).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relayd.model import Envelope, Message, Reply
from relayd.smtpd.listener import Listener, ListenerSettings
from relayd.spool.store import Spool
from relayd.units import HostPort
from tests.support.relay import RelayProcess, free_port, upstream_smarthost, wait_until, write_config
from tests.support.smtpclient import RawClient
from tests.support.upstream import FakeUpstream


class Store:
    """The daemon's intake without policy: a real spool."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.accepted: list[str] = []

    def check_recipient(self, mail_from: str, rcpt: str) -> Reply | None:
        return None

    async def accept(self, queue_id: str, envelope: Envelope, content: bytes) -> Reply:
        self.spool.put(Message(envelope, content), queue_id)
        self.accepted.append(queue_id)
        return Reply(250, f"2.0.0 Ok: queued as {queue_id}")

    def envelopes(self) -> list[tuple[str, tuple[str, ...]]]:
        return [(e.mail_from, e.rcpt_tos) for e in (self.spool.get(q).envelope for q in self.accepted)]


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[tuple[Store, int]]:
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.ensure_dirs()
    store = Store(spool)
    listener = Listener(ListenerSettings(
        hostname="relay.test.example", listen=(HostPort("127.0.0.1", 0),),
        allowed_clients=(ipaddress.ip_network("127.0.0.0/8"),), max_message_size=100_000,
        max_recipients=10, max_sessions=5), store)
    addrs = await listener.start()
    yield store, addrs[0][1]
    await listener.aclose(grace=0.5)


async def session(port: int) -> RawClient:
    c = await RawClient.connect("127.0.0.1", port)
    assert (await c.reply())[0] == 220
    assert (await c.cmd("EHLO app.example"))[0] == 250
    return c


async def deliver(c: RawClient, sender: str, *rcpts: str) -> None:
    """One correct transaction; it must be accepted."""
    assert (await c.cmd(f"MAIL FROM:<{sender}>"))[0] == 250
    for rcpt in rcpts:
        assert (await c.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(b"Subject: after the refusal\r\n\r\nbody\r\n.\r\n")
    code, text = await c.reply()
    assert code == 250, text


@pytest.mark.parametrize("line", ["MAIL FROM:<a@example.org", "MAIL FROM:<a@example.org SIZE=10",
                                  "MAIL FROM:<", 'MAIL FROM:<"a>b"@example.org'])
async def test_unclosed_sender_path_gets_501_and_sets_no_sender(relay: tuple[Store, int], line: str) -> None:
    store, port = relay
    c = await session(port)
    code, text = await c.cmd(line)
    assert code == 501 and "MAIL FROM:" in text
    assert (await c.cmd("RCPT TO:<x@example.org>"))[0] == 503  # still no sender
    await deliver(c, "ok@example.org", "r@example.org")
    await c.close()
    assert store.envelopes() == [("ok@example.org", ("r@example.org",))]


@pytest.mark.parametrize("line", ["RCPT TO:<b@example.org", "RCPT TO:<b@example.org NOTIFY=NEVER",
                                  "RCPT TO:<"])
async def test_unclosed_recipient_path_gets_501_and_adds_no_recipient(relay: tuple[Store, int],
                                                                      line: str) -> None:
    store, port = relay
    c = await session(port)
    assert (await c.cmd("MAIL FROM:<ok@example.org>"))[0] == 250
    code, text = await c.cmd(line)
    assert code == 501 and "RCPT TO:" in text
    assert (await c.cmd("DATA"))[0] == 503  # still no recipient
    assert (await c.cmd("RCPT TO:<r@example.org>"))[0] == 250
    await finish_with_only_the_valid_lines(c, store)


async def finish_with_only_the_valid_lines(c: RawClient, store: Store) -> None:
    """DATA and the final dot are answered as usual, and the stored envelope holds exactly the
    sender and recipient of the valid lines (ok@example.org to r@example.org)."""
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(b"Subject: x\r\n\r\ny\r\n.\r\n")
    assert (await c.reply())[0] == 250
    await c.close()
    assert store.envelopes() == [("ok@example.org", ("r@example.org",))]


async def test_closed_paths_are_not_501(relay: tuple[Store, int]) -> None:
    _, port = relay
    c = await session(port)
    assert (await c.cmd("MAIL FROM:<>"))[0] == 250  # the null reverse-path is closed
    assert (await c.cmd("RSET"))[0] == 250
    # A ">" inside a quoted local part does not close the path; the one after it does. (The
    # quoted form is then refused as an address, with 553, as before.)
    assert (await c.cmd('MAIL FROM:<"a>b"@example.org>'))[0] == 553
    await c.close()


BARE = "5.5.2"


async def refused_bare(c: RawClient, line: bytes) -> None:
    await c.send(line)
    code, text = await c.reply()
    assert (code, text[:5]) == (500, BARE), (line, code, text)


@pytest.mark.parametrize("line", [
    b"MAIL FROM:<a@example.org>\nRCPT TO:<x@example.org>\r\n",  # aiosmtpd alone ran both
    b"MAIL FROM:<a@example.org>\rRCPT TO:<x@example.org>\r\n",
    b"MAIL FROM:<a@example.org>\n\r\n",
    b"MAIL FROM:<a@example.org>\r\r\n",
    b"MAIL FROM:<a\r@example.org>\r\n",
    b"MAIL\nFROM:<a@example.org>\r\n",
])
async def test_bare_cr_or_lf_in_mail_from_sets_no_sender(relay: tuple[Store, int], line: bytes) -> None:
    store, port = relay
    c = await session(port)
    await refused_bare(c, line)
    assert (await c.cmd("RCPT TO:<y@example.org>"))[0] == 503  # no sender was set
    await deliver(c, "ok@example.org", "r@example.org")
    await c.close()
    assert store.envelopes() == [("ok@example.org", ("r@example.org",))]


@pytest.mark.parametrize("line", [
    b"RCPT TO:<x@example.org>\rDATA\r\n",
    b"RCPT TO:<x@example.org>\nDATA\r\n",
    b"RCPT TO:<x@example.org>\n\r\n",
    b"RCPT TO:<x@example.org>\nRCPT TO:<z@example.org>\r\n",
    b"RCPT TO:<x@exa\rmple.org>\r\n",
])
async def test_bare_cr_or_lf_in_rcpt_to_adds_no_recipient(relay: tuple[Store, int], line: bytes) -> None:
    store, port = relay
    c = await session(port)
    assert (await c.cmd("MAIL FROM:<ok@example.org>"))[0] == 250
    await refused_bare(c, line)
    assert (await c.cmd("DATA"))[0] == 503  # no recipient was added, and no DATA began
    assert (await c.cmd("RCPT TO:<r@example.org>"))[0] == 250
    await finish_with_only_the_valid_lines(c, store)


@pytest.mark.parametrize("verb", [b"EHLO app", b"HELO app", b"NOOP", b"RSET", b"VRFY a@example.org",
                                  b"HELP", b"DATA", b"QUIT", b"AUTH PLAIN", b"STARTTLS"])
async def test_every_command_is_refused_whole_with_a_bare_cr_or_lf(relay: tuple[Store, int],
                                                                   verb: bytes) -> None:
    store, port = relay
    c = await session(port)
    assert (await c.cmd("MAIL FROM:<ok@example.org>"))[0] == 250
    assert (await c.cmd("RCPT TO:<r@example.org>"))[0] == 250
    for line in (verb + b"\n\r\n", verb + b"\rNOOP\r\n", b"NOOP\n" + verb + b"\r\n"):
        await refused_bare(c, line)
    # The transaction is as it was: not reset, not quit, not in DATA.
    assert (await c.cmd("MAIL FROM:<other@example.org>"))[0] == 503  # nested MAIL
    await finish_with_only_the_valid_lines(c, store)


async def test_a_client_ending_lines_with_lf_alone_is_told_at_once(relay: tuple[Store, int]) -> None:
    store, port = relay
    c = await session(port)
    await refused_bare(c, b"MAIL FROM:<a@example.org>\n")  # no CRLF follows yet
    await c.send(b"RCPT TO:<x@example.org>\r\n")  # the end of that line: no reply of its own
    assert (await c.cmd("RCPT TO:<y@example.org>"))[0] == 503  # no sender was set
    await deliver(c, "ok@example.org", "r@example.org")
    await c.close()
    assert store.envelopes() == [("ok@example.org", ("r@example.org",))]


async def test_the_refusal_is_logged_once_per_session(relay: tuple[Store, int],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    _, port = relay
    caplog.set_level(logging.WARNING, logger="relayd.listener")
    c = await session(port)
    for _ in range(3):
        await refused_bare(c, b"NOOP\rx\r\n")
    assert (await c.cmd("NOOP"))[0] == 250
    await c.close()
    lines = [r.getMessage() for r in caplog.records if "bare CR or LF" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("reject: command from [127.0.0.1]:")


async def test_pipelined_lines_around_a_refused_one_run_in_order(relay: tuple[Store, int]) -> None:
    store, port = relay
    c = await session(port)
    await c.send(b"MAIL FROM:<ok@example.org>\r\n"
                 b"RCPT TO:<x@example.org>\nRCPT TO:<y@example.org>\r\n"
                 b"RCPT TO:<r@example.org>\r\n"
                 b"DATA\r\n")
    codes = [(await c.reply())[0] for _ in range(4)]
    assert codes == [250, 500, 250, 354]
    await c.send(b"Subject: x\r\n\r\ny\r\n.\r\n")
    assert (await c.reply())[0] == 250
    await c.close()
    assert store.envelopes() == [("ok@example.org", ("r@example.org",))]


async def test_an_overlong_line_with_a_bare_lf_is_refused_whole(relay: tuple[Store, int]) -> None:
    store, port = relay
    c = await session(port)
    # Past the 64 KiB read buffer, then a bare LF and what would be a second command.
    await c.send(b"NOOP " + b"x" * 300_000 + b"\nMAIL FROM:<evil@example.org>\r\n")
    assert (await c.reply())[0] == 500  # one reply for the one line
    assert (await c.cmd("RCPT TO:<r@example.org>"))[0] == 503  # no sender was set
    await deliver(c, "ok@example.org", "r@example.org")
    await c.close()
    assert store.envelopes() == [("ok@example.org", ("r@example.org",))]


async def test_bare_line_ends_inside_message_content_are_still_content(relay: tuple[Store, int]) -> None:
    store, port = relay
    c = await session(port)
    assert (await c.cmd("MAIL FROM:<ok@example.org>"))[0] == 250
    assert (await c.cmd("RCPT TO:<r@example.org>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(b"Subject: x\r\n\r\nbare\nLF\rand CR\r\n.\r\n")
    assert (await c.reply())[0] == 250
    await c.close()
    content = store.spool.read_content(store.accepted[0])
    assert content.endswith(b"\r\n\r\nbare\r\nLF\r\nand CR\r\n")


# -- `relayd run` as a real process, delivering to a fake smarthost ---------------------------

async def test_relayd_run_refuses_bad_lines_and_delivers_only_what_valid_lines_said(tmp_path: Path) -> None:
    async with FakeUpstream() as up:
        port = free_port()
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], port=port)
        proc = RelayProcess(cfg, port, tmp_path / "relayd.log")
        await asyncio.to_thread(proc.start)
        try:
            c = await RawClient.connect("127.0.0.1", port)
            assert (await c.reply())[0] == 220
            assert (await c.cmd("EHLO app.example"))[0] == 250
            assert (await c.cmd("MAIL FROM:<evil@example.org"))[0] == 501
            await refused_bare(c, b"MAIL FROM:<evil@example.org>\nRCPT TO:<x@example.net>\r\n")
            await refused_bare(c, b"MAIL FROM:<evil@example.org>\rRCPT TO:<x@example.net>\r\n")
            assert (await c.cmd("RCPT TO:<x@example.net>"))[0] == 503  # no sender so far
            assert (await c.cmd("MAIL FROM:<app@example.com>"))[0] == 250
            assert (await c.cmd("RCPT TO:<x@example.net"))[0] == 501
            await refused_bare(c, b"RCPT TO:<x@example.net>\rDATA\r\n")
            await refused_bare(c, b"RCPT TO:<x@example.net>\nRCPT TO:<y@example.net>\r\n")
            assert (await c.cmd("DATA"))[0] == 503  # no recipient so far
            assert (await c.cmd("RCPT TO:<user@example.net>"))[0] == 250
            assert (await c.cmd("DATA"))[0] == 354
            await c.send(b"From: app@example.com\r\nTo: user@example.net\r\nSubject: strict\r\n\r\n"
                         b"body\r\n.\r\n")
            code, text = await c.reply()
            assert code == 250 and "queued as" in text
            assert (await c.cmd("QUIT"))[0] == 221
            await c.close()
            await wait_until(lambda: len(up.messages) == 1, timeout=20,
                             what=f"the delivery; log: {proc.log()[-2000:]}")
        finally:
            assert proc.stop() == 0
    (msg,) = up.messages  # the only message the session got a 250 for
    assert (msg.mail_from, msg.rcpt_tos) == ("app@example.com", ["user@example.net"])
    assert b"Subject: strict" in msg.data
    assert "reject: command from [127.0.0.1]:" in proc.log()
