"""The listener's fast paths behave exactly like the slow ones.

The chunked DATA reader ends a message exactly where RFC 5321 says, however the bytes arrive: at the first CRLF "." CRLF (counting the CRLF of the DATA line), never at LF.CRLF,
CR.CR or other look-alikes (SMTP smuggling), and leaves what follows for the next command."""

from __future__ import annotations

import asyncio
import re

from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd import bytescan
from relayd.bytescan import stuff
from relayd.smtpd import lines
from relayd.smtpd.lines import CommandLineReader
from relayd.smtpd.listener import RelaySMTP, normalize_line_endings, unstuff

TOKENS = [b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"\n.\r\n", b"..\r\n", b"text.\r\n"]


class _Reader:
    """Just enough of RelaySMTP for ``_read_data``."""

    _read_data = RelaySMTP._read_data

    def __init__(self, reader: CommandLineReader, limit: int = 0) -> None:
        self._reader = reader
        self.data_size_limit = limit

    def _reset_timeout(self) -> None:
        pass


async def _read(stream: bytes, cuts: list[int], limit: int) -> tuple[bytes, bool, bytes]:
    reader = CommandLineReader(limit=limit)
    pos = 0
    for n in cuts:
        reader.feed_data(stream[pos:pos + n])
        pos += n
    reader.feed_data(stream[pos:])
    reader.feed_eof()
    data, too_big = await _Reader(reader)._read_data()
    return data, too_big, await reader.read()


@settings(max_examples=300, deadline=None)
@given(body=st.lists(st.sampled_from(TOKENS), max_size=60).map(b"".join),
       cuts=st.lists(st.integers(1, 9), max_size=40),
       limit=st.sampled_from([8, 16, 64, 65536]))
def test_message_ends_at_the_first_crlf_dot_crlf(body: bytes, cuts: list[int], limit: int) -> None:
    stream = body + b"\r\n.\r\nQUIT\r\n"
    seen = b"\r\n" + stream  # the DATA command's CRLF comes first
    end = seen.find(b"\r\n.\r\n")
    data, too_big, rest = asyncio.run(_read(stream, cuts, limit))
    assert not too_big
    assert data == seen[2:end + 2]
    assert rest == seen[end + 5:]


@settings(max_examples=200, deadline=None)
@given(body=st.lists(st.sampled_from(TOKENS), max_size=60).map(b"".join),
       cuts=st.lists(st.integers(1, 9), max_size=40),
       limit=st.sampled_from([8, 16, 64, 65536]))
def test_the_python_twin_search_ends_messages_at_the_same_place(body: bytes, cuts: list[int],
                                                                 limit: int) -> None:
    # An install without the C module searches with bytescan.py_find_line.
    stream = body + b"\r\n.\r\nQUIT\r\n"
    with_c = asyncio.run(_read(stream, cuts, limit))
    original = lines.find_line
    lines.find_line = bytescan.py_find_line
    try:
        assert asyncio.run(_read(stream, cuts, limit)) == with_c
    finally:
        lines.find_line = original


def test_an_empty_message_is_just_the_dot() -> None:
    assert asyncio.run(_read(b".\r\nQUIT\r\n", [1, 1], 64)) == (b"", False, b"QUIT\r\n")


def _parse(server: SMTP, arg: str) -> object:
    try:
        return server._getaddr(arg)
    except Exception as exc:  # aiosmtpd's parser raises on some garbage (e.g. "a@")
        return type(exc)


_FAST = RelaySMTP.__new__(RelaySMTP)
_FULL = SMTP.__new__(SMTP)
_FAST.local_part_limit = _FULL.local_part_limit = 64


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(list("aZ09.-_+!#@<> \"[]:=()\\,;\t")), max_size=30).map("".join))
def test_mail_and_rcpt_addresses_parse_as_aiosmtpd_does(text: str) -> None:
    for arg in (text, f"<{text}>", f"<{text}> SIZE=10", f"{text} BODY=8BITMIME"):
        assert _parse(_FAST, arg) == _parse(_FULL, arg)


def test_common_paths_and_the_local_part_limit() -> None:
    for arg in ("<a@b>", "<a.b+tag@c.example> SIZE=1 BODY=8BITMIME", "<>", "<a..b@c>",
                "<" + "x" * 64 + "@b>", "<" + "x" * 65 + "@b>", "<a@b> (comment) SIZE=1"):
        assert _parse(_FAST, arg) == _parse(_FULL, arg)
    assert _parse(_FAST, "<" + "x" * 65 + "@b>") == (None, None)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=30).map(b"".join))
def test_unstuff_removes_exactly_one_leading_dot_per_line(data: bytes) -> None:
    # The definition: every line (after the DATA line's CRLF) loses one leading ".".
    assert unstuff(data) == (b"\r\n" + data).replace(b"\r\n.", b"\r\n")[2:]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=30).map(b"".join))
def test_stuff_adds_exactly_one_leading_dot_per_line_and_unstuff_undoes_it(data: bytes) -> None:
    # What delivery sends (relayd/bytescan.py): every line that starts with "." gets one more.
    assert stuff(data) == (b"\r\n" + data).replace(b"\r\n.", b"\r\n..")[2:]
    assert unstuff(stuff(data)) == data


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=30).map(b"".join))
def test_line_endings_are_normalized_exactly_where_a_cr_or_lf_is_bare(data: bytes) -> None:
    # The definition: every CRLF, bare CR and bare LF becomes one CRLF; content whose CRs
    # and LFs are all in CRLF pairs comes back as the same object (no copy).
    expected = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    out = normalize_line_endings(data)
    assert out == expected
    if data.count(b"\r\n") == data.count(b"\r") == data.count(b"\n"):
        assert out is data
