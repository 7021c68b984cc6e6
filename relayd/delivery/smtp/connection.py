"""One SMTP client connection to a smarthost: connect, TLS, EHLO, AUTH and raw commands,
with a redacted transcript.

Built on aiosmtplib's ``SMTP`` for the socket, TLS, EHLO and AUTH, but issues its own
commands so that (a) STARTTLS is mandatory for ``tls: starttls`` (never aiosmtplib's
opportunistic default), (b) every line can be recorded with AUTH payloads redacted, and
(c) the message body is written in one piece (``send_body``) instead of aiosmtplib's
line-by-line re-normalisation. Once set up, the connection reads replies with relayd's own
reader (``smtp_replies``), which can take a pipelined group's replies (RFC 2920,
``send_group``); every command after set-up goes through it, pipelined or not.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Callable, Sequence

import aiosmtplib
from aiosmtplib.errors import SMTPResponseException, SMTPServerDisconnected, SMTPTimeoutError

from relayd.bytescan import stuff
from relayd.config.schema import Smarthost, TlsMode
from relayd.delivery.smtp.auth import authenticate
from relayd.delivery.smtp.replies import ReplyReader, check_command
from relayd.model import Reply, TokenSource

REDACTED = "<redacted>"


class TlsRequired(Exception):
    """``tls: starttls`` but the server does not offer STARTTLS: nothing is sent in clear."""


def build_tls_context(smarthost: Smarthost) -> ssl.SSLContext:
    """A client context: TLS >= 1.2, the system CAs or ``ca_file``, hostname checking."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=str(smarthost.ca_file) if smarthost.ca_file is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not smarthost.verify_certificate:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _reply(resp: aiosmtplib.SMTPResponse) -> Reply:
    # aiosmtplib joins continuation lines with "\n"; keep the last line's meaning intact.
    return Reply(resp.code, resp.message)


class UpstreamConnection:
    """An open, greeted, (TLS-protected,) authenticated session ready for MAIL."""

    def __init__(self, smarthost: Smarthost, *, helo: str, tls_context: ssl.SSLContext | None,
                 record: Callable[[str], None] | None) -> None:
        self.smarthost = smarthost
        self._helo = helo
        self._tls_context = tls_context
        self._record = record
        self._smtp = aiosmtplib.SMTP(
            hostname=smarthost.host, port=smarthost.port, local_hostname=helo,
            timeout=smarthost.timeout, use_tls=smarthost.tls is TlsMode.IMPLICIT,
            start_tls=False, tls_context=tls_context)
        self.extensions: dict[str, str] = {}
        self.auth_mechanism: str | None = None
        self.tls = False
        self.messages = 0
        # The step of ``open`` under way (for saying where a timeout or disconnect struck):
        # "connect" (TCP, implicit TLS and the greeting), "EHLO", "STARTTLS" or "AUTH".
        self.step = "connect"
        self._replies: ReplyReader | None = None
        self.opened_at = self.idle_since = time.monotonic()

    # -- transcript -------------------------------------------------------------------------

    def set_recorder(self, record: Callable[[str], None] | None) -> None:
        """Where transcript lines go for the next transaction (None: nowhere)."""
        self._record = record

    def _note(self, line: str) -> None:
        if self._record is not None:
            self._record(line)

    def note(self, line: str) -> None:
        """A line of relayd's own in the transcript (what it did to the message, say)."""
        self._note(line)

    def _note_reply(self, reply: Reply) -> None:
        if self._record is None:
            return
        lines = reply.text.split("\n") if reply.text else [""]
        for i, text in enumerate(lines):
            sep = "-" if i < len(lines) - 1 else " "
            # A 334 carries a SASL challenge (or Google's XOAUTH2 error blob): never shown.
            shown = REDACTED if reply.code == 334 and text else text
            self._record(f"S: {reply.code}{sep}{shown}".rstrip())

    # -- state --------------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._smtp.is_connected

    def supports(self, extension: str) -> bool:
        return extension.lower() in self.extensions

    @property
    def size_limit(self) -> int:
        """The server's SIZE limit (RFC 1870), 0 when unknown or unlimited."""
        value = self.extensions.get("size", "")
        return int(value) if value.strip().isdigit() else 0

    # -- session set-up ---------------------------------------------------------------------

    async def open(self, token_source: TokenSource | None) -> None:
        """Connect, (STARTTLS,) EHLO and AUTH. Raises on any failure; the caller closes."""
        sh = self.smarthost
        self._note(f"connecting to {sh.host}:{sh.port} (tls: {sh.tls.value})")
        self.step = "connect"
        greeting = await self._smtp.connect()
        self.tls = sh.tls is TlsMode.IMPLICIT
        self._note_reply(_reply(greeting))
        self.step = "EHLO"
        await self._ehlo()
        if sh.tls is TlsMode.STARTTLS:
            if not self.supports("starttls"):
                # RFC 3207 §4: a client that requires TLS must not go on without it.
                raise TlsRequired("the server does not offer STARTTLS; refusing to send "
                                  "in clear text (tls: starttls)")
            self._note("C: STARTTLS")
            self.step = "STARTTLS"
            resp = await self._smtp.starttls(server_hostname=sh.host)
            self._note_reply(_reply(resp))
            self.tls = True
            if self._tls_context is not None:
                self._note(f"TLS established ({self._tls_version()})")
            # RFC 3207 §4.2: forget everything learned before TLS and EHLO again.
            self.step = "EHLO"
            await self._ehlo()
        offered = self.extensions.get("auth", "").upper().split()
        self.step = "AUTH"
        self.auth_mechanism = await authenticate(self.command, sh.auth, offered, token_source)
        self.take_over()

    def _tls_version(self) -> str:
        obj = self._smtp.get_transport_info("ssl_object")
        return str(obj.version()) if obj is not None else "TLS"

    async def _ehlo(self) -> None:
        self._note(f"C: EHLO {self._helo}")
        try:
            resp = await self._smtp.ehlo()
        except aiosmtplib.SMTPHeloError as exc:
            self._note_reply(Reply(exc.code, exc.message))
            if exc.code not in (500, 502) or self.smarthost.tls is TlsMode.STARTTLS:
                raise
            # RFC 5321 §3.2: an old server without ESMTP; HELO, and no extensions at all.
            self._note(f"C: HELO {self._helo}")
            resp = await self._smtp.helo()
        self._note_reply(_reply(resp))
        self.extensions = dict(self._smtp.esmtp_extensions)

    # -- commands ---------------------------------------------------------------------------

    def take_over(self) -> None:
        """After set-up: read replies with relayd's own reader (``smtp_replies``), which
        keeps every reply of a pipelined group (RFC 2920); aiosmtplib's drops them."""
        proto = self._smtp.protocol
        if proto is None:
            raise SMTPServerDisconnected("Connection lost")
        self._replies = ReplyReader.attach(proto)

    async def command(self, line: bytes, *, secret: bool = False,
                      timeout: float | None = None) -> Reply:
        """Send one command line and return the reply; ``secret`` redacts the argument.

        A line with a control character is refused with ValueError (command injection).
        The connection is closed on a 421, a timeout or a disconnect.
        """
        if self._replies is not None:
            check_command(line)  # before the transcript: no CR/LF in a log line either
        if self._record is not None:
            if secret:
                verb = line.split(b" ", 2)
                shown = (b" ".join(verb[:2]).decode("ascii", "replace") + " " + REDACTED
                         if line.startswith(b"AUTH ") else REDACTED)
            else:
                shown = line.decode("utf-8", "replace")
            self._note(f"C: {shown}")
        if self._replies is not None:
            self._write(line + b"\r\n", 1)
            return await self.read_reply(timeout)
        # Set-up (AUTH): aiosmtplib's own reader, which also refuses control characters.
        try:
            resp = await self._smtp.execute_command(
                line, timeout=self.smarthost.timeout if timeout is None else timeout)
        except SMTPResponseException as exc:
            return self._malformed(exc)
        reply = _reply(resp)
        self._note_reply(reply)
        return reply

    def send_group(self, lines: Sequence[bytes]) -> None:
        """Write several commands in one write (RFC 2920 §3.1: the group ends with the one
        command whose reply changes what comes next, DATA); read each reply with
        ``read_reply``. Lines must have passed ``check_command``."""
        if self._record is not None:
            for line in lines:
                self._record(f"C: {line.decode('utf-8', 'replace')}")
        self._write(b"".join(line + b"\r\n" for line in lines), len(lines))

    async def read_reply(self, timeout: float | None = None) -> Reply:
        """The next reply after ``take_over``. A malformed reply comes back as code -1 (the
        connection is then closed); a 421 closes the connection (RFC 5321 §3.8)."""
        if self._replies is None:
            raise SMTPServerDisconnected("Connection lost")
        try:
            reply = await self._replies.read(self.smarthost.timeout if timeout is None else timeout)
        except (SMTPServerDisconnected, SMTPTimeoutError):
            # Unknown how far the server got: never pair a late reply with a later command.
            self.close()
            raise
        except SMTPResponseException as exc:
            return self._malformed(exc)
        self._note_reply(reply)
        if reply.code == 421:
            self.close()
        return reply

    def _write(self, data: bytes, replies: int) -> None:
        if self._replies is None:
            raise SMTPServerDisconnected("Connection lost")
        try:
            self._replies.send(data, replies)
        except SMTPServerDisconnected:
            self.close()
            raise

    async def send_body(self, content: bytes, timeout: float) -> Reply:
        """After ``354``: the dot-stuffed content and the final dot; returns the final reply.

        ``content`` has CRLF line ends and is not dot-stuffed (relayd/bytescan.py).
        """
        stuffed = stuff(content)
        end = b".\r\n" if (not stuffed or stuffed.endswith(b"\r\n")) else b"\r\n.\r\n"
        if self._record is not None:
            self._note(f"C: <message, {len(content)} bytes>")
            self._note("C: .")
        # One write, so one send(2), for body and terminator (a copy costs less).
        self._write(stuffed + end, 1)
        del stuffed  # not held while the reply is awaited: one copy per delivery, not two
        return await self.read_reply(timeout)

    async def send_lone_dot(self, timeout: float) -> Reply:
        """RFC 2920 §3.1: a pipelined DATA answered 354 although no recipient was accepted
        is ended with a single dot, never the message."""
        self._note("C: .")
        self._write(b".\r\n", 1)
        return await self.read_reply(timeout)

    async def quit(self, timeout: float = 2.0) -> None:
        """Polite QUIT (RFC 5321 §4.1.1.10), then close, ignoring errors on the way out."""
        if self._smtp.is_connected:
            with contextlib.suppress(Exception):  # closing anyway
                if self._replies is not None:
                    self._write(b"QUIT\r\n", 1)
                    await self._replies.read(timeout)
                else:
                    await self._smtp.execute_command(b"QUIT", timeout=timeout)
        self.close()

    def _malformed(self, exc: SMTPResponseException) -> Reply:
        """A reply aiosmtplib could not parse (code -1: garbage, no code, overlong): the
        session can no longer be trusted to pair replies with commands, so close it. The
        reply stays code -1, which the outcome rules treat as temporary, never as a 5xx: a
        garbled answer is no proof that the message was refused."""
        if exc.code != -1:
            raise exc
        self.close()
        reply = Reply(-1, f"malformed reply from the server: {exc.message.strip()[:200]}")
        self._note_reply(reply)
        return reply

    def close(self) -> None:
        self._smtp.close()
