"""relayd's reply reader (relayd/delivery/smtp/replies.py) on a stand-in transport: parsing of single-
and multi-line replies in any chunking, the bounds, unsolicited data, disconnects and EOF
(passed on to aiosmtplib's protocol), timeouts."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from aiosmtplib.errors import SMTPReadTimeoutError, SMTPResponseException, SMTPServerDisconnected
from aiosmtplib.protocol import SMTPProtocol
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.delivery.smtp.replies import MAX_REPLY_LENGTH, ReplyReader, check_command
from relayd.model import Reply


class StandInTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False
        self.protocol: Any = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol  # type: ignore[no-any-return]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def attached() -> tuple[ReplyReader, SMTPProtocol, StandInTransport]:
    inner = SMTPProtocol(loop=asyncio.get_running_loop())
    transport = StandInTransport()
    inner.connection_made(transport)
    reader = ReplyReader.attach(inner)
    assert transport.protocol is reader
    return reader, inner, transport


REPLIES = (b"250 2.1.0 Ok\r\n"
           b"250-first line\r\n250-second\r\n250 2.1.5 last\r\n"
           b"550 5.1.1 <x@example.net>: unknown\n"  # a bare LF, as aiosmtplib accepts
           b"354\r\n")
EXPECTED = [Reply(250, "2.1.0 Ok"), Reply(250, "first line\nsecond\n2.1.5 last"),
            Reply(550, "5.1.1 <x@example.net>: unknown"), Reply(354, "")]


async def test_a_group_of_replies_in_one_segment_is_read_in_order() -> None:
    reader, _inner, transport = attached()
    reader.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<x@example.net>\r\nDATA\r\n", 4)
    assert transport.written == [b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<x@example.net>\r\nDATA\r\n"]
    reader.data_received(REPLIES)
    assert [await reader.read(1) for _ in range(4)] == EXPECTED


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(REPLIES) - 1), unique=True, max_size=12))
def test_any_chunking_gives_the_same_replies(cuts: list[int]) -> None:
    async def scenario() -> list[Reply]:
        reader, _inner, _transport = attached()
        reader.send(b"x", 4)
        edges = [0, *sorted(cuts), len(REPLIES)]
        got: list[Reply] = []
        for a, b in itertools.pairwise(edges):
            reader.data_received(REPLIES[a:b])
        for _ in range(4):
            got.append(await reader.read(1))
        return got
    assert asyncio.run(scenario()) == EXPECTED


async def test_a_reader_waiting_is_woken_by_the_reply() -> None:
    reader, _inner, _transport = attached()
    reader.send(b"NOOP\r\n", 1)
    loop = asyncio.get_running_loop()
    loop.call_later(0.02, reader.data_received, b"250 2.0.0")
    loop.call_later(0.04, reader.data_received, b" Ok\r\n")
    assert await reader.read(2) == Reply(250, "2.0.0 Ok")


async def test_unsolicited_data_and_extra_replies_are_dropped() -> None:
    reader, _inner, _transport = attached()
    reader.data_received(b"421 4.4.2 idle timeout\r\n")  # nothing asked: dropped
    reader.send(b"RSET\r\n", 1)
    reader.data_received(b"250 2.0.0 Ok\r\n250 an extra reply\r\n")
    assert await reader.read(1) == Reply(250, "2.0.0 Ok")
    reader.send(b"NOOP\r\n", 1)
    reader.data_received(b"250 2.0.0 noop\r\n")
    assert await reader.read(1) == Reply(250, "2.0.0 noop")


async def test_timeout_raises_a_read_timeout() -> None:
    reader, _inner, _transport = attached()
    reader.send(b"NOOP\r\n", 1)
    with pytest.raises(SMTPReadTimeoutError):
        await reader.read(0.05)


@pytest.mark.parametrize("garbage", [
    b"x" * (MAX_REPLY_LENGTH + 10),  # no line end at all
    b"250 " + b"y" * 9000 + b"\r\n",  # one overlong line
    b"250-more\r\n" * 4000,  # endless continuation lines
])
async def test_a_server_streaming_garbage_is_cut_off_with_a_bounded_buffer(garbage: bytes) -> None:
    reader, _inner, transport = attached()
    reader.send(b"MAIL FROM:<a@b>\r\n", 1)
    for i in range(0, len(garbage), 1000):
        reader.data_received(garbage[i:i + 1000])
        assert len(reader._buffer) <= MAX_REPLY_LENGTH + 1000
    with pytest.raises(SMTPResponseException) as err:
        await reader.read(1)
    assert err.value.code == -1 and "too long" in err.value.message
    assert transport.closed and len(reader._buffer) == 0
    # Reported once; after that the connection is simply gone.
    with pytest.raises(SMTPServerDisconnected):
        await reader.read(1)
    with pytest.raises(SMTPServerDisconnected):
        reader.send(b"RSET\r\n", 1)


async def test_a_line_without_a_code_is_malformed() -> None:
    reader, _inner, transport = attached()
    reader.send(b"MAIL FROM:<a@b>\r\n", 1)
    reader.data_received(b"hello there\r\n")
    with pytest.raises(SMTPResponseException) as err:
        await reader.read(1)
    assert err.value.code == -1 and "hello there" in err.value.message
    assert transport.closed


@pytest.mark.parametrize("how", ["connection_lost", "eof_received"])
async def test_disconnect_wakes_the_reader_after_the_replies_already_in(how: str) -> None:
    reader, inner, _transport = attached()
    reader.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n", 3)
    reader.data_received(b"250 2.1.0 Ok\r\n")
    waiting = asyncio.create_task(reader.read(5))
    assert await waiting == Reply(250, "2.1.0 Ok")
    waiting = asyncio.create_task(reader.read(5))
    await asyncio.sleep(0)
    if how == "connection_lost":
        reader.connection_lost(ConnectionResetError(104, "reset"))
        assert inner.transport is None and not inner.is_connected  # passed on to aiosmtplib
    else:
        assert reader.eof_received() is False  # aiosmtplib's answer: close the transport
    with pytest.raises(SMTPServerDisconnected):
        await asyncio.wait_for(waiting, 1)


def test_check_command_refuses_control_characters() -> None:
    check_command("RCPT TO:<pelé@example.net>".encode())
    for bad in (b"RCPT TO:<a@b>\r\nRSET", b"MAIL FROM:<a\x00@b>", b"RCPT TO:<a\x7f@b>"):
        with pytest.raises(ValueError, match="control character"):
            check_command(bad)
