"""The sendmail-compatible command: hands a message from stdin to the running daemon.

``relayd sendmail ...``, ``relayd-sendmail`` and a ``/usr/sbin/sendmail`` (or ``mailq``)
symlink all end in ``main``. The message goes over SMTP to the first ``listen`` address of
the config, so it passes the same policy and is durable in the spool before this command
exits 0. Exit codes follow sysexits.h, which cron, PHP and content filters understand:
0 stored; 64 usage (bad option, no recipient, a recipient or sender refused with 5xx);
65 data error (message refused with 5xx); 69 relayd refuses this client (5xx greeting);
75 temporary failure (daemon down, 4xx, timeout: the caller may retry); 77 no permission
to read the queue (-bp); 78 invalid config. Never 0 for a message that was not stored.

Uses only the standard library's blocking smtplib: this is a short-lived process that cron
and PHP start once per message, with no event loop. Its settings (listen, hostname,
local_domain, spool) come from ``relayd.config.load.load_client_config``: the daemon's own
readers and defaults for those keys, without reading the secrets this caller may not read.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import smtplib
import socket
import sys
import threading
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relayd.commands.io import (
    EX_CONFIG,
    EX_DATAERR,
    EX_NOPERM,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    IO,
    config_path,
)
from relayd.commands.sendmail_args import (
    ByteStream,
    Mode,
    UsageError,
    parse_args,
    prepare,
    read_message,
)
from relayd.config.load import load_client_config
from relayd.errors import ConfigError
from relayd.units import HostPort

if TYPE_CHECKING:
    from relayd.spool.store import Spool

CONNECT_TIMEOUT = 15.0
# The daemon fsyncs before its 250; a slow disk must not turn into a duplicate retry.
SESSION_TIMEOUT = 120.0


class SubmitError(Exception):
    """Submission failed; ``exit_code`` is the sysexits code for the caller."""

    def __init__(self, exit_code: int, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.unreachable = unreachable  # no connection at all: another address may work


def daemon_addresses(listen: Sequence[HostPort]) -> list[tuple[str, int]]:
    """Where to reach the daemon, in ``listen`` order (the first one normally answers; the
    others cover e.g. a host without IPv6); wildcard addresses become loopback."""
    out: list[tuple[str, int]] = []
    for hp in listen or (HostPort("127.0.0.1", 25),):
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(hp.host, hp.host)
        if (host, hp.port) not in out:
            out.append((host, hp.port))
    return out


def submit_any(addresses: Sequence[tuple[str, int]], **kwargs: Any) -> str:
    """``submit`` to the first address that accepts a connection."""
    error: SubmitError | None = None
    for address in addresses:
        try:
            return submit(address, **kwargs)
        except SubmitError as exc:
            if not exc.unreachable:
                raise
            error = error or exc  # report the first (main) address
    assert error is not None
    raise error


def _reply_text(code: int, msg: bytes | str) -> str:
    text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else msg
    return f"{code} {' '.join(text.split())}"


def _class_exit(code: int, permanent_exit: int) -> int:
    return EX_TEMPFAIL if code < 500 else permanent_exit


def submit(address: tuple[str, int], *, helo: str, sender: str, recipients: Iterable[str],
           content: bytes, timeout: float = SESSION_TIMEOUT) -> str:
    """One SMTP transaction with the daemon; returns its final reply (``250 ... queued as ID``).

    All or nothing: if any recipient is refused the transaction is reset, so a caller that
    retries after a non-zero exit never duplicates mail to the recipients that were accepted.
    Raises ``SubmitError``.
    """
    host, port = address
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        smtp = smtplib.SMTP(timeout=CONNECT_TIMEOUT, local_hostname=helo)
        code, msg = smtp.connect(host, port)
    except smtplib.SMTPConnectError as exc:
        raise SubmitError(_class_exit(exc.smtp_code, EX_UNAVAILABLE),
                          f"relayd at {where} refused the connection: "
                          f"{_reply_text(exc.smtp_code, exc.smtp_error)}") from None
    except (OSError, smtplib.SMTPException) as exc:
        raise SubmitError(EX_TEMPFAIL, f"cannot reach relayd at {where} ({_os_reason(exc)}); "
                          "the message was not sent, try again later", unreachable=True) from None
    try:
        if code != 220:
            raise SubmitError(_class_exit(code, EX_UNAVAILABLE),
                              f"relayd at {where} refused the connection: {_reply_text(code, msg)}")
        if smtp.sock is not None:
            smtp.sock.settimeout(timeout)
        code, msg = smtp.ehlo()
        if code != 250:
            code, msg = smtp.helo()
            if code != 250:
                raise SubmitError(_class_exit(code, EX_UNAVAILABLE),
                                  f"HELO refused: {_reply_text(code, msg)}")
        options: list[str] = []
        recipients = list(recipients)
        if not content.isascii() and smtp.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        if not (sender + "".join(recipients)).isascii():
            if not smtp.has_extn("smtputf8"):
                raise SubmitError(EX_USAGE, "an address is not ASCII and relayd does not offer "
                                  "SMTPUTF8 (RFC 6531)")
            options.append("SMTPUTF8")
        code, msg = smtp.mail(sender, options)
        if code != 250:
            raise SubmitError(_class_exit(code, EX_USAGE),
                              f"sender <{sender}> refused: {_reply_text(code, msg)}")
        for rcpt in recipients:
            code, msg = smtp.rcpt(rcpt)
            if code not in (250, 251):
                smtp.rset()
                raise SubmitError(_class_exit(code, EX_USAGE),
                                  f"recipient <{rcpt}> refused: {_reply_text(code, msg)}")
        data_msg: bytes | str
        try:
            code, data_msg = smtp.data(content)
        except smtplib.SMTPDataError as exc:
            code, data_msg = exc.smtp_code, exc.smtp_error
        msg = data_msg if isinstance(data_msg, bytes) else data_msg.encode()
        if code != 250:
            raise SubmitError(_class_exit(code, EX_DATAERR),
                              f"message refused: {_reply_text(code, msg)}")
        reply = _reply_text(code, msg)
        # The message is already stored; a lost QUIT reply changes nothing.
        with contextlib.suppress(OSError, smtplib.SMTPException):
            smtp.quit()
        return reply
    except SubmitError:
        _close(smtp)
        raise
    except (OSError, smtplib.SMTPException) as exc:
        # Disconnected or timed out mid-transaction: nothing was acknowledged, so the caller
        # must retry (a possible duplicate is better than a lost message).
        _close(smtp)
        raise SubmitError(EX_TEMPFAIL, f"connection to relayd at {where} failed "
                          f"({_os_reason(exc)}); try again later") from None


def _close(smtp: smtplib.SMTP) -> None:
    with contextlib.suppress(OSError):
        smtp.close()


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def smtp_proxy(addresses: Sequence[tuple[str, int]], stdin: ByteStream,
               stdout: ByteStream) -> int:
    """``-bs``: relay an SMTP session between stdin/stdout and the daemon, byte for byte.

    SwiftMailer/Symfony speak SMTP over the pipe and read every reply, so they see relayd's
    own answers (including ``250 ... queued as ID`` and any rejection). If the daemon is down
    they get a 421 greeting and the command exits 75.
    """
    conn: socket.socket | None = None
    reasons: list[str] = []
    for address in addresses:
        try:
            conn = socket.create_connection(address, timeout=CONNECT_TIMEOUT)
            break
        except OSError as exc:
            reasons.append(_os_reason(exc))
    if conn is None:
        reason = reasons[0] if reasons else "no listen address"
        stdout.write(f"421 4.3.0 relayd is not reachable ({reason}); try again later\r\n"
                     .encode())
        stdout.flush()
        return EX_TEMPFAIL
    conn.settimeout(None)

    try:
        fd = stdin.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        fd = None

    def read_fd(n: int) -> bytes:
        assert fd is not None
        return os.read(fd, n)

    # os.read on the descriptor, not the buffered reader: a daemon thread blocked inside a
    # BufferedReader holds its lock and aborts interpreter shutdown.
    reader = read_fd if fd is not None else getattr(stdin, "read1", stdin.read)

    def pump_in() -> None:
        try:
            while chunk := reader(65536):
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the daemon closed first (after QUIT); the reader below sees EOF

    # A thread, because stdin may be a pipe that cannot be multiplexed portably with a
    # socket; daemon=True so a client that never closes stdin cannot keep us alive.
    feeder = threading.Thread(target=pump_in, name="sendmail-bs-stdin", daemon=True)
    feeder.start()
    try:
        while data := conn.recv(65536):
            stdout.write(data)
            stdout.flush()
    except OSError:
        return EX_TEMPFAIL
    finally:
        conn.close()
    return 0


def _entry_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


_MARK = {"active": "*", "held": "!", "failed": "#"}


def format_mailq(entries: Sequence[Any]) -> str:
    """The queue in Postfix ``mailq`` layout (``*`` active, ``!`` held, ``#`` failed).

    ``entries`` are spool entries: ``id, state, envelope.mail_from, envelope.rcpt_tos,
    size, created, last_error``.
    """
    if not entries:
        return "Mail queue is empty\n"
    lines = ["-Queue ID-      --Size-- ----Arrival Time---- -Sender/Recipient-------"]
    total = 0
    for e in entries:
        state = str(getattr(e.state, "value", e.state))
        created = _entry_time(e.created)
        when = created.astimezone().strftime("%a %b %d %H:%M:%S") if created else "-"
        sender = e.envelope.mail_from or "MAILER-DAEMON"
        total += int(e.size)
        lines.append(f"{e.id + _MARK.get(state, ''):<15} {int(e.size):>8} {when:<20} {sender}")
        if e.last_error:
            lines.append(f"{'':46}({' '.join(str(e.last_error).split())})")
        lines.extend(f"{'':46}{rcpt}" for rcpt in e.envelope.rcpt_tos)
        lines.append("")
    n = len(entries)
    lines.append(f"-- {(total + 1023) // 1024} Kbytes in {n} Request{'s' if n != 1 else ''}.")
    return "\n".join(lines) + "\n"


def _open_spool(path: Path) -> Spool:
    # lazy: only -bp and -q read the spool (its modules take about 25 ms to import); a
    # message submission, once per mail from PHP or cron, does not load them
    from relayd.spool.store import Spool

    return Spool(path)


def list_queue(spool_path: Path, io: IO) -> int:
    """``-bp`` / ``mailq``."""
    try:
        entries = sorted(_open_spool(spool_path).list(), key=lambda e: str(e.created))
    except PermissionError:
        print(f"sendmail: cannot read the queue in {spool_path}: permission denied "
              "(run as root or as the relayd user)", file=io.err)
        return EX_NOPERM
    except OSError as exc:
        print(f"sendmail: cannot read the queue in {spool_path}: {_os_reason(exc)}", file=io.err)
        return EX_TEMPFAIL
    io.out.write(format_mailq(entries))
    return 0


def flush_queue(spool_path: Path, io: IO) -> int:
    """``-q``: make every queued message due now (``postqueue -f``); failed ones stay."""
    try:
        spool = _open_spool(spool_path)
        for entry in spool.list():
            if str(getattr(entry.state, "value", entry.state)) == "queued":
                spool.retry(entry.id)
    except PermissionError:
        print(f"sendmail: cannot flush the queue in {spool_path}: permission denied", file=io.err)
        return EX_NOPERM
    except OSError as exc:
        print(f"sendmail: cannot flush the queue in {spool_path}: {_os_reason(exc)}", file=io.err)
        return EX_TEMPFAIL
    return 0


def _binary(stream: Any) -> ByteStream:
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        return buffer  # type: ignore[no-any-return]
    return _TextAsBinary(stream)


class _TextAsBinary:
    """Adapts a text stream (tests' StringIO) to the bytes interface used here."""

    def __init__(self, stream: Any) -> None:
        self._s = stream

    def read(self, n: int = -1) -> bytes:
        return str(self._s.read(n)).encode("utf-8", "surrogateescape")

    def readline(self) -> bytes:
        return str(self._s.readline()).encode("utf-8", "surrogateescape")

    def write(self, data: bytes) -> int:
        return int(self._s.write(data.decode("utf-8", "replace")))

    def flush(self) -> None:
        self._s.flush()


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid{os.getuid()}"


def main(args: argparse.Namespace, io: IO) -> int:
    """Handler of ``relayd sendmail`` / ``relayd-sendmail``; ``args.sendmail_args`` is argv
    after the command name."""
    prog = os.path.basename(sys.argv[0]) if sys.argv else "sendmail"
    try:
        opts = parse_args(list(args.sendmail_args), prog=prog)
    except UsageError as exc:
        print(f"sendmail: {exc}", file=io.err)
        return EX_USAGE
    if opts.mode is Mode.NOOP:
        return 0  # newaliases / -bi: there is no alias database to rebuild
    try:
        cfg = load_client_config(config_path(args))
    except ConfigError as exc:
        print("sendmail: invalid relayd config:", file=io.err)
        for problem in exc.problems:
            print(f"  {problem}", file=io.err)
        return EX_CONFIG
    if opts.mode is Mode.LIST:
        return list_queue(cfg.spool.path, io)
    if opts.mode is Mode.FLUSH:
        return flush_queue(cfg.spool.path, io)
    addresses = daemon_addresses(cfg.listen)
    if opts.mode is Mode.SMTP:
        return smtp_proxy(addresses, _binary(io.stdin), _binary(io.out))
    for warning in opts.warnings:
        print(f"sendmail: warning: {warning}", file=io.err)
    data = read_message(_binary(io.stdin), ignore_dots=opts.ignore_dots)
    try:
        prepared = prepare(data, opts, login=_login(), local_domain=cfg.local_domain,
                           hostname=cfg.hostname)
    except UsageError as exc:
        print(f"sendmail: {exc}", file=io.err)
        return EX_USAGE
    try:
        submit_any(addresses, helo=cfg.hostname, sender=prepared.sender,
                   recipients=prepared.recipients, content=prepared.content)
    except SubmitError as exc:
        print(f"sendmail: {exc}", file=io.err)
        return exc.exit_code
    return 0
