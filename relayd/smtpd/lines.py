"""Command-line framing for the SMTP listener: a command line ends at CRLF and nowhere else.

RFC 5321 §2.3.8: SMTP lines end with CRLF; a bare CR or a bare LF is not a line end. aiosmtpd
reads a command line up to the first LF and strips the CR, so "MAIL FROM:<a>\\nRCPT TO:<b>\\r\\n"
ran as two commands and "RCPT TO:<b>\\rDATA\\r\\n" as one with a CR in its argument. Here the
line runs to the first CRLF, and a line holding any other CR or LF raises BareLineEnding before
aiosmtpd sees any of it: the listener refuses it whole with 500 5.5.2 (one reply for the line,
sent as soon as the bare CR or LF is seen) and the session goes on.

Only command lines (and AUTH responses, which aiosmtpd reads as lines too) are framed here;
message content is read by the listener's own DATA reader, which asks for its own separator.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

BARE_LINE_ENDING_REPLY = "500 5.5.2 Syntax error: bare CR or LF in a command line (lines end with CRLF)"


class BareLineEnding(Exception):
    """A command line held a CR or an LF that is not part of its closing CRLF."""


class CommandLineReader(asyncio.StreamReader):
    """A StreamReader whose lines (``readuntil()``, ``readline()``) end at CRLF only."""

    # A line was refused at a bare LF before its CRLF arrived: the rest of it is dropped
    # when the next line is asked for. The refusal goes out at once, so a client that ends
    # its commands with LF alone is told why rather than left waiting for a reply.
    _rest_refused = False

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
