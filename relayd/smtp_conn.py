"""One SMTP client connection to a smarthost: connect, TLS, EHLO, AUTH and raw commands,
with a redacted transcript.

Built on aiosmtplib's ``SMTP`` for the socket, TLS and reply parsing, but issues its own
commands so that (a) STARTTLS is mandatory for ``tls: starttls`` (never aiosmtplib's
opportunistic default), (b) every line can be recorded with AUTH payloads redacted, and
(c) the message body is written in one piece (``send_body``) instead of aiosmtplib's
line-by-line re-normalisation.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Callable

import aiosmtplib
from aiosmtplib.errors import SMTPResponseException, SMTPServerDisconnected, SMTPTimeoutError

from relayd.config import Smarthost, TlsMode
from relayd.model import Reply, TokenSource
from relayd.smtp_auth import authenticate

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
        self.opened_at = self.idle_since = time.monotonic()

    # -- transcript -------------------------------------------------------------------------

    def set_recorder(self, record: Callable[[str], None] | None) -> None:
        """Where transcript lines go for the next transaction (None: nowhere)."""
        self._record = record

    def _note(self, line: str) -> None:
        if self._record is not None:
            self._record(line)

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
        greeting = await self._smtp.connect()
        self.tls = sh.tls is TlsMode.IMPLICIT
        self._note_reply(_reply(greeting))
        await self._ehlo()
        if sh.tls is TlsMode.STARTTLS:
            if not self.supports("starttls"):
                # RFC 3207 §4: a client that requires TLS must not go on without it.
                raise TlsRequired("the server does not offer STARTTLS; refusing to send "
                                  "in clear text (tls: starttls)")
            self._note("C: STARTTLS")
            resp = await self._smtp.starttls(server_hostname=sh.host)
            self._note_reply(_reply(resp))
            self.tls = True
            if self._tls_context is not None:
                self._note(f"TLS established ({self._tls_version()})")
            # RFC 3207 §4.2: forget everything learned before TLS and EHLO again.
            await self._ehlo()
        offered = self.extensions.get("auth", "").upper().split()
        self.auth_mechanism = await authenticate(self.command, sh.auth, offered, token_source)

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

    async def command(self, line: bytes, *, secret: bool = False,
                      timeout: float | None = None) -> Reply:
        """Send one command line and return the reply; ``secret`` redacts the argument.

        aiosmtplib refuses control characters in arguments (command injection) with
        ValueError, and closes the connection itself on a 421, timeout or disconnect.
        """
        if self._record is not None:
            if secret:
                verb = line.split(b" ", 2)
                shown = (b" ".join(verb[:2]).decode("ascii", "replace") + " " + REDACTED
                         if line.startswith(b"AUTH ") else REDACTED)
            else:
                shown = line.decode("utf-8", "replace")
            self._note(f"C: {shown}")
        try:
            resp = await self._smtp.execute_command(
                line, timeout=self.smarthost.timeout if timeout is None else timeout)
        except SMTPResponseException as exc:
            return self._malformed(exc)
        reply = _reply(resp)
        self._note_reply(reply)
        return reply

    async def send_body(self, content: bytes, timeout: float) -> Reply:
        """After ``354``: the dot-stuffed content and the final dot; returns the final reply.

        ``content`` has CRLF line ends and is not dot-stuffed. RFC 5321 §4.5.2: a line
        starting with "." gets one more; one ``bytes.replace`` does the whole message.
        """
        proto = self._smtp.protocol
        lock = proto._command_lock if proto is not None else None
        if proto is None or lock is None:
            raise SMTPServerDisconnected("Connection lost")
        # find() is a memchr scan; replace() would copy the whole message even with no dots.
        stuffed = content.replace(b"\r\n.", b"\r\n..") if b"\r\n." in content else content
        if stuffed[:1] == b".":
            stuffed = b"." + stuffed
        end = b".\r\n" if (not stuffed or stuffed.endswith(b"\r\n")) else b"\r\n.\r\n"
        if self._record is not None:
            self._note(f"C: <message, {len(content)} bytes>")
            self._note("C: .")
        try:
            # Same protocol as aiosmtplib's execute_data_command: hold the command lock and
            # arm _response_pending before writing, so the reply is paired correctly.
            async with lock:
                proto._response_pending = True
                # One write, so one send(2), for body and terminator (a copy costs less).
                proto.write(stuffed + end)
                resp = await proto.read_response(timeout=timeout)
        except (SMTPServerDisconnected, SMTPTimeoutError):
            self.close()
            raise
        except SMTPResponseException as exc:
            return self._malformed(exc)
        reply = _reply(resp)
        self._note_reply(reply)
        if reply.code == 421:
            self.close()
        return reply

    async def quit(self, timeout: float = 2.0) -> None:
        """Polite QUIT (RFC 5321 §4.1.1.10), then close, ignoring errors on the way out."""
        if self._smtp.is_connected:
            with contextlib.suppress(Exception):  # closing anyway
                await self._smtp.execute_command(b"QUIT", timeout=timeout)
        self.close()

    def _malformed(self, exc: SMTPResponseException) -> Reply:
        """A reply aiosmtplib could not parse (code -1: garbage, no code, overlong): the
        session can no longer be trusted to pair replies with commands, so close it. The
        reply stays code -1, which the outcome rules treat as temporary, never as a 5xx
        (catalogue T79); it used to escape as an exception from the whole delivery."""
        if exc.code != -1:
            raise exc
        self.close()
        reply = Reply(-1, f"malformed reply from the server: {exc.message.strip()[:200]}")
        self._note_reply(reply)
        return reply

    def close(self) -> None:
        self._smtp.close()
