"""Formatting of the Postfix-shaped log lines that sysadmins grep (SPEC "Log line").

``<queue-id>: to=<rcpt>, relay=<name>[host]:port, delay=<s>, delays=a/b/c/d, attempts=<n>,
dsn=<x.y.z>, status=sent|deferred|failed|suppressed (<server reply>)``

Pure functions only; the caller logs the returned text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from relayd.model import RecipientOutcome, Status

if TYPE_CHECKING:  # only an annotation here: the accepting process logs without loading it
    from relayd.delivery.records import Delays


def _clean(text: str) -> str:
    # A reply or address must never break the one-line-per-event format (log injection).
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())


def delivery_line(queue_id: str, rcpt: str, relay: str, delay: float, attempts: int, dsn: str,
                  status: Status, reply: str, delays: Delays | None = None, *,
                  route: str | None = None) -> str:
    """One line per recipient attempt; ``route=`` follows ``relay=`` when routes are
    configured."""
    parts = [f"{queue_id}: to=<{_clean(rcpt)}>", f"relay={_clean(relay) or 'none'}"]
    if route is not None:
        parts.append(f"route={_clean(route)}")
    parts.append(f"delay={delay:.2f}")
    if delays is not None:
        parts.append(f"delays={delays}")
    parts += [f"attempts={attempts}", f"dsn={dsn}", f"status={status.value} ({_clean(reply)})"]
    return ", ".join(parts)


def outcome_line(queue_id: str, created: float, o: RecipientOutcome, relay: str, attempts: int,
                 now: float, *, deferred_until: float | None = None, note: str = "",
                 delays: Delays | None = None, route: str | None = None) -> str:
    """The line for one recipient's outcome at ``now`` (of a message accepted at ``created``):
    ``note`` goes before the reply, the wait before the next attempt after it."""
    # A locally made-up reply without a code reads as its text alone.
    reply = str(o.reply) if o.reply.code > 0 else o.reply.text
    if note:
        reply = f"{note}: {reply}" if reply else note
    if deferred_until is not None:
        reply = f"{reply}; next attempt in {max(0, deferred_until - now):.0f}s"
    return delivery_line(queue_id, o.recipient, relay or "none", now - created, attempts,
                         o.dsn or o.reply.dsn, o.status, reply, delays, route=route)


def received_line(queue_id: str, client: str, helo: str) -> str:
    """``ID: client=<host>[ip], helo=<name>`` when a message is accepted."""
    return f"{queue_id}: client={_clean(client)}, helo=<{_clean(helo)}>"


def from_line(queue_id: str, sender: str, size: int, nrcpt: int) -> str:
    """``ID: from=<sender>, size=N, nrcpt=N (queue active)`` as Postfix qmgr logs it."""
    return f"{queue_id}: from=<{_clean(sender)}>, size={size}, nrcpt={nrcpt} (queue active)"


def removed_line(queue_id: str) -> str:
    return f"{queue_id}: removed"
