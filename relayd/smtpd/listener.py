"""The SMTP listener: aiosmtpd sessions from local apps, checked and handed to an Acceptor.

Responsibilities at the boundary: client allow-list (554 at connect), a cap on concurrent
sessions (421), size (552) and recipient (452) limits, command lines that end with CRLF only
(RFC 5321 §2.3.8, framed by relayd.smtpd.lines), address syntax (501, 553), strict end-of-data
detection (only CRLF "." CRLF ends DATA: RFC 5321 §4.1.1.4, the SMTP smuggling fix), Received
(RFC 5321 §4.4), Date / Message-ID when the app left them out (RFC 5322 §3.6), and no Bcc /
Resent-Bcc header fields (blind recipients stay blind, as Postfix's cleanup(8) does). The
Acceptor (the daemon) runs the policy and the spool; this module never touches either.

DATA is read in large chunks rather than line by line: at 100 KB per message aiosmtpd's
per-line loop costs most of the CPU of the whole relay.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import ipaddress
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from relayd import faults
from relayd.bytescan import line_ends_ok, unstuff
from relayd.config.schema import Config
from relayd.model import Envelope, Reply
from relayd.smtpd.lines import (
    BARE_LINE_ENDING_REPLY,
    BareLineEnding,
    CommandLineProtocol,
    CommandLineReader,
)
from relayd.spool.records import new_queue_id
from relayd.units import HostPort, is_address

log = logging.getLogger("relayd.listener")

_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_HEADER_END = b"\r\n\r\n"
_HAS_DATE = re.compile(rb"(?im)^date[ \t]*:")
_HAS_MSGID = re.compile(rb"(?im)^message-id[ \t]*:")
_HAS_BCC = re.compile(rb"(?im)^(?:resent-)?bcc[ \t]*:")
# A whole Bcc / Resent-Bcc field: its first line and any folded continuation lines.
_BCC_FIELD = re.compile(rb"(?im)^(?:resent-)?bcc[ \t]*:[^\n]*\n(?:[ \t][^\n]*\n)*")
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-_\[\]:]")
# "<dot-atom@domain>" (RFC 5321 §4.1.2), the form nearly every MAIL / RCPT uses. aiosmtpd parses
# each address with the email package's header parser (and defines a class per call), which
# costs more than the rest of the command; this form gives the same result without it.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")


@dataclass(frozen=True)
class ListenerSettings:
    """The listener's slice of the configuration."""

    hostname: str
    listen: tuple[HostPort, ...]
    allowed_clients: tuple[_IPNetwork, ...]
    max_message_size: int
    max_recipients: int
    max_sessions: int = 100
    command_timeout: float = 300.0
    # aiosmtpd's timeout restarts on every valid command (and our DATA reader restarts it per
    # chunk), so a client trickling NOOPs or bytes could hold a session slot forever: cap the
    # whole session. Long enough for hundreds of messages.
    session_timeout: float = 3600.0

    @classmethod
    def from_config(cls, cfg: Config) -> ListenerSettings:
        return cls(hostname=cfg.hostname, listen=cfg.listen, allowed_clients=cfg.allowed_clients,
                   max_message_size=cfg.max_message_size, max_recipients=cfg.max_recipients,
                   max_sessions=cfg.max_sessions)


class Acceptor(Protocol):
    """What the listener hands accepted mail to (implemented by the daemon)."""

    def check_recipient(self, mail_from: str, rcpt: str) -> Reply | None:
        """A refusal for RCPT TO (e.g. do-not-email with action reject), or None."""

    async def accept(self, queue_id: str, envelope: Envelope, content: bytes) -> Reply:
        """Store the message durably and answer 250, or answer why not (4xx/5xx)."""


def client_allowed(peer: Any, allowed: Iterable[_IPNetwork]) -> bool:
    """True when the peer address is inside one of the allowed networks."""
    if not isinstance(peer, tuple) or not peer:
        return False  # unix sockets are not used for SMTP here
    try:
        ip = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in allowed)


def normalize_line_endings(content: bytes) -> bytes:
    """Turn bare LF and bare CR into CRLF, so stored bytes are exactly what is sent."""
    if line_ends_ok(content):
        return content
    return _LINE_ENDS.sub(b"\r\n", content)


@functools.lru_cache(maxsize=4)
def _rfc5322_date(second: int) -> str:
    """The Date / Received timestamp (RFC 5322 §3.3), formatted once per second, not per
    message (email.utils is among the listener's larger per-message costs)."""
    return email.utils.formatdate(second, localtime=True)


def stamp(content: bytes, *, queue_id: str, envelope: Envelope, hostname: str, esmtp: bool,
          now: float) -> bytes:
    """Prepend Received, add Date / Message-ID when missing and drop Bcc / Resent-Bcc (pure)."""
    end = content.find(_HEADER_END)
    if content.startswith(b"\r\n"):
        block, end = b"", 0
    else:
        block = content if end < 0 else content[:end + 2]
    if _HAS_BCC.search(block):
        # The blind recipients are in the envelope; a Bcc field that reached the smarthost
        # would show them to every recipient (RFC 5322 §3.6.3 leaves removal to the sender).
        kept = _BCC_FIELD.sub(b"", block)
        content, block = kept + content[len(block):], kept
    date = _rfc5322_date(int(now))
    helo = _HELO_SAFE.sub("?", envelope.helo)[:255] or "unknown"
    proto = ("UTF8SMTP" if envelope.smtputf8 else "ESMTP") if esmtp else "SMTP"
    rcpt = f"\r\n\tfor <{envelope.rcpt_tos[0]}>" if len(envelope.rcpt_tos) == 1 else ""
    received = (f"Received: from {helo} ([{envelope.client}])\r\n\tby {hostname} (relayd) "
                f"with {proto} id {queue_id}{rcpt};\r\n\t{date}\r\n")
    extra = []
    if not _HAS_DATE.search(block):
        extra.append(f"Date: {date}\r\n")
    if not _HAS_MSGID.search(block):
        extra.append(f"Message-ID: <{queue_id}@{hostname}>\r\n")
    head = (received + "".join(extra)).encode("utf-8")
    if not block and extra:
        # No header section at all: the added headers must be followed by the blank line.
        return head + (content if content.startswith(b"\r\n") else b"\r\n" + content)
    return head + content


class RelaySMTP(SMTP, CommandLineProtocol):
    """aiosmtpd's SMTP with relayd's connect checks, command lines that end at CRLF only
    (CommandLineProtocol), and a chunked, strict DATA reader."""

    # The StreamReader limit: large enough that DATA arrives in big chunks. Command lines are
    # still limited by aiosmtpd's per-command size limits (RFC 5321 §4.5.3.1.4).
    line_length_limit = 64 * 1024

    def __init__(self, handler: RelayHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._relay = handler
        self._refusal: str | None = None
        self._session_timer: asyncio.TimerHandle | None = None
        self._idle_deadline = 0.0
        self._bare_line_logged = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self._refusal = self._relay.on_connect(transport.get_extra_info("peername"))
            self._session_timer = self.loop.call_later(self._relay.settings.session_timeout,
                                                       self._session_expired)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's idle timeout, armed lazily.

        aiosmtpd cancels and re-creates its timer for every command and (here) every DATA
        chunk: four or five timer objects per message. Instead the deadline moves forward
        and one timer, when it fires early, re-arms itself for the rest of the time. A
        shorter duration than the pending timer's (aiosmtpd's PROXY wait) re-arms at once.
        """
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._idle_deadline = deadline
        handle = self._timeout_handle
        if handle is not None and not handle.cancelled() and handle.when() <= deadline:
            return  # fires first, then re-arms for what is left
        if handle is not None:
            handle.cancel()
        self._timeout_handle = self.loop.call_at(deadline, self._idle_check)

    def _idle_check(self) -> None:
        self._timeout_handle = None
        if self.loop.time() < self._idle_deadline:
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_check)
            return
        self._timeout_cb()  # type: ignore[no-untyped-call]

    def _session_expired(self) -> None:
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(f"421 4.4.2 {self.hostname} session too long, closing "
                                 "connection\r\n".encode())
            transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        self._relay.on_disconnect()
        if self._session_timer is not None:
            self._session_timer.cancel()
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self._refusal is not None:
            await self.push(self._refusal)
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, BareLineEnding):
            # Refused whole, before aiosmtpd parsed any of it (RFC 5321 §2.3.8); the session
            # stays usable, so the client's next, well-formed command is answered as usual.
            # Logged once per session: such lines cost a client three bytes each.
            if not self._bare_line_logged:
                self._bare_line_logged = True
                peer = self.session.peer if self.session is not None else None
                log.warning("reject: command from %s: bare CR or LF in the line (RFC 5321 "
                            "§2.3.8; not logged again for this session)", _peer_text(peer))
            return BARE_LINE_ENDING_REPLY
        return await super().handle_exception(error)

    def _strip_command_keyword(self, keyword: str, arg: str) -> str | None:
        # aiosmtpd's address parser (the email package's) reads "<a@example.org" as if the ">"
        # were there. RFC 5321 §4.1.2: Path = "<" [ A-d-l ":" ] Mailbox ">", so an unclosed
        # path is a syntax error; None makes smtp_MAIL / smtp_RCPT answer their 501.
        path = super()._strip_command_keyword(keyword, arg)
        if path is not None and path[:1] == "<" and not _path_closed(path):
            return None
        return path

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        m = _SIMPLE_PATH.match(arg) if arg else None
        rest = arg[m.end():] if m is not None else ""
        if m is None or "(" in rest:
            return super()._getaddr(arg)  # anything unusual: aiosmtpd's full parser
        addr = m.group(1)
        if self.local_part_limit and addr.rindex("@") > self.local_part_limit:
            return None, None
        return addr, rest.lstrip(" \t")  # the parser drops the folding white space too

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        raw, too_big = await self._read_data()
        # RFC 5321 §4.5.2: remove the leading dot of every line that has one. (One pass over
        # the data, none when no line starts with a dot; the first line is looked at alone.)
        content = b"" if too_big else unstuff(raw)
        del raw  # the session holds one copy while the message is stored (docs/performance.md)
        if too_big or (self.data_size_limit and len(content) > self.data_size_limit):
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push("552 5.3.4 Error: message exceeds the maximum size "
                            f"of {self.data_size_limit} bytes")
            return
        self.envelope.original_content = content
        self.envelope.content = content
        del content  # the handler takes it from the envelope, and lets go of the unstamped copy
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)

    async def _read_data(self) -> tuple[bytes, bool]:
        """Read up to CRLF "." CRLF; returns (dot-stuffed data without the terminator, too_big).

        Only CRLF.CRLF ends the data: LF.LF, CR.CR, LF.CRLF and CRLF.LF are content
        (SMTP smuggling, CVE-2023-51764 class). The search is for LF "." CRLF, which in
        well-formed content occurs only at the terminator (a line holding just a dot is sent
        as ".."), so a message arrives in a few reads of up to the StreamReader limit however
        many of its lines end with a full stop; the byte before it must then be CR.
        """
        reader = cast(CommandLineReader, self._reader)  # CommandLineProtocol made it
        # Stop buffering well past the limit (dot-stuffing can at most double a message).
        cap = 2 * self.data_size_limit + 1024 if self.data_size_limit else 0
        chunks: list[bytes] = []
        size = 0
        too_big = False
        last = b"\n"  # the byte before the next piece
        # After a CRLF that was not matched as part of a terminator (the DATA line's own, or
        # the end of an LF.CRLF that was content), the terminator may be a bare ".\r\n"
        # which the search cannot see: look at the next bytes first.
        at_line_start = True
        while True:
            self._reset_timeout()
            if at_line_start:
                at_line_start = False
                piece = await reader.readexactly(1)
                if piece == b".":
                    piece += await reader.readexactly(2)
                    if piece == b".\r\n":
                        break
                ended = False
            else:
                try:
                    piece = await reader.readuntil_line(b".\r\n")
                    ended = True
                except asyncio.LimitOverrunError as exc:
                    # The last three bytes stay buffered, so a terminator is never split.
                    piece = await reader.readexactly(exc.consumed)
                    ended = False
            faults.crash_point("data")
            if ended:
                before = piece[-5:-4] if len(piece) >= 5 else last
                if before == b"\r":
                    if not too_big:
                        chunks.append(piece[:-3])
                    break
                at_line_start = True
            size += len(piece)
            if cap and size > cap:
                too_big = True
                chunks.clear()
            if not too_big:
                chunks.append(piece)
            last = piece[-1:]
        return b"".join(chunks), too_big


class RelayHandler:
    """aiosmtpd handler hooks: limits and address checks, then the Acceptor."""

    def __init__(self, settings: ListenerSettings, acceptor: Acceptor) -> None:
        self.settings = settings
        self.acceptor = acceptor
        self.sessions = 0

    # Called by RelaySMTP, not aiosmtpd.
    def on_connect(self, peer: Any) -> str | None:
        self.sessions += 1
        if not client_allowed(peer, self.settings.allowed_clients):
            log.warning("reject: connect from %s: client not in allowed_clients", _peer_text(peer))
            return f"554 5.7.1 {self.settings.hostname} relaying denied: client not allowed"
        if self.sessions <= self.settings.max_sessions:
            log.info("connect from %s", _peer_text(peer))  # Postfix smtpd's "connect from" line
        if self.sessions > self.settings.max_sessions:
            log.warning("reject: connect from %s: too many sessions (%d)", _peer_text(peer),
                        self.settings.max_sessions)
            return f"421 4.7.0 {self.settings.hostname} too many connections, try again later"
        return None

    def on_disconnect(self) -> None:
        self.sessions -= 1

    # Overridden by the submission listener (relayd/smtpd/submission.py).
    def refuse_content(self, server: SMTP, content: bytes) -> str | None:
        """A reply refusing the message at the final dot, or None."""
        return None

    def identity(self, server: SMTP) -> tuple[str, str, bool]:
        """(authenticated user, SASL mechanism, priority) of the session: none here."""
        return "", "", False

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        # aiosmtpd reads pipelined commands in order and never discards the buffer, so
        # PIPELINING (RFC 2920) is safe to advertise.
        responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, mail_options: list[str]) -> str:
        # The null reverse-path "<>" (RFC 5321 §4.5.5) stays "<>" here because aiosmtpd
        # treats an empty mail_from as "no MAIL yet"; the Envelope record gets "".
        if address != "<>" and not _address_ok(address):
            return "553 5.1.7 Bad sender address syntax"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return "452 4.5.3 Error: too many recipients"
        if not _address_ok(address):
            return "553 5.1.3 Bad recipient address syntax"
        sender = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
        refusal = self.acceptor.check_recipient(sender, address)
        if refusal is not None:
            return f"{refusal.code} {refusal.text}"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        content = envelope.original_content or b""
        # From here on only this frame holds the message as received: the stamped copy
        # below replaces it, so a session waiting for the spool holds one copy, not three.
        envelope.original_content = envelope.content = None
        if b"\x00" in content:
            return "554 5.6.0 Message contains NUL bytes (RFC 5322 §2.2)"
        content = normalize_line_endings(content)
        refusal = self.refuse_content(server, content)
        if refusal is not None:
            return refusal
        peer = session.peer
        now = time.time()
        user, method, priority = self.identity(server)
        env = Envelope(
            mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            client=str(peer[0]) if isinstance(peer, tuple) and peer else "",
            helo=_storable(session.host_name or ""),
            received_at=now,
            smtputf8=bool(envelope.smtp_utf8),
            priority=priority,
            user=user,
            auth_method=method,
        )
        queue_id = new_queue_id(now)
        content = stamp(content, queue_id=queue_id, envelope=env, hostname=self.settings.hostname,
                        esmtp=bool(session.extended_smtp), now=now)
        try:
            # Shielded: a client that disconnects mid-commit must not leave half a message.
            reply = await asyncio.shield(self.acceptor.accept(queue_id, env, content))
        except Exception:  # the only broad catch here: the client must keep its message
            log.exception("%s: unexpected error while accepting a message", queue_id)
            return "451 4.3.0 Temporary local error, try again later"
        return f"{reply.code} {reply.text}"


def _storable(text: str) -> str:
    """aiosmtpd decodes command arguments with surrogateescape: undecodable bytes (a HELO
    name in Latin-1, say) would make the spool's UTF-8 envelope unwritable, and every message
    of the session would get 451 forever. Keep them visible as U+FFFD instead."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _path_closed(path: str) -> bool:
    """True when the "<" that opens ``path`` has its ">": the first one outside a quoted local
    part (RFC 5321 §4.1.2 allows ">" inside a Quoted-string, as in <"a>b"@example.org>)."""
    end = path.find(">")
    if end < 0:
        return False
    if path.find('"', 0, end) < 0:
        return True  # the usual case: no quoting before the first ">"
    quoted = False
    i = 1
    while i < len(path):
        c = path[i]
        if quoted and c == "\\":
            i += 2  # quoted-pairSMTP: the next character is literal
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return True
        i += 1
    return False


def _address_ok(address: str) -> bool:
    if any(c in address for c in "\r\n\x00"):
        return False
    return is_address(address)


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}"
    return str(peer)


class Listener:
    """Binds every ``listen`` address (or the sockets systemd passed) and serves SMTP."""

    def __init__(self, settings: ListenerSettings, acceptor: Acceptor) -> None:
        self.settings = settings
        self.handler = RelayHandler(settings, acceptor)
        self._servers: list[asyncio.Server] = []

    def _factory(self) -> RelaySMTP:
        return RelaySMTP(
            self.handler,
            hostname=self.settings.hostname,
            ident="relayd ESMTP",
            data_size_limit=self.settings.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=self.settings.command_timeout,
            # Generous for transactions, tight for commands that only burn CPU.
            command_call_limit={"NOOP": 50, "RSET": 200, "HELP": 10, "VRFY": 10, "EXPN": 10,
                                "*": 100000},
        )

    async def start(self, sockets: list[Any] | None = None) -> list[tuple[str, int]]:
        """Start serving; returns the bound (host, port) pairs (port 0 picks a free port)."""
        loop = asyncio.get_running_loop()
        if sockets:
            for sock in sockets:
                self._servers.append(await loop.create_server(self._factory, sock=sock))
        else:
            for hp in self.settings.listen:
                self._servers.append(await loop.create_server(
                    self._factory, host=hp.host, port=hp.port, reuse_address=True))
        return self.addresses

    @property
    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                out.append((str(name[0]), int(name[1])))
        return out

    def stop_accepting(self) -> None:
        for server in self._servers:
            server.close()

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop accepting, give open sessions ``grace`` seconds, then close them."""
        self.stop_accepting()
        waits = [asyncio.create_task(s.wait_closed()) for s in self._servers]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace)
            for task in pending:
                task.cancel()
        self._servers.clear()
