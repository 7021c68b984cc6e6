"""The SMTP listener over real sockets: limits, strict DATA, headers added, allow-list."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relayd.model import Envelope, Message, Reply
from relayd.smtpd.listener import Listener, ListenerSettings
from relayd.spool.store import Spool
from relayd.units import HostPort
from tests.support.smtpclient import RawClient


class SpoolAcceptor:
    """Stores into a real spool, like the daemon's intake (without policy)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.accepted: list[str] = []
        self.refuse: set[str] = set()

    def check_recipient(self, mail_from: str, rcpt: str) -> Reply | None:
        return Reply(550, "5.7.1 on the do-not-email list") if rcpt in self.refuse else None

    async def accept(self, queue_id: str, envelope: Envelope, content: bytes) -> Reply:
        self.spool.put(Message(envelope, content), queue_id)
        self.accepted.append(queue_id)
        return Reply(250, f"2.0.0 Ok: queued as {queue_id}")


def settings(**kw: object) -> ListenerSettings:
    base: dict[str, object] = dict(
        hostname="relay.test.example", listen=(HostPort("127.0.0.1", 0),),
        allowed_clients=(ipaddress.ip_network("127.0.0.0/8"),), max_message_size=10_000,
        max_recipients=3, max_sessions=5)
    base.update(kw)
    return ListenerSettings(**base)  # type: ignore[arg-type]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[Listener, SpoolAcceptor, int]]:
    spool = Spool(tmp_path / "spool")
    spool.ensure_dirs()
    acceptor = SpoolAcceptor(spool)
    listener = Listener(settings(), acceptor)
    addrs = await listener.start()
    yield listener, acceptor, addrs[0][1]
    await listener.aclose(grace=0.5)


async def session(port: int) -> RawClient:
    c = await RawClient.connect("127.0.0.1", port)
    assert (await c.reply())[0] == 220
    return c


async def test_ehlo_advertises_size_8bitmime_smtputf8_pipelining(server: tuple[Listener, SpoolAcceptor, int]) -> None:
    c = await session(server[2])
    code, text = await c.cmd("EHLO app.example")
    assert code == 250
    for word in ("SIZE 10000", "8BITMIME", "SMTPUTF8", "PIPELINING"):
        assert word in text.splitlines()
    await c.close()


async def send_data(c: RawClient, data: bytes, rcpts: tuple[str, ...] = ("bob@example.com",)) -> tuple[int, str]:
    await c.cmd("EHLO app.example")
    assert (await c.cmd("MAIL FROM:<alice@example.com>"))[0] == 250
    for r in rcpts:
        assert (await c.cmd(f"RCPT TO:<{r}>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(data)
    return await c.reply()


async def test_accepts_and_stores_with_received_date_message_id(server: tuple[Listener, SpoolAcceptor, int]) -> None:
    _, acc, port = server
    c = await session(port)
    code, text = await send_data(c, b"Subject: hi\r\n\r\nline 1\r\n..dotted\r\n.\r\n")
    assert code == 250 and text.startswith("2.0.0 Ok: queued as ")
    qid = text.rsplit(" ", 1)[1]
    content = acc.spool.read_content(qid)
    assert content.startswith(b"Received: from app.example ([127.0.0.1])\r\n\tby relay.test.example (relayd) with ESMTP id " + qid.encode())
    assert b"\r\nDate: " in content and f"\r\nMessage-ID: <{qid}@relay.test.example>\r\n".encode() in content
    assert content.endswith(b"Subject: hi\r\n\r\nline 1\r\n.dotted\r\n")  # dot-unstuffed
    env = acc.spool.get(qid).envelope
    assert env.mail_from == "alice@example.com" and env.rcpt_tos == ("bob@example.com",)
    await c.close()


async def test_existing_date_and_message_id_are_kept(server: tuple[Listener, SpoolAcceptor, int]) -> None:
    _, acc, port = server
    c = await session(port)
    _code, text = await send_data(c, b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <x@y>\r\n\r\nb\r\n.\r\n")
    content = acc.spool.read_content(text.rsplit(" ", 1)[1])
    assert content.count(b"Date:") == 1 and content.count(b"Message-ID:") == 1
    await c.close()


async def test_bcc_and_resent_bcc_fields_are_removed_and_the_rest_kept(
        server: tuple[Listener, SpoolAcceptor, int]) -> None:
    _, acc, port = server
    c = await session(port)
    head = (b"From: app@example.com\r\nBCC: hidden@example.net,\r\n\tother@example.net\r\n"
            b"To: bob@example.com\r\nResent-Bcc: r@example.net\r\nX-Bcc-Note: kept\r\n"
            b"Subject: Bcc: in the subject stays\r\n")
    body = b"\r\nBcc: a body line that looks like a header stays\r\n"
    _code, text = await send_data(c, head + body + b".\r\n")
    content = acc.spool.read_content(text.rsplit(" ", 1)[1])
    assert b"hidden@" not in content and b"other@" not in content and b"r@example" not in content
    assert content.endswith(b"From: app@example.com\r\nTo: bob@example.com\r\nX-Bcc-Note: kept\r\n"
                            b"Subject: Bcc: in the subject stays\r\n" + body)
    await c.close()


@pytest.mark.parametrize("data", [b"Bcc: x@example.net\r\n\r\nbody\r\n", b"Bcc: x@example.net\r\n"])
async def test_a_message_whose_only_header_is_bcc_keeps_its_body_after_the_added_headers(
        server: tuple[Listener, SpoolAcceptor, int], data: bytes) -> None:
    _, acc, port = server
    c = await session(port)
    _code, text = await send_data(c, data + b".\r\n")
    qid = text.rsplit(" ", 1)[1]
    content = acc.spool.read_content(qid)
    assert b"x@example.net" not in content
    assert content.endswith(f"Message-ID: <{qid}@relay.test.example>\r\n\r\n".encode()
                            + data.partition(b"\r\n\r\n")[2])
    await c.close()


@pytest.mark.parametrize("trick", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\r\n"])
async def test_smuggling_variants_never_end_the_message(server: tuple[Listener, SpoolAcceptor, int], trick: bytes) -> None:
    _, acc, port = server
    c = await session(port)
    smuggled = (b"Subject: one\r\n\r\nfirst" + trick + b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\n"
                b"DATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n")
    code, _text = await send_data(c, smuggled)
    assert code == 250
    assert len(acc.accepted) == 1  # one message, with the "commands" as its content
    content = acc.spool.read_content(acc.accepted[0])
    assert b"MAIL FROM:<evil@example.com>" in content
    assert acc.spool.get(acc.accepted[0]).envelope.rcpt_tos == ("bob@example.com",)
    # The stored copy has CRLF line ends only, so no bare LF/CR reaches the smarthost.
    assert content.count(b"\n") == content.count(b"\r\n") == content.count(b"\r")
    assert (await c.cmd("QUIT"))[0] == 221
    await c.close()


async def test_oversize_gets_552_and_nothing_stored(server: tuple[Listener, SpoolAcceptor, int]) -> None:
    _, acc, port = server
    c = await session(port)
    code, _text = await send_data(c, b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" + (b"y" * 998 + b"\r\n") * 12 + b".\r\n")
    assert code == 552
    assert acc.accepted == []
    # The session goes on after 552.
    assert (await c.cmd("RSET"))[0] == 250
    await c.close()


async def test_mail_from_size_parameter_over_limit(server: tuple[Listener, SpoolAcceptor, int]) -> None:
    c = await session(server[2])
    await c.cmd("EHLO app.example")
    assert (await c.cmd("MAIL FROM:<a@example.com> SIZE=999999"))[0] == 552
    await c.close()


async def test_too_many_recipients_452(server: tuple[Listener, SpoolAcceptor, int]) -> None:
    c = await session(server[2])
    await c.cmd("EHLO app.example")
    await c.cmd("MAIL FROM:<a@example.com>")
    for i in range(3):
        assert (await c.cmd(f"RCPT TO:<r{i}@example.com>"))[0] == 250
    code, text = await c.cmd("RCPT TO:<r9@example.com>")
    assert code == 452 and "4.5.3" in text
    await c.close()


@pytest.mark.parametrize("bad", ["<no-at-sign>", "<a@b@c>", "<a b@example.com>", "<a@exa mple.com>"])
async def test_malformed_recipient_refused(server: tuple[Listener, SpoolAcceptor, int], bad: str) -> None:
    c = await session(server[2])
    await c.cmd("EHLO app.example")
    await c.cmd("MAIL FROM:<a@example.com>")
    code, _ = await c.cmd(f"RCPT TO:{bad}")
    assert code in (501, 553)
    await c.close()


async def test_null_sender_is_accepted(server: tuple[Listener, SpoolAcceptor, int]) -> None:
    _, acc, port = server
    c = await session(port)
    await c.cmd("EHLO app.example")
    assert (await c.cmd("MAIL FROM:<>"))[0] == 250
    assert (await c.cmd("RCPT TO:<bob@example.com>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(b"Subject: bounce\r\n\r\nx\r\n.\r\n")
    assert (await c.reply())[0] == 250
    assert acc.spool.get(acc.accepted[0]).envelope.mail_from == ""
    await c.close()


async def test_rcpt_refusal_from_acceptor(server: tuple[Listener, SpoolAcceptor, int]) -> None:
    _, acc, port = server
    acc.refuse.add("blocked@example.com")
    c = await session(port)
    await c.cmd("EHLO app.example")
    await c.cmd("MAIL FROM:<a@example.com>")
    code, text = await c.cmd("RCPT TO:<blocked@example.com>")
    assert code == 550 and "5.7.1" in text
    await c.close()


async def test_pipelined_transaction(server: tuple[Listener, SpoolAcceptor, int]) -> None:
    _, acc, port = server
    c = await session(port)
    await c.send(b"EHLO app.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    codes = [(await c.reply())[0] for _ in range(4)]
    assert codes == [250, 250, 250, 354]
    await c.send(b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert (await c.reply())[0] == 250
    assert (await c.reply())[0] == 221
    assert len(acc.accepted) == 1
    await c.close()


async def test_nul_bytes_refused(server: tuple[Listener, SpoolAcceptor, int]) -> None:
    _, acc, port = server
    c = await session(port)
    code, _ = await send_data(c, b"Subject: nul\r\n\r\na\x00b\r\n.\r\n")
    assert code == 554 and acc.accepted == []
    await c.close()


async def test_large_message_arrives_intact(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    spool.ensure_dirs()
    acc = SpoolAcceptor(spool)
    listener = Listener(settings(max_message_size=5_000_000), acc)
    port = (await listener.start())[0][1]
    body = b"".join(b"%06d " % i + b"z" * 70 + b"\r\n" for i in range(20000)) + b".starts with dot\r\n"
    c = await session(port)
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    code, _text = await send_data(c, b"Subject: big\r\n\r\n" + stuffed + b".\r\n")
    assert code == 250
    assert spool.read_content(acc.accepted[0]).endswith(b"Subject: big\r\n\r\n" + body)
    await c.close()
    await listener.aclose(grace=0.5)


async def test_client_outside_allowed_clients_gets_554(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    spool.ensure_dirs()
    listener = Listener(settings(allowed_clients=(ipaddress.ip_network("10.0.0.0/8"),)), SpoolAcceptor(spool))
    port = (await listener.start())[0][1]
    c = await RawClient.connect("127.0.0.1", port)
    code, text = await c.reply()
    assert code == 554 and "5.7.1" in text
    await c.close()
    await listener.aclose(grace=0.5)


async def test_session_cap_answers_421(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    spool.ensure_dirs()
    listener = Listener(settings(max_sessions=2), SpoolAcceptor(spool))
    port = (await listener.start())[0][1]
    a, b = await session(port), await session(port)
    c = await RawClient.connect("127.0.0.1", port)
    assert (await c.reply())[0] == 421
    await c.close()
    await a.close()
    await b.close()
    await listener.aclose(grace=0.5)


async def test_ipv6_loopback_listener(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    spool.ensure_dirs()
    listener = Listener(settings(listen=(HostPort("::1", 0),), allowed_clients=(ipaddress.ip_network("::1/128"),)),
                        SpoolAcceptor(spool))
    port = (await listener.start())[0][1]
    c = await RawClient.connect("::1", port)
    assert (await c.reply())[0] == 220
    await c.close()
    await listener.aclose(grace=0.5)
