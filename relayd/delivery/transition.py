"""What the spool does with a message after one delivery attempt, decided as a pure function.

``settle`` turns the attempt's ``Tally`` (relayd/delivery/records.py), the message's entry and
the retry settings into one transition: ``Complete`` (every recipient done, none failed),
``Fail`` (given up, with the metadata to keep) or ``Requeue`` (with the metadata and the due
time), each with the Postfix-shaped log lines still to write. No I/O and no clock: the queue
manager passes ``now`` in and carries the transition out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from relayd.config.schema import RetryConfig
from relayd.delivery import logline
from relayd.delivery.backoff import backoff_delay, is_expired
from relayd.delivery.records import Tally
from relayd.model import RecipientOutcome, Reply, Status
from relayd.spool.records import Attempt, Entry, Meta

# History entries kept with a queued message: a message retried for days must not grow its
# metadata file without bound (a failed one keeps everything, for the operator).
HISTORY_KEPT = 200


@dataclass(frozen=True, slots=True)
class Complete:
    """Every recipient was delivered (or suppressed): remove the message."""

    lines: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Fail:
    """Give up: record ``meta`` and move the message to failed; ``reason`` for the alert."""

    meta: Meta
    reason: str
    lines: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Requeue:
    """Try again at ``due``: record ``meta`` and move the message back to queued."""

    meta: Meta
    due: float
    lines: tuple[str, ...] = ()


Transition = Complete | Fail | Requeue


def settle(entry: Entry, tally: Tally, *, now: float, retry: RetryConfig, max_age: float,
           hosts_available_at: float, clock_skew: float = 0.0,
           rng: random.Random | None = None, route: str | None = None) -> Transition:
    """The spool transition after one attempt on ``entry`` that ended with ``tally``.

    ``hosts_available_at`` is when the first paused smarthost may be tried again (``now``
    if one is available); ``clock_skew`` the sum of wall-clock jumps seen, which expiry
    ignores (max_age counts real time); ``rng`` draws the backoff's jitter; ``route`` the
    route named in the log lines (with ``routes`` configured).

    A throttled attempt (a reply rule's ``slow_down`` or ``pause_smarthost``) counts in
    ``attempts`` like any other (SPEC), and in ``throttled``: the backoff counts only the
    others, so throttling never lengthens the message's later waits.
    """
    if not tally.remaining and not tally.failed and not entry.meta.failed_rcpts:
        return Complete((logline.removed_line(entry.id),))  # the common case, first
    failed_rcpts = entry.meta.failed_rcpts + tuple(o.recipient for o in tally.failed)
    history = entry.history + tally.history
    if not tally.remaining:
        meta = replace(entry.meta, pending=(), failed_rcpts=failed_rcpts, history=history,
                       attempts=entry.attempts + 1, last_error=tally.last_error, next_attempt=None)
        return Fail(meta, tally.last_error or "permanent failure")
    # Waiting behind paused smarthosts without being tried keeps the count (SPEC "attempts").
    attempts = entry.attempts + (1 if tally.tried else 0)
    throttled = entry.meta.throttled + (1 if tally.tried and tally.throttled else 0)
    if is_expired(entry.age_base, now - clock_skew, max_age):
        return _expire(entry, tally, now, max_age, attempts, failed_rcpts, history, route)
    if tally.wait_until is not None:
        # The provider said when (a reply rule), or a smarthost's own cap or rate did.
        due = max(now, tally.wait_until)
    elif tally.reached_any:
        due = now + backoff_delay(attempts - throttled, retry, rng)
    else:
        # Every smarthost was paused or failed as a whole: wait for the first to come back
        # (the message's own backoff would only add tries that meet the same fault).
        due = max(now + 1.0, hosts_available_at)
    lines: list[str] = []
    deferrals: list[Attempt] = []
    for rcpt in tally.remaining:
        o = tally.deferred.get(rcpt)
        if o is None:
            continue  # not tried this time: nothing to log or record
        lines.append(logline.outcome_line(entry.id, entry.created, o, tally.last_relay, attempts, now,
                                          deferred_until=due, delays=tally.delays.get(rcpt),
                                          route=route))
        deferrals.append(Attempt(now, rcpt, Status.DEFERRED, tally.last_relay, str(o.reply), o.dsn))
    meta = replace(entry.meta, pending=tally.remaining, failed_rcpts=failed_rcpts,
                   history=(history + tuple(deferrals))[-HISTORY_KEPT:], attempts=attempts,
                   last_error=tally.last_error, next_attempt=due, throttled=throttled)
    return Requeue(meta, due, tuple(lines))


def _expire(entry: Entry, tally: Tally, now: float, max_age: float, attempts: int,
            failed_rcpts: tuple[str, ...], history: tuple[Attempt, ...],
            route: str | None = None) -> Fail:
    """Older than ``spool.max_age``: every remaining recipient fails with the reason."""
    reason = f"expired after {max_age / 86400:g} days in the queue"
    lines: list[str] = []
    expired: list[Attempt] = []
    for rcpt in tally.remaining:
        o = tally.deferred.get(rcpt)
        reply = o.reply if o is not None else Reply(0, tally.last_error or "")
        lines.append(logline.outcome_line(entry.id, entry.created,
                                          RecipientOutcome(rcpt, Status.FAILED, reply, reply.dsn),
                                          "none", attempts, now, note=reason, route=route))
        expired.append(Attempt(now, rcpt, Status.FAILED, "none", f"{reason}: {reply}"))
    last_error = f"{reason}; last error: {tally.last_error}"
    meta = replace(entry.meta, pending=(), failed_rcpts=failed_rcpts + tally.remaining,
                   history=history + tuple(expired), attempts=attempts, last_error=last_error,
                   next_attempt=None)
    return Fail(meta, last_error, tuple(lines))
