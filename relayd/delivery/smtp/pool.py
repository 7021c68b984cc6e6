"""Delivery of one message to one smarthost (one attempt) over a pool of reused connections.

``SmarthostPool.deliver`` turns the smarthost's replies and errors into a ``DeliveryResult``
with one ``RecipientOutcome`` per recipient (SPEC "Delivery outcome rules"). It never touches
the spool and never retries later: scheduling and fallbacks are the queue manager's job.
Up to ``max_connections`` connections are kept per smarthost, each reused for many messages
(the next MAIL follows a completed transaction directly; RSET after a failed one; closed on a
protocol error, 421 or timeout). When the smarthost offers PIPELINING (RFC 2920), MAIL, every
RCPT and DATA go in one write: two round trips per message instead of three plus one per
recipient. The transaction's stages (MAIL, RCPT, DATA, the body) are in
relayd/delivery/smtp/transaction.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiosmtplib.errors import (
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPException,
    SMTPReadTimeoutError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from relayd.config.schema import Smarthost, TlsMode
from relayd.delivery.outcomes import local_reply
from relayd.delivery.smtp.auth import AuthFailed
from relayd.delivery.smtp.connection import TlsRequired, UpstreamConnection, build_tls_context
from relayd.delivery.smtp.outbox import write_message
from relayd.delivery.smtp.transaction import Stale, Transaction, TxState, commands, seven_bit
from relayd.errors import OAuthError
from relayd.model import DeliveryResult, RecipientOutcome, Reply, Status, TokenSource

# RFC 5321 §4.5.3.2.6: wait at least 10 minutes for the reply to the final dot. Giving up
# earlier makes the outcome unknown and the retry a likely duplicate.
MIN_DATA_TIMEOUT = 600.0
# Idle connections are closed after this long (servers drop idle sessions after 1-5 min);
# connections are not reused beyond this age (Postfix: smtp_connection_reuse_time_limit).
IDLE_CLOSE_AFTER = 30.0
MAX_CONNECTION_AGE = 300.0


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of one smarthost pool, for metrics and ``statistics()`` readers."""

    smarthost: str
    max_connections: int
    open_connections: int
    busy: int
    idle: int
    waiting: int
    connections_opened: int
    transactions: int


def _mailbox(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


def _os_reason(exc: OSError) -> str:
    # A name lookup's errno is a getaddrinfo code (EAI_NONAME is -2), not an errno:
    # os.strerror would make "Unknown error -2" of it. Its own text says what happened.
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    # asyncio words a refused connect "Connect call failed (...)"; the errno says it plainly.
    if exc.errno:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


def _during(exc: BaseException, step: str | None) -> str | None:
    """Where in setting up the session a timeout or a lost connection struck, in Postfix's
    words ("timed out while receiving the initial server greeting"), or None when ``step``
    is unknown or says nothing more than the exception does."""
    if step == "connect":
        # aiosmtplib times the greeting out as a connect timeout, caused by a read timeout;
        # a TCP connect (or implicit TLS handshake) timeout is caused by a plain TimeoutError.
        greeting = isinstance(exc, SMTPConnectTimeoutError) and isinstance(exc.__cause__, SMTPTimeoutError)
        return "while receiving the initial server greeting" if greeting else None
    if step == "STARTTLS" and exc.__cause__ is not None and not isinstance(exc, SMTPReadTimeoutError):
        # The 220 came, then the handshake timed out or the server dropped it (a server that
        # does not speak TLS 1.2 or later may just close). A missing 220 is a read timeout,
        # or a plain close, which has no cause.
        return "while performing the TLS handshake"
    return f"after {step}" if step in ("EHLO", "STARTTLS", "AUTH") else None


def describe_failure(exc: BaseException, smarthost: Smarthost,
                     step: str | None = None) -> tuple[Reply, str]:
    """A reply (the server's when it gave one, else a local one with an RFC 3463 DSN) and a
    plain sentence for a failure while connecting, securing or authenticating; ``step`` is
    the step of setting up the session that was under way (UpstreamConnection.step)."""
    where = f"{smarthost.host}:{smarthost.port}"
    cause = exc.__cause__
    during = _during(exc, step) if isinstance(exc, SMTPTimeoutError | SMTPServerDisconnected) else None
    if during is not None:
        if isinstance(exc, SMTPTimeoutError):
            return (local_reply("4.4.2", f"timed out {during}"),
                    f"conversation with {where} timed out {during} (timeout {smarthost.timeout:g}s)")
        return (local_reply("4.4.2", f"connection lost {during}"),
                f"{where} closed the connection {during}")
    if isinstance(exc, AuthFailed):
        return exc.reply, f"authentication failed at {where}: {exc}"
    if isinstance(exc, OAuthError):
        hint = f" ({exc.hint})" if exc.hint else ""
        return local_reply("4.7.0", "no OAuth access token"), f"no OAuth access token: {exc}{hint}"
    if isinstance(exc, TlsRequired):
        return local_reply("4.7.4", "STARTTLS not offered"), f"{where}: {exc}"
    ssl_err = exc if isinstance(exc, ssl.SSLError) else (
        cause if isinstance(cause, ssl.SSLError) else None)
    if isinstance(ssl_err, ssl.SSLCertVerificationError):
        detail = ssl_err.verify_message or str(ssl_err)
        return (local_reply("4.7.5", "TLS certificate verification failed"),
                f"TLS certificate verify failed for {smarthost.host}: {detail}")
    if ssl_err is not None:
        return (local_reply("4.7.5", "TLS handshake failed"),
                f"TLS handshake with {where} failed: {ssl_err.reason or ssl_err}")
    if isinstance(exc, SMTPConnectTimeoutError):
        return (local_reply("4.4.1", "connection timed out"),
                f"timed out connecting to {where} after {smarthost.timeout:g}s")
    if isinstance(exc, SMTPConnectResponseError):
        reply = Reply(exc.code, exc.message)
        return reply, f"{where} refused the session at greeting: {reply}"
    if isinstance(exc, SMTPConnectError):
        reason = _os_reason(cause) if isinstance(cause, OSError) else str(exc)
        if isinstance(cause, socket.gaierror):  # RFC 3463 X.4.3: the name service failed
            return local_reply("4.4.3", reason), f"cannot connect to {where}: {reason}"
        return local_reply("4.4.1", f"connect failed: {reason}"), f"cannot connect to {where}: {reason}"
    if isinstance(exc, SMTPTimeoutError):
        return (local_reply("4.4.2", "timed out"),
                f"timed out waiting for {where} after {smarthost.timeout:g}s")
    if isinstance(exc, SMTPServerDisconnected):
        return local_reply("4.4.2", "connection lost"), f"{where} closed the connection"
    if isinstance(exc, SMTPResponseException):
        reply = Reply(exc.code, exc.message)
        return reply, f"{where} answered {reply}"
    if isinstance(exc, OSError):
        return local_reply("4.3.0", "local error"), f"cannot set up TLS for {where}: {exc}"
    return local_reply("4.3.0", "local error"), f"{where}: {type(exc).__name__}: {exc}"


class SmarthostPool:
    """Connections to one smarthost, shared by concurrent deliveries (<= max_connections)."""

    def __init__(self, smarthost: Smarthost, *, hostname: str, token_source: TokenSource | None = None,
                 transcripts: bool = False, logger: logging.Logger | None = None,
                 data_timeout: float | None = None) -> None:
        self._sh = smarthost
        self._helo = smarthost.helo or hostname
        self._token_source = token_source
        self._transcripts = transcripts
        self._log = logger or logging.getLogger("relayd.forwarder")
        # Tests shorten it; in production it is never below RFC 5321's 10 minutes.
        self._data_timeout = (data_timeout if data_timeout is not None
                              else max(MIN_DATA_TIMEOUT, smarthost.timeout))
        self._slots = asyncio.Semaphore(smarthost.max_connections)
        self._idle: list[UpstreamConnection] = []
        self._tls_context: ssl.SSLContext | None = None
        self._busy = 0
        self._waiting = 0
        self._opened = 0
        self._transactions = 0
        self._closed = False
        self._reaper: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def smarthost(self) -> Smarthost:
        return self._sh

    def statistics(self) -> PoolStats:
        idle = sum(1 for c in self._idle if c.is_connected)
        return PoolStats(smarthost=self._sh.name, max_connections=self._sh.max_connections,
                         open_connections=idle + self._busy, busy=self._busy, idle=idle,
                         waiting=self._waiting, connections_opened=self._opened,
                         transactions=self._transactions)

    def retry_now(self) -> None:
        """The operator asked for delivery now (`relayd queue retry`): a failed token request
        is not waited out either."""
        if self._token_source is not None:
            self._token_source.forget_failure()

    async def aclose(self) -> None:
        """Close idle connections politely (QUIT); busy ones close when their delivery ends."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        idle, self._idle = self._idle, []
        await asyncio.gather(*(c.quit() for c in idle), *self._closing, return_exceptions=True)

    # -- delivery ---------------------------------------------------------------------------

    async def deliver(self, queue_id: str, content: bytes, mail_from: str, rcpts: Sequence[str],
                      *, smtputf8: bool = False) -> DeliveryResult:
        """One attempt to deliver ``content`` to ``rcpts``; waits for a free connection.

        ``content`` has CRLF line ends and is not dot-stuffed; ``mail_from`` "" is ``<>``.
        Never raises for an SMTP or network failure: the result says what happened.
        """
        transcript: list[str] = []
        record = self._recorder(queue_id, transcript) if self._transcripts else None
        rcpts = tuple(rcpts)
        if self._sh.outbox is not None:
            return await self._to_outbox(queue_id, content, mail_from, rcpts)
        self._waiting += 1
        started = time.monotonic()
        async with self._slots:
            self._waiting -= 1
            self._busy += 1
            got_slot = time.monotonic()
            try:
                tx = await self._deliver_with_slot(content, _mailbox(mail_from), rcpts,
                                                   smtputf8, record)
            finally:
                self._busy -= 1
        done = time.monotonic()
        if tx.seven_bit_note:
            self._log.info("%s: %s", queue_id, tx.seven_bit_note)
        missing = local_reply("4.3.0", "no outcome recorded")
        outcomes = tuple(tx.outcomes.get(r) or RecipientOutcome(r, Status.DEFERRED, missing, missing.dsn)
                         for r in rcpts)
        # A fault means "nothing got through because of the smarthost". Once any recipient
        # was delivered the result must not read as a fault: a caller that defers every
        # outcome of a faulted attempt would otherwise send the delivered ones twice.
        fault = tx.fault and not any(o.status is Status.SENT for o in outcomes)
        return DeliveryResult(smarthost=self._sh.name, relay=self._sh.relay, outcomes=outcomes,
                              smarthost_fault=fault, error=tx.error,
                              transcript=tuple(transcript), wait_seconds=got_slot - started,
                              setup_seconds=tx.setup_seconds,
                              transfer_seconds=max(0.0, done - got_slot - tx.setup_seconds))

    def _recorder(self, queue_id: str, lines: list[str]) -> Callable[[str], None]:
        relay = self._sh.relay

        def record(line: str) -> None:
            lines.append(line)
            self._log.info("%s: smtp %s %s", queue_id, relay, line)
        return record

    async def _to_outbox(self, queue_id: str, content: bytes, mail_from: str,
                         rcpts: tuple[str, ...]) -> DeliveryResult:
        assert self._sh.outbox is not None
        try:
            path = await write_message(self._sh.outbox, queue_id, content, _mailbox(mail_from), rcpts)
        except OSError as exc:
            reply = local_reply("4.3.0", f"cannot write to outbox: {exc.strerror or exc}")
            outcomes = tuple(RecipientOutcome(r, Status.DEFERRED, reply, reply.dsn) for r in rcpts)
            return DeliveryResult(self._sh.name, self._sh.relay, outcomes, smarthost_fault=True,
                                  error=f"cannot write to outbox {self._sh.outbox}: {exc}")
        reply = Reply(250, f"2.0.0 Ok: written to {path.name}")
        return DeliveryResult(self._sh.name, self._sh.relay,
                              tuple(RecipientOutcome(r, Status.SENT, reply, reply.dsn) for r in rcpts))

    async def _deliver_with_slot(self, content: bytes, sender: str, rcpts: tuple[str, ...],
                                 smtputf8: bool, record: Callable[[str], None] | None) -> TxState:
        tx = TxState(outcomes={})
        if not rcpts:
            return tx
        while True:
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                opening = time.monotonic()
                conn = await self._open(record, tx, rcpts)
                tx.setup_seconds += time.monotonic() - opening
                if conn is None:
                    return tx
            conn.set_recorder(record)
            try:
                await self._transactions_on(conn, content, sender, rcpts, smtputf8, tx, reused)
            except Stale:
                conn.close()
                continue  # the server dropped the idle session; nothing was accepted
            except BaseException:
                # Cancelled (shutdown) or a bug mid-transaction: the session state is unknown,
                # so it must never be reused.
                conn.close()
                raise
            finally:
                conn.set_recorder(None)
            self._release(conn)
            return tx

    async def _open(self, record: Callable[[str], None] | None, tx: TxState,
                    rcpts: tuple[str, ...]) -> UpstreamConnection | None:
        conn: UpstreamConnection | None = None
        try:
            if self._tls_context is None and self._sh.tls is not TlsMode.NONE:
                # Reading ca_file is file I/O: keep it off the event loop.
                self._tls_context = await asyncio.to_thread(build_tls_context, self._sh)
            conn = UpstreamConnection(self._sh, helo=self._helo, tls_context=self._tls_context,
                                      record=record)
            self._opened += 1
            await conn.open(self._token_source)
            return conn
        except asyncio.CancelledError:
            if conn is not None:
                conn.close()
            raise
        except (SMTPException, OSError, ssl.SSLError, TlsRequired, AuthFailed, OAuthError,
                ValueError, TimeoutError) as exc:
            if conn is not None:
                if conn.is_connected:
                    await conn.quit(timeout=min(2.0, self._sh.timeout))
                conn.close()
            reply, error = describe_failure(exc, self._sh, conn.step if conn is not None else None)
            if record is not None:
                record(f"error: {error}")
            self._log.debug("%s: %s", self._sh.relay, error)
            tx.fault = True
            tx.error = error
            for r in rcpts:
                tx.outcomes[r] = RecipientOutcome(r, Status.DEFERRED, reply, reply.dsn)
            return None

    def _take_idle(self) -> UpstreamConnection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # most recently used first: the warmest session
            if conn.is_connected and now - conn.idle_since < IDLE_CLOSE_AFTER:
                return conn
            conn.close()
        return None

    def _release(self, conn: UpstreamConnection) -> None:
        now = time.monotonic()
        if self._closed or not conn.is_connected or now - conn.opened_at > MAX_CONNECTION_AGE:
            if conn.is_connected:
                # QUIT in the background; keep a reference so the task is not collected early.
                task = asyncio.get_running_loop().create_task(conn.quit())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            else:
                conn.close()
            return
        conn.idle_since = now
        self._idle.append(conn)
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().call_later(IDLE_CLOSE_AFTER * 1.05, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        now = time.monotonic()
        keep = []
        for conn in self._idle:
            if conn.is_connected and now - conn.idle_since < IDLE_CLOSE_AFTER:
                keep.append(conn)
            else:
                conn.close()
        self._idle = keep
        if keep:
            self._reaper = asyncio.get_running_loop().call_later(IDLE_CLOSE_AFTER * 1.05, self._reap)

    # -- the SMTP transaction ------------------------------------------------------------------

    async def _transactions_on(self, conn: UpstreamConnection, content: bytes, sender: str,
                               rcpts: tuple[str, ...], smtputf8: bool, tx: TxState, reused: bool) -> None:
        pending = rcpts
        first = True
        eight_bit = not content.isascii()  # the one scan of the content for this
        if eight_bit and not conn.supports("8bitmime"):
            sendable = await seven_bit(conn, tx, content, rcpts)
            if sendable is None:
                return  # cannot be made 7-bit: every recipient failed 5.6.3, nothing sent
            content, eight_bit = sendable, False
        while pending:
            try:
                pending = await self._transaction(conn, content, sender, pending, smtputf8, tx,
                                                  eight_bit, stale_ok=reused and first)
            except (SMTPServerDisconnected, SMTPTimeoutError, OSError) as exc:
                # The outcome is unknown for everyone not answered yet: defer them (a message
                # lost after the final dot may arrive twice; RFC 5321 §6.1 prefers that).
                conn.close()
                reply, error = describe_failure(exc, self._sh)
                tx.fault = True
                tx.error = f"{error} during the transaction"
                for r in rcpts:
                    tx.outcomes.setdefault(r, RecipientOutcome(r, Status.DEFERRED, reply, reply.dsn))
                return
            first = False

    async def _transaction(self, conn: UpstreamConnection, content: bytes, sender: str,
                           rcpts: tuple[str, ...], smtputf8: bool, tx: TxState, eight_bit: bool,
                           stale_ok: bool) -> tuple[str, ...]:
        """One MAIL..DATA exchange, stage by stage (relayd/delivery/smtp/transaction.py);
        returns the recipients left for another transaction (a 452 to some RCPTs)."""
        prepared = commands(conn, tx, sender, rcpts, content, smtputf8, eight_bit)
        if prepared is None:
            return ()
        mail, group = prepared
        # smarthosts[].pipelining: false is the way out for a server that offers PIPELINING
        # but loses or reorders the replies of a group (Postfix: smtp_discard_ehlo_keywords).
        stages = Transaction(conn, tx, pipelined=self._sh.pipelining and conn.supports("pipelining"),
                             timeout=self._sh.timeout, data_timeout=self._data_timeout)
        reply = await stages.mail(mail, group, stale_ok=stale_ok)
        self._transactions += 1
        if reply.code != 250:
            # Every recipient gets the MAIL reply, not the 503s that follow it in a group.
            tx.settle(rcpts, reply, "MAIL")
            await stages.abandon(len(group) + 1)
            return ()
        got = await stages.recipients(group)
        if got is None:
            return ()  # 421: the session is over
        if not got.accepted:
            await stages.abandon(1)  # DATA's reply is still owed in a group
            return ()
        if not await stages.data(got.accepted):
            return ()
        await stages.body(content, got.accepted)
        return got.leftover
