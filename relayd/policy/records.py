"""The records the policy steps pass along: the compiled policy, the per-message context,
the draft between steps and the final result. Data only, no behaviour beyond small helpers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relayd.config.schema import (
    DoNotEmailConfig,
    HeadersConfig,
    PriorityRule,
    SenderConfig,
    UnsubscribeConfig,
)
from relayd.model import Envelope, Message

if TYPE_CHECKING:
    from relayd.policy.dkim import PrivateKey


@dataclass(frozen=True)
class CompiledRule:
    """A ``priority`` rule with its regexes compiled; ``index`` names it in explanations."""

    index: int
    rule: PriorityRule
    header: str | None
    pattern: re.Pattern[str] | None
    subject: re.Pattern[str] | None
    sender: re.Pattern[str] | None

    def describe(self) -> str:
        r = self.rule
        parts = []
        if r.header:
            parts.append(f"header {r.header} matches {r.pattern!r}")
        if r.subject:
            parts.append(f"subject matches {r.subject!r}")
        if r.sender:
            parts.append(f"sender matches {r.sender!r}")
        return f"priority[{self.index}]: " + " or ".join(parts)


@dataclass(frozen=True)
class DkimSigner:
    """One ``dkim`` entry with its private key already loaded (``relayd.policy.dkim``)."""

    domain: str
    selector: str
    algorithm: str
    key: PrivateKey = field(repr=False)


@dataclass(frozen=True)
class Policy:
    """Everything the steps need from the config, compiled once per config (re)load."""

    sender: SenderConfig
    headers: HeadersConfig
    rules: tuple[CompiledRule, ...]
    do_not_email: DoNotEmailConfig
    unsubscribe: UnsubscribeConfig | None
    unsubscribe_secret: bytes | None = field(repr=False)
    dkim: tuple[DkimSigner, ...]
    # A route's ``dkim`` choice: the one signer in ``dkim`` signs whatever the From domain.
    dkim_forced: bool = False


@dataclass(frozen=True)
class PolicyContext:
    """What changes between messages: the time and the do-not-email list (lower-cased)."""

    now: float
    suppressed: Container[str] = frozenset()


@dataclass(frozen=True)
class Note:
    """One decision of one step, for ``relayd explain`` and the acceptance log."""

    step: str
    text: str

    @property
    def logged(self) -> int | None:
        """The level at which the acceptance log shows this note on a line of its own (the
        re-encoding of long lines: relayd/policy/long_lines.py), or None."""
        if self.step != LONG_LINES:
            return None
        return logging.WARNING if self.text.startswith(NOT_REENCODED) else logging.INFO


LONG_LINES = "long_lines"  # the step's name (relayd/policy/long_lines.py)
NOT_REENCODED = "not re-encoded, kept as received"  # its note after an unexpected error


@dataclass(frozen=True)
class Copy:
    """One distinct content and the recipients that get it."""

    rcpts: tuple[str, ...]
    content: bytes


@dataclass(frozen=True)
class Draft:
    """The message between steps. Steps return a new Draft (``dataclasses.replace``,
    ``note``, ``map_content``)."""

    envelope: Envelope
    copies: tuple[Copy, ...]
    priority: bool = False
    why_priority: str | None = None
    rejected: tuple[str, ...] = ()
    suppressed: tuple[str, ...] = ()
    notes: tuple[Note, ...] = ()

    def note(self, step: str, text: str) -> Draft:
        return self._with(self.copies, (*self.notes, Note(step, text)))

    def map_content(self, fn: Callable[[bytes], bytes]) -> Draft:
        return self._with(tuple(Copy(c.rcpts, fn(c.content)) for c in self.copies), self.notes)

    def _with(self, copies: tuple[Copy, ...], notes: tuple[Note, ...]) -> Draft:
        # What dataclasses.replace does, spelled out: it runs several times per message and
        # replace() inspects the fields on every call.
        return Draft(self.envelope, copies, self.priority, self.why_priority, self.rejected,
                     self.suppressed, notes)


@dataclass(frozen=True)
class PipelineResult:
    """The outcome of the policy for one accepted message.

    ``outputs`` are the messages to spool (possibly none when every recipient is suppressed):
    one per distinct content, each with its own envelope (rewritten MAIL FROM, its
    recipients, ``priority``). ``rejected`` recipients should have been refused at RCPT
    (``action: reject``); ``suppressed`` ones are accepted but never delivered
    (log ``status=suppressed``).
    """

    priority: bool
    why_priority: str | None
    rejected: tuple[str, ...]
    suppressed: tuple[str, ...]
    outputs: tuple[Message, ...]
    steps: tuple[Note, ...]


Step = Callable[[Draft, Policy, PolicyContext], Draft]
