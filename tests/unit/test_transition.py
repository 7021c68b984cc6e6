"""The spool transition after one attempt (relayd/delivery/transition.py), as a table: the
smarthosts' results are folded into a Tally as the queue manager does, and ``settle`` must
complete, fail or requeue the message with the right metadata, due time and log lines."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import pytest

from relayd.config.schema import RetryConfig
from relayd.delivery.backoff import backoff_delay
from relayd.delivery.records import Delays, Tally, smarthost_failed
from relayd.delivery.transition import Complete, Fail, Requeue, Transition, settle
from relayd.model import DeliveryResult, Envelope, RecipientOutcome, Reply, State, Status
from relayd.spool.records import Attempt, Entry, Meta

RETRY = RetryConfig(initial=60, max_interval=3600)
MAX_AGE = 4 * 86400.0
CREATED = 1_000_000.0
NOW = CREATED + 100.0
LATER = NOW + 900.0  # when the paused smarthosts come back, in the cases that pause them
RELAY = "primary[smtp.example.com]:587"
QID = "00000F4240ABCDEF"
OK = Reply(250, "2.0.0 Ok")
NO_USER = Reply(550, "5.1.1 no such user")
TRY_LATER = Reply(451, "4.3.0 try again later")
REFUSED = Reply(451, "4.4.1 connect failed: Connection refused")
OLD = Attempt(CREATED + 50, "a@x.example", Status.DEFERRED, RELAY, "451 4.3.0 busy", "4.3.0")
DELAYS = Delays(100.0, 0.5, 0.25, 0.125)


def _result(*outcomes: tuple[str, Status, Reply], fault: bool = False, error: str = "") -> DeliveryResult:
    return DeliveryResult("primary", RELAY, tuple(RecipientOutcome(r, s, rep, rep.dsn) for r, s, rep in outcomes),
                          smarthost_fault=fault, error=error)


def _all(status: Status, reply: Reply, *rcpts: str) -> tuple[tuple[str, Status, Reply], ...]:
    return tuple((r, status, reply) for r in rcpts)


@dataclass(frozen=True)
class Case:
    results: tuple[DeliveryResult, ...]  # one per smarthost asked, in order
    expect: type[Transition]
    attempts: int = 1  # after the transition (the entry had made one attempt before)
    pending: tuple[str, ...] | None = None
    failed_rcpts: tuple[str, ...] = ()
    added: tuple[tuple[str, Status], ...] = ()  # history entries of this attempt
    due: float | None = None
    available: float = NOW  # when a smarthost may be tried again
    lines: tuple[str, ...] = ()  # one substring per expected log line, in order
    last_error: str | None = "451 4.3.0 busy"
    created: float = CREATED
    meta: Meta = field(default_factory=lambda: Meta(attempts=1, last_error="451 4.3.0 busy", history=(OLD,)))


RCPTS = ("a@x.example", "b@x.example")
BACKOFF_2 = NOW + backoff_delay(2, RETRY, random.Random(7))

CASES = {
    "all sent": Case(
        (_result(*_all(Status.SENT, OK, *RCPTS)),), Complete,
        lines=(f"{QID}: removed",)),
    "some failed (5xx): failed with failed_rcpts": Case(
        (_result(("a@x.example", Status.SENT, OK), ("b@x.example", Status.FAILED, NO_USER)),), Fail,
        attempts=2, pending=(), failed_rcpts=("b@x.example",),
        added=(("a@x.example", Status.SENT), ("b@x.example", Status.FAILED)),
        last_error="550 5.1.1 no such user"),
    "all deferred by a smarthost fault: counts, due when the smarthost is back": Case(
        (_result(*_all(Status.DEFERRED, REFUSED, *RCPTS), fault=True,
                 error="cannot connect to smtp.example.com:587: Connection refused"),), Requeue,
        attempts=2, pending=RCPTS, due=LATER, available=LATER,
        added=(("a@x.example", Status.DEFERRED), ("b@x.example", Status.DEFERRED)),
        lines=("to=<a@x.example>, relay=primary[smtp.example.com]:587, delay=100.00, "
               "delays=100.00/0.50/0.25/0.12, attempts=2, dsn=4.4.1, status=deferred "
               "(451 4.4.1 connect failed: Connection refused; next attempt in 900s)",
               "to=<b@x.example>"),
        last_error="cannot connect to smtp.example.com:587: Connection refused"),
    "deferred by a message-level 4xx: the message's own backoff": Case(
        (_result(*_all(Status.DEFERRED, TRY_LATER, *RCPTS)),), Requeue,
        attempts=2, pending=RCPTS, due=BACKOFF_2,
        added=(("a@x.example", Status.DEFERRED), ("b@x.example", Status.DEFERRED)),
        lines=("attempts=2, dsn=4.3.0, status=deferred (451 4.3.0 try again later; next attempt in",
               "to=<b@x.example>"),
        last_error="451 4.3.0 try again later"),
    "paused without trying: count unchanged, no history, no log line": Case(
        (), Requeue, attempts=1, pending=RCPTS, due=LATER, available=LATER),
    "expired (max_age): failed with the reason": Case(
        (_result(*_all(Status.DEFERRED, TRY_LATER, *RCPTS)),), Fail,
        attempts=2, pending=(), failed_rcpts=RCPTS, created=NOW - MAX_AGE,
        added=(("a@x.example", Status.FAILED), ("b@x.example", Status.FAILED)),
        lines=("relay=none, delay=345600.00, attempts=2, dsn=4.3.0, status=failed (expired after 4 days "
               "in the queue: 451 4.3.0 try again later)", "to=<b@x.example>"),
        last_error="expired after 4 days in the queue; last error: 451 4.3.0 try again later"),
    "partial: some sent, some deferred": Case(
        (_result(("a@x.example", Status.SENT, OK), ("b@x.example", Status.DEFERRED, TRY_LATER)),), Requeue,
        attempts=2, pending=("b@x.example",), due=BACKOFF_2,
        added=(("a@x.example", Status.SENT), ("b@x.example", Status.DEFERRED)),
        lines=("to=<b@x.example>",), last_error="451 4.3.0 try again later"),
    "a fallback takes what the first smarthost could not": Case(
        (_result(*_all(Status.DEFERRED, REFUSED, *RCPTS), fault=True, error="refused"),
         _result(*_all(Status.SENT, OK, *RCPTS))), Complete,
        lines=(f"{QID}: removed",)),
    "nothing left but recipients failed before: failed, attempt counted": Case(
        (), Fail, attempts=2, pending=(), failed_rcpts=("c@x.example",),
        meta=Meta(attempts=1, last_error="451 4.3.0 busy", history=(OLD,), pending=(),
                  failed_rcpts=("c@x.example",))),
}


def _entry(case: Case) -> Entry:
    return Entry(QID, State.ACTIVE, Envelope("app@example.com", RCPTS, received_at=case.created), 100,
                 case.created, case.meta)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_settle(case: Case) -> None:
    entry = _entry(case)
    tally = Tally(entry.pending, last_error=entry.last_error)
    for result in case.results:
        tally = tally.add(result, DELAYS, NOW)
    t = settle(entry, tally, now=NOW, retry=RETRY, max_age=MAX_AGE, hosts_available_at=case.available,
               rng=random.Random(7))
    assert type(t) is case.expect
    assert len(t.lines) == len(case.lines)
    for line, want in zip(t.lines, case.lines, strict=True):
        assert want in line
    if isinstance(t, Complete):
        return
    meta = t.meta
    assert meta.attempts == case.attempts
    assert meta.pending == case.pending
    assert meta.failed_rcpts == case.failed_rcpts
    assert meta.history[:len(entry.history)] == entry.history
    assert [(a.recipient, a.status) for a in meta.history[len(entry.history):]] == list(case.added)
    assert meta.last_error == case.last_error
    if isinstance(t, Requeue):
        assert t.due == pytest.approx(case.due) and meta.next_attempt == t.due
    else:
        assert meta.next_attempt is None
        assert t.reason == (case.last_error or "permanent failure")


def test_expiry_ignores_wall_clock_jumps() -> None:
    """A clock set forward by a day makes no message a day older (clock_skew)."""
    entry = _entry(CASES["deferred by a message-level 4xx: the message's own backoff"])
    tally = Tally(entry.pending).add(_result(*_all(Status.DEFERRED, TRY_LATER, *RCPTS)), DELAYS, NOW)
    jumped = NOW + MAX_AGE
    assert isinstance(settle(entry, tally, now=jumped, retry=RETRY, max_age=MAX_AGE,
                             hosts_available_at=jumped), Fail)
    assert isinstance(settle(entry, tally, now=jumped, retry=RETRY, max_age=MAX_AGE,
                             hosts_available_at=jumped, clock_skew=MAX_AGE), Requeue)


def test_a_queued_message_keeps_the_last_200_history_entries() -> None:
    history = tuple(replace(OLD, at=CREATED + i) for i in range(250))
    entry = replace(_entry(CASES["all sent"]), meta=Meta(attempts=9, history=history))
    tally = Tally(entry.pending).add(_result(*_all(Status.DEFERRED, TRY_LATER, *RCPTS)), DELAYS, NOW)
    t = settle(entry, tally, now=NOW, retry=RETRY, max_age=MAX_AGE, hosts_available_at=NOW)
    assert isinstance(t, Requeue) and len(t.meta.history) == 200
    assert t.meta.history[-2:] == (Attempt(NOW, "a@x.example", Status.DEFERRED, RELAY, str(TRY_LATER), "4.3.0"),
                                   Attempt(NOW, "b@x.example", Status.DEFERRED, RELAY, str(TRY_LATER), "4.3.0"))


def test_a_delivered_recipient_is_never_deferred_again_even_by_a_flagged_fault() -> None:
    """A result flagged as a fault that delivered someone is a transaction, not a fault."""
    mixed = _result(("a@x.example", Status.SENT, OK), ("b@x.example", Status.DEFERRED, REFUSED), fault=True)
    assert not smarthost_failed(mixed)
    tally = Tally(RCPTS).add(mixed, DELAYS, NOW)
    assert tally.sent == ("a@x.example",) and tally.remaining == ("b@x.example",)
    assert tally.reached_any and tally.tried and set(tally.deferred) == {"b@x.example"}


def test_delays_print_as_postfix_does() -> None:
    assert str(DELAYS) == "100.00/0.50/0.25/0.12"
