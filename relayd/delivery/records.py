"""The frozen records that flow through one delivery attempt: the gate's verdict, Postfix's
delays split, and the tally of what the smarthosts did to the message's recipients.

Pure data and pure folding, no I/O and no clock: the queue manager builds a ``Tally`` one
smarthost result at a time, and relayd/delivery/transition.py turns the finished tally into a
spool transition.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from relayd.model import DeliveryResult, RecipientOutcome, Status
from relayd.spool.records import Attempt


@dataclass(frozen=True, slots=True)
class GateVerdict:
    """The delivery-time policy's answer for one message: the recipients still allowed, those
    now on the do-not-email list, and the seconds to wait for the daily cap (0: go now);
    ``reason`` says what else the wait is for (a submission user's cap or rate, or the
    shared state that cannot be asked)."""

    allowed: tuple[str, ...]
    suppressed: tuple[str, ...] = ()
    wait: float = 0.0
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Delays:
    """Postfix's ``delays=a/b/c/d`` for one recipient's attempt, in seconds: before the queue
    manager took the message up, waiting in it (including for a free connection), setting up
    the connection (connect, TLS, EHLO, AUTH; 0 when reused), and the transaction itself."""

    before_qmgr: float
    in_qmgr: float
    setup: float
    transfer: float

    def __str__(self) -> str:
        return "/".join(f"{d:.2f}" for d in (self.before_qmgr, self.in_qmgr, self.setup, self.transfer))


def smarthost_failed(result: DeliveryResult) -> bool:
    """The smarthost failed as a whole and delivered nothing: every outcome of ``result`` is
    a deferral to try elsewhere or later. Once a recipient was accepted the result is not a
    fault, whatever its flag says, so that nothing is sent twice."""
    return result.smarthost_fault and not any(o.status is Status.SENT for o in result.outcomes)


@dataclass(frozen=True, slots=True)
class Tally:
    """What one attempt did to a message, built smarthost by smarthost with ``add``.

    ``remaining`` are the recipients still to try (the next smarthost is a fallback for
    them); ``deferred`` holds the latest deferral of each recipient not delivered or failed;
    ``history`` this attempt's entries so far (suppressed, sent and failed recipients).
    ``tried``: a smarthost was asked, so the attempt counts (SPEC "attempts").
    ``reached_any``: a smarthost took part in a transaction, so the message's own backoff
    applies rather than the wait for a smarthost to come back (unless ``wait_until`` says).
    """

    remaining: tuple[str, ...]
    sent: tuple[str, ...] = ()
    failed: tuple[RecipientOutcome, ...] = ()
    deferred: Mapping[str, RecipientOutcome] = field(default_factory=dict)
    history: tuple[Attempt, ...] = ()
    last_error: str | None = None
    last_relay: str = "none"
    tried: bool = False
    reached_any: bool = False
    delays: Mapping[str, Delays] = field(default_factory=dict)
    # Set by a reply rule or a smarthost's own cap or rate: when the message is due again,
    # instead of its backoff. ``throttled``: a rule called the reply throttling.
    wait_until: float | None = None
    throttled: bool = False

    # The mappings are fresh dicts that no one else holds; ``add`` never changes them in place.
    # (Built directly rather than with dataclasses.replace: this runs once per smarthost
    # answer on the delivery process's hot path.)
    def add(self, result: DeliveryResult, delays: Delays, at: float) -> Tally:
        """The tally after ``result``, one smarthost's answer for ``remaining`` at ``at``."""
        split = {**self.delays, **{o.recipient: delays for o in result.outcomes}}
        if smarthost_failed(result):
            # The sentence says what failed where ("cannot connect to host:25: Connection
            # refused"); the reply alone may be a made-up 4.4.1.
            last_error = result.error or (str(result.outcomes[0].reply) if result.outcomes
                                          else self.last_error)
            deferred = {**self.deferred, **{o.recipient: o for o in result.outcomes}}
            return Tally(self.remaining, self.sent, self.failed, deferred, self.history,
                         last_error, result.relay, True, self.reached_any, split,
                         self.wait_until, self.throttled)
        # A recipient the smarthost accepted is delivered, whatever happened afterwards to
        # the rest of the transaction: never send it twice.
        sent, failed, history = list(self.sent), list(self.failed), list(self.history)
        deferred = dict(self.deferred)
        remaining: list[str] = []
        last_error = self.last_error
        for o in result.outcomes:
            if o.status is Status.SENT or o.status is Status.FAILED:
                deferred.pop(o.recipient, None)
                history.append(Attempt(at, o.recipient, o.status, result.relay, str(o.reply), o.dsn))
                if o.status is Status.SENT:
                    sent.append(o.recipient)
                else:
                    failed.append(o)
                    last_error = str(o.reply)
            else:
                deferred[o.recipient] = o
                remaining.append(o.recipient)
                last_error = str(o.reply)
        return Tally(tuple(remaining), tuple(sent), tuple(failed), deferred, tuple(history),
                     last_error, result.relay, True, True, split, self.wait_until, self.throttled)
