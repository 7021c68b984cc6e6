"""CommandLineReader read the way aiosmtpd's command loop reads it: every CRLF-terminated line
of the stream gets exactly one outcome, whatever the chunking and however long the line. A line
is handed on only when its sole CR and LF are its closing CRLF; one with a bare CR or LF is
refused whole (BareLineEnding), and nothing of it reaches the next line (RFC 5321 §2.3.8)."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.smtpd.lines import BareLineEnding, CommandLineReader

TOKENS = [b"a", b" ", b"\r", b"\n", b"\r\n", b"\n\r", b"MAIL FROM:<a@example.org>", b"."]


async def _aiosmtpd_outcomes(reader: CommandLineReader) -> list[bytes | str]:
    """The shape of aiosmtpd's SMTP._handle_client loop (1.4): a line, or "long" for a line
    over the limit (the rest skipped with further readuntil() calls), or "bare"."""
    out: list[bytes | str] = []
    while True:
        try:
            try:
                line = await reader.readuntil()
            except asyncio.LimitOverrunError as error:
                await reader.read(error.consumed)
                while True:
                    try:
                        await reader.readuntil()
                        break
                    except asyncio.LimitOverrunError as e:
                        await reader.read(e.consumed)
                out.append("long")
                continue
            out.append(line)
        except BareLineEnding:
            out.append("bare")
        except asyncio.IncompleteReadError:
            return out


async def _outcomes(stream: bytes, cuts: list[int], limit: int) -> list[bytes | str]:
    reader = CommandLineReader(limit=limit)

    async def feed() -> None:
        pos = 0
        for n in cuts:
            reader.feed_data(stream[pos:pos + n])
            pos += n
            await asyncio.sleep(0)  # let the reader run between chunks
        reader.feed_data(stream[pos:])
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    out = await _aiosmtpd_outcomes(reader)
    await feeder
    return out


def _crlf_lines(stream: bytes) -> list[bytes]:
    lines, pos = [], 0
    while (end := stream.find(b"\r\n", pos)) >= 0:
        lines.append(stream[pos:end + 2])
        pos = end + 2
    return lines


@settings(max_examples=400, deadline=None)
@given(body=st.lists(st.sampled_from(TOKENS), max_size=50).map(b"".join),
       cuts=st.lists(st.integers(1, 9), max_size=40),
       limit=st.sampled_from([4, 8, 16, 64, 65536]))
def test_each_crlf_line_gets_one_outcome_and_only_clean_lines_pass(body: bytes, cuts: list[int],
                                                                   limit: int) -> None:
    stream = body + b"\r\n"
    lines = _crlf_lines(stream)
    out = asyncio.run(_outcomes(stream, cuts, limit))
    assert len(out) == len(lines)
    for line, got in zip(lines, out, strict=True):
        clean = line.count(b"\r") == 1 and line.count(b"\n") == 1
        if len(line) - 1 <= limit:  # within the StreamReader limit
            assert got == (line if clean else "bare")
        else:
            assert got == "long" if clean else got in ("long", "bare")


def test_examples_from_the_issue() -> None:
    stream = (b"MAIL FROM:<a@example.org>\nRCPT TO:<x@example.org>\r\n"
              b"RCPT TO:<x@example.org>\rDATA\r\n"
              b"\n\r\n"
              b"NOOP\r\n")
    assert asyncio.run(_outcomes(stream, [], 65536)) == ["bare", "bare", "bare", b"NOOP\r\n"]


def test_other_separators_are_the_data_readers_and_pass_through() -> None:
    async def read() -> tuple[bytes, bytes]:
        reader = CommandLineReader(limit=64)
        reader.feed_data(b"a\nb\rc\n.\r\nQUIT\r\n")
        reader.feed_eof()
        return await reader.readuntil(b"\n.\r\n"), await reader.readuntil()

    assert asyncio.run(read()) == (b"a\nb\rc\n.\r\n", b"QUIT\r\n")


def test_a_bare_lf_is_refused_at_once_and_the_rest_of_its_line_dropped_later() -> None:
    async def read() -> bytes:
        reader = CommandLineReader(limit=64)
        reader.feed_data(b"EHLO app\n")  # and nothing more yet: a client that ends lines with LF
        try:
            await asyncio.wait_for(reader.readuntil(), 1)
        except BareLineEnding:
            pass
        else:
            raise AssertionError("a line with a bare LF was handed on")
        reader.feed_data(b"MAIL FROM:<a@example.org>\r\nNOOP\r\n")
        return await reader.readuntil()

    assert asyncio.run(read()) == b"NOOP\r\n"  # the MAIL was the rest of the refused line
