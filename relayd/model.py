"""The frozen records that flow between relayd's components.

The listener turns aiosmtpd's mutable envelope into an ``Envelope``; the spool stores a
``Message``; the forwarder answers a ``DeliveryResult`` with one ``RecipientOutcome`` per
recipient. Nothing here does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


class State(enum.StrEnum):
    """Where a spooled message is (SPEC: queued | held | failed; active is internal)."""

    QUEUED = "queued"
    HELD = "held"
    FAILED = "failed"
    ACTIVE = "active"


class Status(enum.StrEnum):
    """The outcome words of the log line and the metrics (SPEC)."""

    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"
    SUPPRESSED = "suppressed"


@dataclass(frozen=True, slots=True)
class Envelope:
    """The SMTP envelope as accepted: ``mail_from`` is "" for the null sender ``<>``."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    client: str = ""
    helo: str = ""
    received_at: float = 0.0
    smtputf8: bool = False
    priority: bool = False
    # The submission user that authenticated for this message (SASL, RFC 4954), or "".
    user: str = ""
    auth_method: str = ""
    # The ``routes`` entry chosen at acceptance ("" without routes). Only the name is kept:
    # the definition is looked up at each attempt, so a reload applies to queued mail.
    route: str = ""


@dataclass(frozen=True, slots=True)
class Message:
    """An envelope and the exact content bytes (CRLF line ends, not dot-stuffed)."""

    envelope: Envelope
    content: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: code, enhanced status (``5.1.1``, may be empty) and text."""

    code: int
    text: str = ""

    @property
    def dsn(self) -> str:
        """The enhanced status code (RFC 3463) from the text, or one derived from the code."""
        head = self.text.split(" ", 1)[0] if self.text else ""
        parts = head.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and head[0] in "245":
            return head
        if self.code <= 0:
            return "4.4.2"
        return f"{self.code // 100}.0.0"

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    """What happened to one recipient in one attempt."""

    recipient: str
    status: Status
    reply: Reply
    dsn: str = ""


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The result of one attempt against one smarthost.

    ``smarthost_fault`` is set when the failure concerns the smarthost rather than the message
    (connect refused, timeout, TLS, auth, 421): the queue manager then pauses that smarthost
    instead of charging the message an attempt.
    """

    smarthost: str
    relay: str
    outcomes: tuple[RecipientOutcome, ...]
    smarthost_fault: bool = False
    error: str = ""
    transcript: tuple[str, ...] = field(default=())
    # Postfix's delays=a/b/c/d split, for this attempt: waiting for a free connection, setting
    # one up (connect, TLS, EHLO, AUTH; 0 when reused) and the transaction itself.
    wait_seconds: float = 0.0
    setup_seconds: float = 0.0
    transfer_seconds: float = 0.0

    @property
    def delivered(self) -> tuple[str, ...]:
        return tuple(o.recipient for o in self.outcomes if o.status is Status.SENT)

    @property
    def deferred(self) -> tuple[str, ...]:
        return tuple(o.recipient for o in self.outcomes if o.status is Status.DEFERRED)

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(o.recipient for o in self.outcomes if o.status is Status.FAILED)


class TokenSource(Protocol):
    """Supplies OAuth2 access tokens for XOAUTH2 (implemented in ``relayd.oauth``).

    ``get_token`` returns a token valid for at least the next few minutes (refreshing if
    needed, one refresh at a time); ``invalidate`` drops a token the server rejected so the
    next ``get_token`` fetches a fresh one; ``forget_failure`` ends the wait after a failed
    request. Raises ``OAuthError`` when no token can be had.
    """

    async def get_token(self) -> str: ...

    def invalidate(self, token: str) -> None: ...

    def forget_failure(self) -> None:
        """Ask the token endpoint again at the next ``get_token`` instead of waiting out the
        backoff after a failed request (the operator ran `relayd queue retry`)."""
