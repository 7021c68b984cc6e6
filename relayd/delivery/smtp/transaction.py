"""One SMTP mail transaction on an open connection (RFC 5321 §3.3), a method per stage: MAIL,
the RCPT group, DATA, and the body up to the reply to the final dot.

Each stage settles the recipients its reply decides into the delivery's ``TxState`` (SPEC
"Delivery outcome rules"); relayd/delivery/smtp/pool.py chains the stages, owns the connection
and turns the state into a ``DeliveryResult``. When the smarthost offers PIPELINING (RFC 2920)
MAIL, every RCPT and DATA go out in one write and their replies are read in order; otherwise
one command at a time. The outcomes are the same either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from aiosmtplib.errors import SMTPServerDisconnected, SMTPTimeoutError

from relayd.delivery.outcomes import classify_reply, is_smarthost_fault, local_reply, rcpt_reply
from relayd.delivery.smtp.connection import UpstreamConnection
from relayd.delivery.smtp.replies import check_command
from relayd.model import RecipientOutcome, Reply, Status

# One recipient and its RCPT command line.
RcptCommand = tuple[str, bytes]


class Stale(Exception):
    """A reused idle connection turned out dead before anything was accepted: reconnect."""


@dataclass
class TxState:
    """Mutable working state of one delivery's transactions (only inside relayd/delivery/smtp)."""

    outcomes: dict[str, RecipientOutcome]
    fault: bool = False
    error: str = ""
    setup_seconds: float = 0.0
    # The content made 7-bit for a server without 8BITMIME (once per delivery), and the
    # sentence that says so in the log.
    seven_bit: bytes | None = None
    seven_bit_note: str = ""

    def settle(self, rcpts: Sequence[str], reply: Reply, stage: str) -> None:
        """``reply`` at ``stage`` decides the outcome of ``rcpts`` (the first decision stands)."""
        fault = is_smarthost_fault(reply, None)
        status = Status.DEFERRED if fault else classify_reply(reply)
        if fault:
            self.fault = True
        if status is not Status.SENT and not self.error:
            self.error = f"{stage}: {reply}"
        for r in rcpts:
            self.outcomes.setdefault(r, RecipientOutcome(r, status, reply, reply.dsn))


@dataclass(frozen=True, slots=True)
class Recipients:
    """The RCPT stage's answer: accepted recipients, and those left for a new transaction."""

    accepted: tuple[str, ...]
    leftover: tuple[str, ...]


async def seven_bit(conn: UpstreamConnection, tx: TxState, content: bytes,
                    rcpts: tuple[str, ...]) -> bytes | None:
    """``content`` (8-bit) made 7-bit for a server that does not offer 8BITMIME
    (relayd/delivery/smtp/sevenbit.py); None, with every recipient failed, when it cannot be."""
    if tx.seven_bit is None:
        # lazy: the converter needs the email package (~1.5 MB), which the delivery process
        # loads only for an 8-bit message to a server without 8BITMIME.
        from relayd.delivery.smtp import sevenbit

        name = conn.smarthost.name
        try:
            # A worker thread: a large body takes a noticeable fraction of a second.
            done = await asyncio.to_thread(sevenbit.to_7bit, content)
        except sevenbit.Unconvertible as exc:
            # RFC 6152 §3: convert or do not deliver; 8-bit bytes are never sent to this server.
            tx.settle(rcpts, local_reply("5.6.3", f"smarthost {name} does not offer 8BITMIME "
                                                  f"and {exc} (RFC 6152)"), "MAIL")
            return None
        tx.seven_bit = done.content
        tx.seven_bit_note = (
            f"smarthost {name} does not offer 8BITMIME: the 8-bit body was converted to "
            f"quoted-printable ({done.parts} MIME part{'s' if done.parts != 1 else ''}; RFC 6152)"
            + ("; its DKIM signature no longer verifies" if done.dkim_signed else ""))
    conn.note(f"relayd: {tx.seven_bit_note}")
    return tx.seven_bit


def commands(conn: UpstreamConnection, tx: TxState, sender: str, rcpts: tuple[str, ...],
             content: bytes, smtputf8: bool, eight_bit: bool) -> tuple[bytes, list[RcptCommand]] | None:
    """The MAIL command and the RCPT command of each sendable recipient; None (every
    recipient settled) when nothing can be sent to this connection's server. ``eight_bit``:
    ``content`` is not ASCII (the caller scanned it once)."""
    needs_utf8 = not sender.isascii() or any(not r.isascii() for r in rcpts)
    if needs_utf8 and not conn.supports("smtputf8"):
        # RFC 6531 §3.4: without SMTPUTF8 the address cannot be carried; say so, don't mangle.
        tx.settle(rcpts, Reply(553, "5.6.7 the smarthost does not support SMTPUTF8 "
                                    "(non-ASCII address)"), "MAIL")
        return None
    limit = conn.size_limit
    if limit and len(content) > limit:
        tx.settle(rcpts, Reply(552, f"5.3.4 message size {len(content)} exceeds the "
                                    f"smarthost's limit of {limit}"), "MAIL")
        return None
    enc = "utf-8" if needs_utf8 else "ascii"
    mail = b"MAIL FROM:<" + sender.encode(enc) + b">"
    if conn.supports("size"):
        mail += b" SIZE=%d" % len(content)  # RFC 1870
    if eight_bit and conn.supports("8bitmime"):
        mail += b" BODY=8BITMIME"  # RFC 6152
    if (needs_utf8 or smtputf8) and conn.supports("smtputf8"):
        mail += b" SMTPUTF8"
    try:
        check_command(mail)
    except ValueError:
        tx.settle(rcpts, Reply(553, "5.1.7 invalid sender address"), "MAIL")
        return None
    group = _rcpt_commands(rcpts, enc, tx)
    return (mail, group) if group else None


def _rcpt_commands(rcpts: tuple[str, ...], enc: str, tx: TxState) -> list[RcptCommand]:
    """The RCPT command of each recipient; one with a control character fails here."""
    group = []
    for rcpt in rcpts:
        line = b"RCPT TO:<" + rcpt.encode(enc) + b">"
        try:
            check_command(line)
        except ValueError:
            bad = Reply(553, "5.1.3 invalid recipient address")
            tx.outcomes[rcpt] = RecipientOutcome(rcpt, Status.FAILED, bad, bad.dsn)
            continue
        group.append((rcpt, line))
    return group


class Transaction:
    """The stages of one MAIL..end-of-data exchange on ``conn``; ``pipelined`` when MAIL,
    the RCPTs and DATA go out as one group (RFC 2920)."""

    def __init__(self, conn: UpstreamConnection, tx: TxState, *, pipelined: bool, timeout: float,
                 data_timeout: float) -> None:
        self.conn = conn
        self.tx = tx
        self.pipelined = pipelined
        self._timeout = timeout
        self._data_timeout = data_timeout

    async def mail(self, mail: bytes, group: list[RcptCommand], *, stale_ok: bool) -> Reply:
        """Send MAIL (with the whole group when pipelined) and return its reply. ``stale_ok``:
        the connection was idle, so a dead one raises Stale (nothing was accepted yet)."""
        conn = self.conn
        try:
            if self.pipelined:
                # RFC 2920 §3.1: DATA may only end a group; the body waits for its 354.
                conn.send_group([mail, *(line for _, line in group), b"DATA"])
                reply = await conn.read_reply()
            else:
                reply = await conn.command(mail)
        except (SMTPServerDisconnected, OSError):
            if stale_ok:
                raise Stale() from None
            raise
        if stale_ok and reply.code == 421:
            raise Stale()
        return reply

    async def recipients(self, group: list[RcptCommand]) -> Recipients | None:
        """The RCPT replies; each refusal settles its recipient. None when a 421 ended the
        session (everyone of the group is settled then)."""
        conn, tx = self.conn, self.tx
        accepted: list[str] = []
        leftover: list[str] = []
        for i, (rcpt, line) in enumerate(group):
            # RFC 5321 §4.5.3.1.10: a 552 here is read as 452 (outcomes.rcpt_reply says when not).
            reply = rcpt_reply(await (conn.read_reply() if self.pipelined else conn.command(line)))
            if reply.code in (250, 251):
                accepted.append(rcpt)
            elif reply.code == 452 and accepted:
                # RFC 5321 §4.5.3.1.10: too many recipients; the rest go in a new transaction.
                # In a group the rest were sent too: those the server took anyway stay here.
                leftover.append(rcpt)
                if not self.pipelined:
                    leftover.extend(r for r, _ in group[i + 1:])
                    break
            elif reply.code == 421:
                # The server is closing (so is the connection): nothing was delivered.
                for unsent in ([r for r, _ in group[i:]], accepted, leftover):
                    tx.settle(unsent, reply, "RCPT")
                return None
            else:
                tx.settle([rcpt], reply, "RCPT")
        return Recipients(tuple(accepted), tuple(leftover))

    async def data(self, accepted: tuple[str, ...]) -> bool:
        """DATA's reply (sent already when pipelined); False, with ``accepted`` settled and
        the session reset, unless it is 354."""
        reply = await (self.conn.read_reply() if self.pipelined else self.conn.command(b"DATA"))
        if reply.code != 354:
            self.tx.settle(accepted, reply, "DATA")
            await self._reset()
            return False
        return True

    async def body(self, content: bytes, accepted: tuple[str, ...]) -> None:
        """The message and the final dot; the reply settles every accepted recipient."""
        reply = await self.conn.send_body(content, self._data_timeout)
        self.conn.messages += 1
        self.tx.settle(accepted, reply, "end of data")

    async def abandon(self, replies: int) -> None:
        """End a transaction that delivers nothing: read the ``replies`` still owed by a
        pipelined group, then RSET."""
        if self.pipelined:
            await self._finish_group(replies)
        await self._reset()

    async def _finish_group(self, replies: int) -> None:
        """Read the rest of a pipelined group that delivers nothing (MAIL refused, or no
        recipient accepted) so the session stays in step. RFC 2920 §3.1: DATA's reply must
        be checked too; a server that answers 354 anyway gets a single dot, never the
        message. Every outcome is known already, so a failure here only closes."""
        conn = self.conn
        try:
            reply = None
            for _ in range(replies):
                if not conn.is_connected:
                    return  # a 421 closed it
                reply = await conn.read_reply()
            if reply is not None and reply.code == 354 and conn.is_connected:
                await conn.send_lone_dot(self._timeout)
        except (SMTPServerDisconnected, SMTPTimeoutError, OSError):
            conn.close()

    async def _reset(self) -> None:
        """RSET after a failed transaction so the session can be reused (RFC 5321 §4.1.1.5)."""
        if not self.conn.is_connected:
            return
        reply = await self.conn.command(b"RSET")
        if reply.code != 250:
            self.conn.close()
