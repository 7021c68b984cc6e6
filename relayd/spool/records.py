"""The spool's records (Entry, Meta, Attempt, Claimed), their JSON encoding and the file format.

Split from ``spool/store.py`` so that the file I/O stays in one module and the pure data in
another; ``relayd.spool`` re-exports the records.
"""

from __future__ import annotations

import json
import random
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from relayd.model import Envelope, State, Status

FORMAT_VERSION = 1
MAGIC = b"RELAYD-SPOOL 1 "
MAX_HEADER = 16 * 1024 * 1024
RETRY_POKE = ".retry"  # suffix of a poke file left by `relayd queue retry`


@dataclass(frozen=True)
class Poke:
    """A message changed by `relayd queue`; ``retry`` when the operator asked for it now."""

    queue_id: str
    retry: bool = False


@dataclass(frozen=True)
class Attempt:
    """One recorded outcome for one recipient (the history shown by `queue show`)."""

    at: float
    recipient: str
    status: Status  # stored as its string value ("sent", "deferred", ...)
    relay: str
    reply: str
    dsn: str = ""


@dataclass(frozen=True)
class Meta:
    """The mutable part of a spooled message."""

    attempts: int = 0
    next_attempt: float | None = None
    last_error: str | None = None
    pending: tuple[str, ...] | None = None  # None: every envelope recipient is still pending
    failed_rcpts: tuple[str, ...] = ()
    history: tuple[Attempt, ...] = ()
    recoveries: int = 0
    retried_at: float | None = None
    # Of ``attempts``, those a reply rule called throttling (slow_down, pause_smarthost): they
    # count as attempts (SPEC) but do not lengthen the message's backoff.
    throttled: int = 0


@dataclass(frozen=True)
class Entry:
    """A spooled message as seen by the queue commands and the queue manager."""

    id: str
    state: State
    envelope: Envelope
    size: int
    created: float
    meta: Meta = field(default_factory=Meta)

    @property
    def attempts(self) -> int:
        return self.meta.attempts

    @property
    def next_attempt(self) -> float | None:
        return self.meta.next_attempt

    @property
    def last_error(self) -> str | None:
        return self.meta.last_error

    @property
    def history(self) -> tuple[Attempt, ...]:
        return self.meta.history

    @property
    def pending(self) -> tuple[str, ...]:
        """Recipients still to be delivered."""
        return self.envelope.rcpt_tos if self.meta.pending is None else self.meta.pending

    @property
    def recipients(self) -> tuple[str, ...]:
        """What `queue list` shows: failed recipients for failed messages, else pending ones."""
        if self.state is State.FAILED and self.meta.failed_rcpts:
            return self.meta.failed_rcpts
        return self.pending

    @property
    def age_base(self) -> float:
        """Start of the max_age clock (reset by `queue retry` of a failed message)."""
        return max(self.created, self.meta.retried_at or 0.0)


@dataclass(frozen=True)
class Claimed:
    """A message moved to active/ for delivery, with its exact content: handed over by the
    claim itself, so the queue manager needs no second read (nor a cache to ask)."""

    entry: Entry
    content: bytes


def new_queue_id(now: float | None = None) -> str:
    """A sortable, unique-enough ID: microseconds since the epoch plus 20 random bits, hex.

    The bits only need to differ between messages of the same microsecond (the spool's
    O_EXCL create catches the rest), not to be secret: the module PRNG (seeded from the OS,
    reseeded after fork) costs no system call, unlike ``secrets`` (os.urandom per ID).
    """
    us = int((time.time() if now is None else now) * 1_000_000)
    return f"{us:013X}{random.getrandbits(20):05X}"


class UnknownVersion(ValueError):
    """A spool file of another format version than this relayd's (see ``check_header``)."""


def check_header(header: Any, content_size: int) -> None:
    """ValueError unless ``header`` is one this relayd writes, for ``content_size`` bytes.

    Another format version (a newer relayd's file, read after a downgrade) may mean something
    else by the same fields, so it is not guessed at; every file relayd ever wrote says 1. A
    content shorter or longer than the header says is a torn file. (Files written before the
    header carried a size are taken as they are.)"""
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    version = header.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise UnknownVersion(f"unknown format version {version!r} (this relayd reads "
                             f"version {FORMAT_VERSION}: written by a newer relayd?)")
    expected = header.get("size")
    if expected is not None and expected != content_size:
        raise ValueError(f"content is {content_size} bytes, its header says {expected}: torn file")


def check_content(header: dict[str, Any], content: bytes) -> None:
    """ValueError when ``content`` is not what was accepted (bit rot, a bad disk, an edit):
    relayd never sends bytes other than those it answered 250 for. One pass of zlib.crc32
    over the bytes already read (it lets go of the GIL for large ones). (Files written before
    the header carried a CRC-32 are taken as they are.)"""
    crc = header.get("crc32")
    if crc is not None and zlib.crc32(content) != crc:
        raise ValueError("content does not match the CRC-32 in its header: changed on disk "
                         "since it was accepted")


def valid_id(queue_id: str) -> bool:
    return 8 <= len(queue_id) <= 40 and all(c in "0123456789ABCDEF" for c in queue_id)


def envelope_to_json(env: Envelope) -> dict[str, Any]:
    d: dict[str, Any] = {"mail_from": env.mail_from, "rcpt_tos": list(env.rcpt_tos),
                         "client": env.client, "helo": env.helo, "received_at": env.received_at,
                         "smtputf8": env.smtputf8, "priority": env.priority}
    if env.user:  # only for authenticated submission mail
        d["user"], d["auth_method"] = env.user, env.auth_method
    if env.route:  # only with routes: files without routing stay as they were
        d["route"] = env.route
    return d


def envelope_from_json(d: dict[str, Any]) -> Envelope:
    return Envelope(mail_from=str(d["mail_from"]), rcpt_tos=tuple(str(r) for r in d["rcpt_tos"]),
                    client=str(d.get("client", "")), helo=str(d.get("helo", "")),
                    received_at=float(d.get("received_at", 0.0)),
                    smtputf8=bool(d.get("smtputf8", False)), priority=bool(d.get("priority", False)),
                    user=str(d.get("user", "")), auth_method=str(d.get("auth_method", "")),
                    route=str(d.get("route", "")))


def meta_to_json(m: Meta) -> dict[str, Any]:
    return {"version": FORMAT_VERSION, "attempts": m.attempts, "next_attempt": m.next_attempt,
            "last_error": m.last_error, "pending": None if m.pending is None else list(m.pending),
            "failed_rcpts": list(m.failed_rcpts), "recoveries": m.recoveries,
            "retried_at": m.retried_at,
            **({"throttled": m.throttled} if m.throttled else {}),
            "history": [{"at": a.at, "recipient": a.recipient, "status": a.status.value, "relay": a.relay,
                         "reply": a.reply, "dsn": a.dsn} for a in m.history]}


def meta_from_json(d: dict[str, Any]) -> Meta:
    pending = d.get("pending")
    return Meta(
        attempts=int(d.get("attempts", 0)),
        next_attempt=None if d.get("next_attempt") is None else float(d["next_attempt"]),
        last_error=d.get("last_error"),
        pending=None if pending is None else tuple(str(r) for r in pending),
        failed_rcpts=tuple(str(r) for r in d.get("failed_rcpts", [])),
        history=tuple(Attempt(at=float(a["at"]), recipient=str(a["recipient"]),
                              status=Status(str(a["status"])), relay=str(a.get("relay", "")),
                              reply=str(a.get("reply", "")), dsn=str(a.get("dsn", "")))
                      for a in d.get("history", [])),
        recoveries=int(d.get("recoveries", 0)),
        retried_at=None if d.get("retried_at") is None else float(d["retried_at"]),
        throttled=int(d.get("throttled", 0)),
    )


def parse_file(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, content) of a whole spool file; ValueError when it is not one, is torn, is of
    another format version or its content is not what was accepted (``check_content``)."""
    end = data.find(b"\n", 0, 64)
    if not data.startswith(MAGIC) or end < 0:
        raise ValueError("not a relayd spool file")
    n = int(data[len(MAGIC):end])
    if not 0 < n < MAX_HEADER or data[end + 1 + n:end + 2 + n] != b"\n":
        raise ValueError("truncated header")
    header = json.loads(data[end + 1:end + 1 + n])
    content = data[end + n + 2:]
    check_header(header, len(content))
    check_content(header, content)
    return header, content
