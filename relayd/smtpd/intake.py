"""The listener's Acceptor: the acceptance policy, then the durable spool, then delivery.

Answers 250 only after every copy of the message is on disk (RFC 5321 §6.1). Messages
whose DATA ends while the previous ones are being stored go to the spool together, with
one flush for all of them (relayd/spool/write.py).

When the policy signs (``dkim``), the policy and the spool are two stages, each a batch at a
time in its own worker thread: messages are signed while the previous batch waits for the
disk, so a burst does not queue its signatures behind flushes (the acceptance latency at an
offered rate, docs/performance.md). Without signing the policy costs microseconds and one
stage does both, saving a thread hand-off per batch.
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
from relayd.spool.records import new_queue_id
from relayd.spool.store import Spool

log = logging.getLogger("relayd")

# One message whose DATA has ended: (queue ID, envelope, content, time of acceptance).
_Arrival = tuple[str, Envelope, bytes, float]
# One message through the policy: (queue ID, the decision, time of acceptance).
_Decided = tuple[str, Accepted, float]


class Intake:
    """Implements ``relayd.smtpd.listener.Acceptor``."""

    def __init__(self, policy: AcceptancePolicy, spool: Spool, *, executor: Executor,
                 clock: Callable[[], float], metrics: Recorder,
                 enqueue: Callable[[str, bool], None]) -> None:
        self.policy = policy
        self._spool = spool
        self._clock = clock
        self._metrics = metrics
        self._enqueue = enqueue
        self._stores: Batches[_Arrival] = Batches(self._decide_and_store_batch, executor)
        self._decisions: Batches[_Arrival] = Batches(self._decide_batch, executor)
        self._decided: Batches[_Decided] = Batches(self._store_decided_batch, executor)

    def check_recipient(self, mail_from: str, rcpt: str) -> Reply | None:
        return self.policy.check_recipient(mail_from, rcpt, self._clock())

    def _decide(self, arrival: _Arrival) -> Accepted | Exception:
        _queue_id, envelope, content, now = arrival
        try:
            return self.policy.accept(Message(envelope, content), now)
        except Exception as exc:  # handed to that message's session, as before batching
            return exc

    def _decide_batch(self, batch: list[_Arrival]) -> list[Outcome]:
        """Worker thread, first stage: the policy (CPU) for each message."""
        out: list[Outcome] = []
        for arrival in batch:
            decision = self._decide(arrival)
            out.append(Err(decision) if isinstance(decision, Exception) else Ok(decision))
        return out

    def _decide_and_store_batch(self, batch: list[_Arrival]) -> list[Outcome]:
        """Worker thread, both stages in one hop off the loop."""
        return self._store([(qid, self._decide((qid, env, content, now)), now)
                            for qid, env, content, now in batch])

    def _store_decided_batch(self, batch: list[_Decided]) -> list[Outcome]:
        """Worker thread, second stage: the spool writes of messages already decided."""
        return self._store([(qid, accepted, now) for qid, accepted, now in batch])

    def _store(self, batch: list[tuple[str, Accepted | Exception, float]]) -> list[Outcome]:
        """The spool writes of all of a batch's messages with one flush. Per message:
        Ok((Accepted, [(ID, stored copy)])) or Err(the error)."""
        decisions: list[Accepted | Exception] = []
        items: list[tuple[Message, str]] = []
        owners: list[int] = []  # which message of the batch each spool item is a copy of
        for k, (queue_id, accepted, now) in enumerate(batch):
            decisions.append(accepted)
            if isinstance(accepted, Exception):
                continue
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
        arrival = (queue_id, envelope, content, now)
        try:
            if self.policy.policy.dkim:
                decided = await self._decisions.submit(arrival)
                accepted, stored = await self._decided.submit((queue_id, decided, now))
            else:
                accepted, stored = await self._stores.submit(arrival)
        except SpoolError as exc:
            log.error("%s: not accepted, the spool failed: %s", queue_id, exc)
            return Reply(451, "4.3.0 Temporary local problem storing the message, try again later")
        faults.crash_point("before-250")
        # Postfix's smtpd line: client=…, sasl_method=…, sasl_username=… for authenticated mail.
        sasl = (f", sasl_method={envelope.auth_method}, sasl_username={envelope.user}"
                if envelope.user else "")
        log.info("%s: client=[%s]%s, helo=<%s>, from=<%s>, size=%d, nrcpt=%d, %s", queue_id,
                 envelope.client, sasl, envelope.helo, envelope.mail_from, len(content),
                 len(envelope.rcpt_tos), log_summary(accepted.result))
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
