"""Reading SMTP replies off a smarthost connection once the session is set up, in order,
several at a time (RFC 2920 command pipelining).

aiosmtplib's protocol parses one reply per wait: bytes that arrive while a parsed reply
waits to be picked up are dropped, and a second reply left in its buffer is not parsed until
more data arrives. A pipelined group (MAIL, RCPT..., DATA in one write) gets its replies
back-to-back, often in one segment, so after aiosmtplib has connected, secured and
authenticated, ``ReplyReader.attach`` puts this protocol on the transport in its place.
It buffers what arrives, parses every complete reply (RFC 5321 §4.2) into a queue, and hands
them out in order. Disconnects and EOF wake a waiting reader and are passed on to
aiosmtplib's protocol, so its ``is_connected`` and ``close()`` stay true to the socket.
"""

from __future__ import annotations

import asyncio
import collections
import re
from typing import cast

from aiosmtplib.errors import SMTPReadTimeoutError, SMTPResponseException, SMTPServerDisconnected
from aiosmtplib.protocol import SMTPProtocol

from relayd.model import Reply

# The same bounds as aiosmtplib's reader: one line, and one (multi-line) reply. A server
# streaming garbage without line ends, or endless continuation lines, costs at most this.
MAX_LINE_LENGTH = 8192
MAX_REPLY_LENGTH = MAX_LINE_LENGTH * 4
# RFC 5321 §4.2: three digits, then "-" (more lines follow), " " or the line end.
_REPLY_LINE = re.compile(rb"[0-9]{3}(?:[- \t\r\n]|$)")
# RFC 5321 §4.1.1: a command line carries no control characters; CR or LF in an address
# would smuggle in another command. aiosmtplib refuses these too (ValueError).
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def check_command(line: bytes) -> None:
    """Raise ValueError when ``line`` (without its CRLF) holds a control character."""
    if _CONTROL.search(line):
        raise ValueError("command contains a prohibited control character")


class ReplyReader(asyncio.Protocol):
    """The transport's protocol after set-up: queues the replies to commands sent.

    Only as many replies are parsed as commands were announced with ``expect``; bytes that
    arrive when no reply is due are dropped, as aiosmtplib does, so they can never be paired
    with a later command (an idle server's "421 timeout" is followed by its close anyway).
    """

    def __init__(self, inner: SMTPProtocol, transport: asyncio.BaseTransport) -> None:
        self._inner = inner
        self._transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._replies: collections.deque[Reply] = collections.deque()
        self._expected = 0
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    @classmethod
    def attach(cls, inner: SMTPProtocol) -> ReplyReader:
        """Take ``inner``'s transport over (plain or TLS, asyncio or uvloop)."""
        transport = inner.transport
        if transport is None or transport.is_closing():
            raise SMTPServerDisconnected("Connection lost")
        reader = cls(inner, transport)
        # Whatever aiosmtplib still buffers arrived unasked (it drops such data itself).
        del inner._buffer[:]
        transport.set_protocol(reader)
        return reader

    # -- used by the connection -----------------------------------------------------------

    def send(self, data: bytes, replies: int) -> None:
        """Write ``data`` (one write, so one send(2) when the socket takes it) holding
        ``replies`` commands whose replies are read back with ``read``."""
        if self._error is not None or self._transport.is_closing():
            raise SMTPServerDisconnected("Connection lost")
        # Counted before writing: a reply can only arrive after the write.
        self._expected += replies
        self._transport.write(data)

    async def read(self, timeout: float) -> Reply:
        """The next reply in order. Raises SMTPServerDisconnected, SMTPReadTimeoutError
        or SMTPResponseException (code -1) for a malformed or overlong reply."""
        if not self._replies:
            try:
                async with asyncio.timeout(timeout):
                    while not self._replies and self._error is None:
                        self._waiter = self._loop.create_future()
                        await self._waiter
            except TimeoutError as exc:
                raise SMTPReadTimeoutError("Timed out waiting for server response") from exc
            finally:
                self._waiter = None
            if not self._replies:
                assert self._error is not None
                error = self._error
                if isinstance(error, SMTPResponseException):
                    # Reported once; the connection is closed by now.
                    self._error = SMTPServerDisconnected("Connection closed after a malformed reply")
                raise error
        return self._replies.popleft()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._error is not None or (self._expected == 0 and not self._buffer):
            return
        self._buffer += data
        try:
            self._parse()
        except SMTPResponseException as exc:
            del self._buffer[:]
            self._fail(exc)
            # The session can no longer pair replies with commands.
            self._transport.close()
            return
        if self._expected == 0 and self._buffer:
            del self._buffer[:]  # more than was asked for: unsolicited
        if self._replies:
            self._wake()

    def _parse(self) -> None:
        buf = self._buffer
        start = 0  # of the reply being parsed
        pos = 0  # of the next line
        lines: list[bytes] = []
        code = -1
        while self._expected:
            end = buf.find(b"\n", pos)
            if end == -1:
                if len(buf) - pos > MAX_LINE_LENGTH or len(buf) - start > MAX_REPLY_LENGTH:
                    raise SMTPResponseException(-1, "Response too long")
                break
            line = bytes(buf[pos:end + 1])
            if len(line) > MAX_LINE_LENGTH or end + 1 - start > MAX_REPLY_LENGTH:
                raise SMTPResponseException(-1, "Response too long")
            if not _REPLY_LINE.match(line):
                text = line.decode("utf-8", "replace").strip()
                raise SMTPResponseException(-1, f"Malformed SMTP response line: {text}")
            pos = end + 1
            code = int(line[:3])
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                # The last line's code stands, as in aiosmtplib (RFC 5321 §4.2.1: they agree).
                text = b"\n".join(lines).decode("utf-8", "surrogateescape")
                self._replies.append(Reply(code, text))
                self._expected -= 1
                lines = []
                start = pos
        del buf[:start]

    def eof_received(self) -> bool:
        self._fail(SMTPServerDisconnected("Unexpected EOF received"))
        return bool(self._inner.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        lost = SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -- internals --------------------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
