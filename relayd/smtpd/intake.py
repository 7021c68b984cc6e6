"""The listener's Acceptor: the acceptance policy, then the durable spool, then delivery.

Answers 250 only after every copy of the message is on disk (RFC 5321 §6.1). Messages
whose DATA ends while the previous ones are being stored go to the spool together, with
one flush for all of them (relayd/spool/write.py).

A store that fails (disk full, out of inodes, read-only file system, EIO, permission denied)
is answered 451 and reported to ``on_spool`` (the ``spool_unwritable`` alert, through the
delivery: relayd/spool/health.py) and the ``relayd_spool_writable`` gauge; the next store
that succeeds reports the end of the outage. While the spool stores, success costs one
boolean test.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Executor

from relayd import faults
from relayd.control.metrics import Recorder
from relayd.delivery import logline
from relayd.errors import SpoolError, UnknownMessage
from relayd.model import Envelope, Message, Reply, Status
from relayd.policy.acceptance import AcceptancePolicy, Accepted
from relayd.policy.pipeline import log_summary
from relayd.spool.batching import Batches, Err, Ok, Outcome
from relayd.spool.health import SpoolHealth
from relayd.spool.records import new_queue_id
from relayd.spool.store import Spool

log = logging.getLogger("relayd")

# One message whose DATA has ended: (queue ID, envelope, content, time of acceptance).
_Arrival = tuple[str, Envelope, bytes, float]


class Intake:
    """Implements ``relayd.smtpd.listener.Acceptor``."""

    def __init__(self, policy: AcceptancePolicy, spool: Spool, *, executor: Executor,
                 clock: Callable[[], float], metrics: Recorder,
                 enqueue: Callable[[str, bool], None],
                 on_spool: Callable[[SpoolHealth], None] | None = None) -> None:
        self.policy = policy
        self._spool = spool
        self._clock = clock
        self._metrics = metrics
        self._enqueue = enqueue
        self._on_spool = on_spool
        self._spool_failing = False  # the last store failed: the next success reports the end
        self._stores: Batches[_Arrival] = Batches(self._store_batch, executor)

    def check_recipient(self, mail_from: str, rcpt: str) -> Reply | None:
        return self.policy.check_recipient(mail_from, rcpt, self._clock())

    def _store_batch(self, batch: list[_Arrival]) -> list[Outcome]:
        """Worker thread: the policy (CPU) for each message, then the spool writes of all
        of them, one hop off the loop. Per message: Ok((Accepted, [(ID, stored copy)]))
        or Err(the error)."""
        decisions: list[Accepted | Exception] = []
        items: list[tuple[Message, str]] = []
        owners: list[int] = []  # which message of the batch each spool item is a copy of
        for k, (queue_id, envelope, content, now) in enumerate(batch):
            try:
                accepted = self.policy.accept(Message(envelope, content), now)
            except Exception as exc:  # handed to that message's session, as before batching
                decisions.append(exc)
                continue
            decisions.append(accepted)
            for i, message in enumerate(accepted.outputs):
                items.append((message, queue_id if i == 0 else new_queue_id(now)))
                owners.append(k)
        results = self._spool.put_batch(items) if items else []
        stored: list[list[tuple[str, Message]]] = [[] for _ in batch]
        errors: dict[int, SpoolError] = {}
        for (message, _qid), k, result in zip(items, owners, results, strict=True):
            if isinstance(result, SpoolError):
                errors.setdefault(k, result)
            else:
                stored[k].append((result, message))
        out: list[Outcome] = []
        for k, decision in enumerate(decisions):
            if isinstance(decision, Exception):
                out.append(Err(decision))
            elif k in errors:
                # All or nothing: the client will retry the whole message after our 451.
                for qid, _ in stored[k]:
                    with contextlib.suppress(SpoolError, UnknownMessage):
                        self._spool.delete(qid)
                out.append(Err(errors[k]))
            else:
                out.append(Ok((decision, stored[k])))
        return out

    async def accept(self, queue_id: str, envelope: Envelope, content: bytes) -> Reply:
        now = self._clock()
        try:
            accepted, stored = await self._stores.submit((queue_id, envelope, content, now))
        except SpoolError as exc:
            log.error("%s: not accepted, the spool failed: %s", queue_id, exc)
            self._spool_failed(exc)
            return Reply(451, "4.3.0 Temporary local problem storing the message, try again later")
        if self._spool_failing:
            self._spool_stores_again()
        faults.crash_point("before-250")
        # Postfix's smtpd line: client=…, sasl_method=…, sasl_username=… for authenticated mail.
        sasl = (f", sasl_method={envelope.auth_method}, sasl_username={envelope.user}"
                if envelope.user else "")
        log.info("%s: client=[%s]%s, helo=<%s>, from=<%s>, size=%d, nrcpt=%d, %s", queue_id,
                 envelope.client, sasl, envelope.helo, envelope.mail_from, len(content),
                 len(envelope.rcpt_tos), log_summary(accepted.result))
        for note in accepted.result.steps:
            level = note.logged
            if level is not None:  # lines over 998 octets re-encoded (RFC 5322 §2.1.1)
                log.log(level, "%s: %s", queue_id, note.text)
        if any(m.envelope.route for _, m in stored):
            log.info("%s: routes: %s", queue_id,
                     ", ".join(f"{q} route={m.envelope.route}" for q, m in stored))
        elif len(stored) > 1:
            log.info("%s: one copy per recipient (personal unsubscribe token): %s", queue_id,
                     ", ".join(q for q, _ in stored))
        for rcpt in accepted.suppressed:
            log.info("%s", logline.delivery_line(queue_id, rcpt, "none", 0.0, 0, "2.0.0",
                                                 Status.SUPPRESSED, "on the do-not-email list"))
            self._metrics.suppressed()
        self._metrics.message_received()
        for qid, message in stored:
            self._enqueue(qid, message.envelope.priority)
        return Reply(250, f"2.0.0 Ok: queued as {queue_id}")

    def _spool_failed(self, exc: SpoolError) -> None:
        """Every failed store is reported (the alerts de-duplicate, and re-notify while the
        outage lasts); the reason is the operating system's, never the message's."""
        self._spool_failing = True
        self._metrics.set_spool_writable(False)
        if self._on_spool is not None:
            reason = str(exc).removeprefix("cannot store message: ")
            self._on_spool(SpoolHealth(False, str(self._spool.path), reason))

    def _spool_stores_again(self) -> None:
        self._spool_failing = False
        self._metrics.set_spool_writable(True)
        log.info("the spool %s stores mail again", self._spool.path)
        if self._on_spool is not None:
            self._on_spool(SpoolHealth(True, str(self._spool.path)))
