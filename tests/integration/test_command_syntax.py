"""Strict command syntax over real sockets, as a client sees it: an unclosed "<" in MAIL FROM
or RCPT TO gets 501 (RFC 5321 §4.1.2), and nothing of a refused command takes effect; the
session goes on and the next correct transaction is stored exactly as its valid lines said.

Complements tests/integration/test_hostile_input.py (overlong lines, commands out of order).
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relayd.listener import Listener, ListenerSettings
from relayd.model import Envelope, Message, Reply
from relayd.spool import Spool
from relayd.units import HostPort
from tests.support.smtpclient import RawClient


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
