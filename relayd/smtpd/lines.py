"""Command-line framing for the SMTP listener: a command line ends at CRLF and nowhere else.

RFC 5321 §2.3.8: SMTP lines end with CRLF; a bare CR or a bare LF is not a line end. aiosmtpd
reads a command line up to the first LF and strips the CR, so "MAIL FROM:<a>\\nRCPT TO:<b>\\r\\n"
ran as two commands and "RCPT TO:<b>\\rDATA\\r\\n" as one with a CR in its argument. Here the
line runs to the first CRLF, and a line holding any other CR or LF raises BareLineEnding before
aiosmtpd sees any of it: the listener refuses it whole with 500 5.5.2 (one reply for the line,
sent as soon as the bare CR or LF is seen) and the session goes on.

Only command lines (and AUTH responses, which aiosmtpd reads as lines too) are framed here;
message content is read by the listener's own DATA reader through ``readuntil_line``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relayd.bytescan import find_line

BARE_LINE_ENDING_REPLY = "500 5.5.2 Syntax error: bare CR or LF in a command line (lines end with CRLF)"


class BareLineEnding(Exception):
    """A command line held a CR or an LF that is not part of its closing CRLF."""


class CommandLineReader(asyncio.StreamReader):
    """A StreamReader whose lines (``readuntil()``, ``readline()``) end at CRLF only."""

    # A line was refused at a bare LF before its CRLF arrived: the rest of it is dropped
    # when the next line is asked for. The refusal goes out at once, so a client that ends
    # its commands with LF alone is told why rather than left waiting for a reply.
    _rest_refused = False

    # StreamReader's own state (CPython's asyncio/streams.py, the same from 3.8 to 3.13),
    # which readuntil_line uses as readuntil does; typeshed does not declare it.
    _buffer: bytearray
    _limit: int
    _eof: bool
    _exception: BaseException | None
    if TYPE_CHECKING:
        async def _wait_for_data(self, func_name: str) -> None: ...
        def _maybe_resume_transport(self) -> None: ...

    async def readuntil_line(self, rest: bytes) -> bytes:
        """``readuntil(b"\\n" + rest)``, searching with relayd.bytescan.find_line: the DATA
        reader looks through every byte of every message, and StreamReader's ``find`` for
        a four-byte separator is a byte loop (bytescan's docstring has the numbers).

        Same contract as readuntil: LimitOverrunError leaves the data buffered (``consumed``
        bytes may be read without splitting a separator), IncompleteReadError at EOF."""
        seplen = 1 + len(rest)
        if self._exception is not None:
            raise self._exception
        offset = 0
        while True:
            buflen = len(self._buffer)
            if buflen - offset >= seplen:
                found = find_line(self._buffer, rest, offset)
                if found != -1:
                    break
                offset = buflen + 1 - seplen
                if offset > self._limit:
                    raise asyncio.LimitOverrunError(
                        "Separator is not found, and chunk exceed the limit", offset)
            if self._eof:
                chunk = bytes(self._buffer)
                self._buffer.clear()
                raise asyncio.IncompleteReadError(chunk, None)
            await self._wait_for_data("readuntil")
        if found > self._limit:
            raise asyncio.LimitOverrunError("Separator is found, but chunk is longer than limit",
                                            found)
        end = found + seplen
        # One copy out of the buffer (readuntil makes two); the views are released before
        # the buffer shrinks.
        with memoryview(self._buffer) as view, view[:end] as head:
            chunk = bytes(head)
        del self._buffer[:end]
        self._maybe_resume_transport()
        return chunk

    async def readuntil(self, separator: Any = b"\n") -> bytes:
        if separator != b"\n":
            return await super().readuntil(separator)  # the DATA reader's own searches
        if self._rest_refused:
            self._rest_refused = False
            await self._discard_through_crlf()
        try:
            line = await super().readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            # aiosmtpd drops exc.consumed bytes of an overlong line, then reads the rest as a
            # line. Leave the last byte buffered: were it the CR of the closing CRLF, the rest
            # would start with what looks like a bare LF.
            raise asyncio.LimitOverrunError(exc.args[0], exc.consumed - 1) from None
        # One find per line: the piece ends at its first LF, so it is a proper line exactly
        # when its first CR is the byte just before that LF.
        cr = line.find(b"\r")
        if cr >= 0 and cr == len(line) - 2:
            return line
        self._rest_refused = not line.endswith(b"\r\n")  # a bare LF: the line goes on
        raise BareLineEnding

    async def _discard_through_crlf(self) -> None:
        """Drop the rest of a refused line, however long, so none of it runs as a command."""
        while True:
            try:
                await super().readuntil(b"\r\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self.readexactly(exc.consumed)  # never splits a CRLF (stdlib keeps it)
            except asyncio.IncompleteReadError:
                return  # the client went away; the refusal is all that is left to do


class CommandLineProtocol(asyncio.StreamReaderProtocol):
    """Mixin for an aiosmtpd SMTP subclass, listed after SMTP: ``class X(SMTP,
    CommandLineProtocol)``. SMTP.__init__ builds a plain StreamReader and passes it up to
    StreamReaderProtocol; this sits between the two and passes a CommandLineReader with the
    same limit instead, so the reader the protocol feeds is the one aiosmtpd reads lines from.
    """

    line_length_limit: int  # the StreamReader limit, a class attribute of aiosmtpd's SMTP

    def __init__(self, stream_reader: asyncio.StreamReader,
                 client_connected_cb: Callable[..., Any] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        reader = CommandLineReader(limit=self.line_length_limit, loop=loop)
        super().__init__(reader, client_connected_cb=client_connected_cb, loop=loop)
