"""The sendmail command's pure half: its argv grammar and the message fix-ups it performs.

Callers pass the argument lists of a 40-year-old interface (Postfix sendmail(1) lists them):
PHP ``-t -i [-f from]``, cron ``-FCronDaemon -i -odi -oem -oi -t``, mailx ``-i -- rcpt``,
git send-email ``-i -f env rcpt...``, SwiftMailer ``-bs``. This module turns argv into
``Options`` (getopt-style: glued and separate values, clustered flags, ``--``) and prepares
the message (``-t`` recipient extraction with ``Bcc:`` removed, missing From/Date/Message-ID,
CRLF line ends). No I/O here, so every caller's argv is a table-driven unit test.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import format_datetime, formataddr, getaddresses, make_msgid
from typing import Protocol


class Mode(enum.Enum):
    """What ``-b<x>`` asks for."""

    DELIVER = "m"     # -bm, the default: read a message from stdin
    SMTP = "s"        # -bs: SMTP on stdin/stdout
    LIST = "p"        # -bp, mailq: list the queue
    NOOP = "i"        # -bi, -I, newaliases: relayd has no alias database; succeed
    FLUSH = "q"       # -q: attempt queued mail now


class ByteStream(Protocol):
    """The bytes side of stdin/stdout (``sys.stdin.buffer`` or a test double)."""

    def read(self, n: int = -1, /) -> bytes: ...

    def readline(self) -> bytes: ...

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


class UsageError(Exception):
    """Bad argv; the command exits 64 (EX_USAGE) with this text."""


# getopt(3) letters that take a value, from Postfix sendmail's option string
# "B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:r:q:tvx" plus sendmail's -A and -d.
_WITH_VALUE = frozenset("ABCFLNORVXbdefhopr")
# Flags that take no value and mean nothing for a relay that forwards everything.
_IGNORED_FLAGS = frozenset("GUcmnvx")
# -b modes that cannot be honoured by a submission client (daemon mode, address test ...).
_UNSUPPORTED_B = {"d": "daemon mode (-bd): run `relayd run` instead",
                  "D": "daemon mode (-bD): run `relayd run` instead",
                  "t": "address test mode (-bt) is not supported",
                  "v": "address verification (-bv) is not supported",
                  "h": "host status (-bh) is not supported",
                  "H": "host status (-bH) is not supported",
                  "a": "ARPANET mode (-ba) is not supported",
                  "P": "queue summary (-bP) is not supported; use -bp"}


@dataclass(frozen=True)
class Options:
    """The meaning of one sendmail argv."""

    mode: Mode = Mode.DELIVER
    extract: bool = False            # -t
    ignore_dots: bool = False        # -i / -oi
    sender: str | None = None        # -f / -r; "" is the null sender <>
    full_name: str | None = None     # -F
    recipients: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())


def _strip_angle(value: str) -> str:
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    return value


def _check_line(value: str, what: str) -> str:
    # A CR or LF in an address or name would let a caller inject headers or SMTP commands.
    if "\r" in value or "\n" in value or "\0" in value:
        raise UsageError(f"{what} contains a line break: {value!r}")
    return value


def parse_args(argv: Sequence[str], *, prog: str = "sendmail") -> Options:
    """Parse sendmail's argv (everything after the program name) the way getopt(3) does,
    except that options are also accepted after recipients (as Postfix's GNU getopt does).

    Raises ``UsageError`` for a mode relayd cannot provide or a missing option value.
    """
    mode = Mode.NOOP if prog == "newaliases" else Mode.LIST if prog == "mailq" else Mode.DELIVER
    extract = ignore_dots = False
    sender: str | None = None
    full_name: str | None = None
    rcpts: list[str] = []
    warnings: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            rcpts.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            rcpts.append(arg)
            continue
        j = 1
        while j < len(arg):
            letter = arg[j]
            j += 1
            if letter == "q":
                # -q, -q30m, -qIqueueid: flush; the interval/selector only makes sense to a daemon.
                mode = Mode.FLUSH
                break
            if letter not in _WITH_VALUE:
                if letter == "t":
                    extract = True
                elif letter == "i":
                    ignore_dots = True
                elif letter == "I":
                    mode = Mode.NOOP
                elif letter not in _IGNORED_FLAGS:
                    warnings.append(f"ignoring unknown option -{letter}")
                continue
            # A value is the rest of this word (-fuser@x, -oi) or the next word (-f user@x);
            # never re-parsed as an option itself.
            if j < len(arg):
                value = arg[j:]
            elif i < len(args):
                value = args[i]
                i += 1
            else:
                raise UsageError(f"option -{letter} requires a value")
            if letter in "fr":
                sender = _check_line(_strip_angle(value), "sender")
            elif letter == "F":
                full_name = _check_line(value.strip(), "full name")
            elif letter == "b":
                mode = _b_mode(value)
            elif letter == "o" and value[:1] == "i":
                # -oi is the old spelling of -i; -oem, -odi, -oQ... are queue tuning: ignored.
                ignore_dots = True
            break
    recipients: list[str] = []
    for raw in rcpts:
        _check_line(raw, "recipient")
        # "a@x, b@y" in one argument is a list (mailx and cron users write it).
        for _name, addr in getaddresses([raw]):
            if addr:
                recipients.append(addr)
    return Options(mode=mode, extract=extract, ignore_dots=ignore_dots, sender=sender,
                   full_name=full_name, recipients=tuple(recipients), warnings=tuple(warnings))


def _b_mode(value: str) -> Mode:
    code = value[:1]
    for mode in Mode:
        if mode.value == code and mode is not Mode.FLUSH:
            return mode
    if code in _UNSUPPORTED_B:
        raise UsageError(_UNSUPPORTED_B[code])
    raise UsageError(f"unknown mode -b{value}")


def read_message(stream: ByteStream, *, ignore_dots: bool) -> bytes:
    """Read the message from stdin. Without -i a line holding only ``.`` ends the input
    (sendmail's default, like SMTP DATA); with -i everything up to EOF is the message."""
    if ignore_dots:
        return stream.read()
    lines: list[bytes] = []
    for line in iter(stream.readline, b""):
        if line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
    return b"".join(lines)


_HEADER_NAME = re.compile(rb"^[!-9;-~]+:")


def split_headers(data: bytes) -> tuple[list[bytes], bytes]:
    """LF-normalised (header lines with continuations folded in, body).

    A leading mbox ``From `` line is dropped, as sendmail does. If the first line is not a
    header the whole input is body (a caller that piped plain text).
    """
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if text.startswith(b"From "):
        text = text.split(b"\n", 1)[1] if b"\n" in text else b""
    headers: list[bytes] = []
    pos = 0
    while pos < len(text):
        end = text.find(b"\n", pos)
        line = text[pos:] if end < 0 else text[pos:end]
        nxt = len(text) if end < 0 else end + 1
        if line == b"":
            return headers, text[nxt:]
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1] += b"\n" + line
        elif _HEADER_NAME.match(line):
            headers.append(line)
        else:
            return headers, text[pos:]
        pos = nxt
    return headers, b""


def _name(header: bytes) -> str:
    return header.split(b":", 1)[0].decode("ascii", "replace").strip().lower()


def _value(header: bytes) -> str:
    raw = header.split(b":", 1)[1].decode("utf-8", "replace")
    return " ".join(raw.split())


def header_recipients(headers: Iterable[bytes]) -> list[str]:
    """Recipients for -t: To/Cc/Bcc, or only the Resent-* block when the message has one
    (RFC 5322 3.6.6: a resent message goes to its Resent- recipients)."""
    hs = list(headers)
    names = {_name(h) for h in hs}
    fields = ("resent-to", "resent-cc", "resent-bcc") if names & {"resent-to", "resent-cc",
                                                                  "resent-bcc"} \
        else ("to", "cc", "bcc")
    values = [_value(h) for h in hs if _name(h) in fields]
    return [addr for _n, addr in getaddresses(values) if addr]


@dataclass(frozen=True)
class Prepared:
    """The envelope and CRLF content handed to the daemon."""

    sender: str
    recipients: tuple[str, ...]
    content: bytes


def qualify(address: str, local_domain: str) -> str:
    """``root`` -> ``root@<local_domain>``: smarthosts reject unqualified addresses."""
    return address if "@" in address or not address else f"{address}@{local_domain}"


def prepare(data: bytes, opts: Options, *, login: str, local_domain: str, hostname: str,
            now_header: str | None = None) -> Prepared:
    """Apply -t/-f/-F to the raw input: the envelope and the content to submit.

    Raises ``UsageError`` when no recipient is left (Postfix: "No recipient addresses found").
    """
    headers, body = split_headers(data)
    names = {_name(h) for h in headers}
    rcpts = list(opts.recipients)
    if opts.extract:
        rcpts += header_recipients(headers)
        # -t strips Bcc: so blind recipients stay blind (OpenSMTPD sendmail(8), Postfix).
        headers = [h for h in headers if _name(h) not in ("bcc", "resent-bcc")]
    seen: set[str] = set()
    recipients: list[str] = []
    for r in rcpts:
        q = qualify(r, local_domain)
        if q.lower() not in seen:
            seen.add(q.lower())
            recipients.append(q)
    if not recipients:
        raise UsageError("no recipient addresses found (give them on the command line or use -t)"
                         if opts.extract or not opts.recipients else "no recipient addresses")
    sender = qualify(opts.sender, local_domain) if opts.sender is not None \
        else f"{login}@{local_domain}"
    added: list[bytes] = []
    # RFC 5322 3.6 requires From and Date; Postfix's cleanup inserts them when missing.
    if "from" not in names:
        author = sender or f"{login}@{local_domain}"
        added.append(b"From: " + formataddr((opts.full_name or "", author)).encode("utf-8"))
    if "date" not in names:
        stamp = now_header or format_datetime(datetime.now().astimezone())
        added.append(b"Date: " + stamp.encode("ascii"))
    if "message-id" not in names:
        added.append(b"Message-ID: " + make_msgid(domain=hostname).encode("ascii"))
    text = b"\n".join(headers + added) + b"\n\n" + body
    # SMTP needs CRLF (RFC 5321 2.3.8); callers send LF (cron) or CRLF (PHP >= 8) or a mix.
    content = text.replace(b"\n", b"\r\n")
    return Prepared(sender=sender, recipients=tuple(recipients), content=content)
