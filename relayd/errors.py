"""The exception hierarchy of relayd: one base, one subclass per failing edge.

Expected outcomes (SMTP replies, policy decisions, delivery results) are values, not
exceptions; these are for invalid input and broken I/O. Only ``cli`` turns them into exit codes.
"""

from __future__ import annotations

from dataclasses import dataclass


class RelaydError(Exception):
    """Base of every error relayd raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One configuration problem: where (``smarthosts[0].port``) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(RelaydError, ValueError):
    """The configuration is invalid; ``problems`` has one entry per mistake."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in problems))


class SpoolError(RelaydError, OSError):
    """The spool could not be read or written."""


class UnknownMessage(SpoolError, KeyError):
    """No message with that queue ID."""

    def __str__(self) -> str:
        return f"no message with queue id {self.args[0]!s}" if self.args else "unknown message"


class OAuthError(RelaydError):
    """A token could not be obtained; ``hint`` says what the operator should do."""

    def __init__(self, message: str, *, hint: str = "", permanent: bool = False) -> None:
        super().__init__(message)
        self.hint = hint
        self.permanent = permanent


class StateUnavailable(RelaydError):
    """The fleet's shared state (``shared_state``, PostgreSQL) cannot be reached or has a
    schema this relayd does not know; the message says which. Deliveries that need it wait."""
