"""The sending policy at run time: the compiled policy, the do-not-email list, the daily cap
and the rate limiter, as the daemon's listener (acceptance) and queue manager (delivery) use
them. The decisions themselves are the pure functions of ``relayd.policy``; this module holds
the state they are applied to and rebuilds it on reload.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from relayd.config.schema import Config, LimitsConfig, SuppressAction
from relayd.delivery.limits import WINDOW, DailyCap, RateLimiter, limited
from relayd.delivery.outcomes import is_hard_bounce
from relayd.model import Envelope, Message, RecipientOutcome, Reply, Status
from relayd.policy.pipeline import build_policy, rcpt_decision, recheck_at_delivery, run_pipeline
from relayd.policy.records import PipelineResult, Policy, PolicyContext
from relayd.policy.suppressions import SuppressionStore
from relayd.spool.records import Entry

log = logging.getLogger("relayd.policy")


def read_dkim_keys(cfg: Config) -> dict[str, bytes]:
    """Read every ``dkim[].private_key_file`` (blocking); unreadable keys are logged and
    skipped, so mail still flows (unsigned) instead of bouncing."""
    keys: dict[str, bytes] = {}
    for i, k in enumerate(cfg.dkim):
        try:
            keys[k.domain] = Path(k.private_key_file).read_bytes()
        except OSError as exc:
            log.error("dkim[%d].private_key_file: cannot read %s (%s); mail from %s goes out unsigned",
                      i, k.private_key_file, exc.strerror or exc, k.domain)
    return keys


@dataclass(frozen=True)
class Accepted:
    """What acceptance produced: messages to spool and recipients dropped by the list."""

    outputs: tuple[Message, ...]
    suppressed: tuple[str, ...]
    result: PipelineResult


class SendingPolicy:
    """Acceptance-time policy and the queue manager's delivery gate (``qmgr.Gate``)."""

    def __init__(self, cfg: Config, *, dkim_keys: dict[str, bytes], cap_window: float = WINDOW) -> None:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self._cap_window = cap_window  # 24 h; tests use a short window instead of waiting a day
        self.store = SuppressionStore(cfg.state_dir)
        self._cap: DailyCap | None = None
        self._grants: dict[str, int] = {}
        self.apply(cfg, dkim_keys=dkim_keys)

    def apply(self, cfg: Config, *, dkim_keys: dict[str, bytes]) -> None:
        """(Re)build from a validated config: the policy, cap and rate settings."""
        self.config = cfg
        self.policy: Policy = build_policy(cfg, dkim_keys)
        self.limits: LimitsConfig = cfg.limits
        cap = cfg.limits.daily_cap
        if cap is None:
            if self._cap is not None:
                self._cap.close()
            self._cap = None
        elif self._cap is None or self._cap.cap != cap:
            if self._cap is not None:
                self._cap.close()
            self._cap = DailyCap(cap, cfg.state_dir, window=self._cap_window)
        self.rate = RateLimiter(cfg.limits.rate) if cfg.limits.rate is not None else None

    def close(self) -> None:
        self.store.close()
        if self._cap is not None:
            self._cap.close()

    # -- acceptance (called in a worker thread: SQLite and MIME work) -------------------------------
    def check_recipient(self, mail_from: str, rcpt: str, now: float) -> Reply | None:
        """RCPT-time refusal for ``do_not_email.action: reject`` (cheap: a cached snapshot)."""
        if self.policy.do_not_email.action is not SuppressAction.REJECT:
            return None
        return rcpt_decision(self.policy, mail_from, rcpt,
                             PolicyContext(now=now, suppressed=self.store.snapshot()))

    def accept(self, message: Message, now: float) -> Accepted:
        """Run the pipeline (pure) against the current do-not-email list."""
        ctx = PolicyContext(now=now, suppressed=self.store.snapshot())
        result = run_pipeline(self.policy, message, ctx)
        return Accepted(outputs=result.outputs, suppressed=result.suppressed, result=result)

    # -- delivery (qmgr.Gate) ------------------------------------------------------------------------
    def recheck(self, entry: Entry, rcpts: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        env: Envelope = replace(entry.envelope, rcpt_tos=rcpts)
        ctx = PolicyContext(now=0.0, suppressed=self.store.snapshot())
        return recheck_at_delivery(self.policy, env, ctx)

    def hold_for(self, entry: Entry, count: int, now: float) -> float:
        """0 when the message may go now (its recipients are reserved against the cap), else
        how long to wait. Mail over the cap waits in the spool; it is never bounced."""
        cap = self._cap
        if cap is None or count <= 0:
            return 0.0
        if not limited(self.limits, entry.envelope.priority):
            return 0.0  # exempt priority mail still counts (record in delivered())
        granted = cap.acquire(min(count, cap.cap), now)
        if granted >= min(count, cap.cap):
            self._grants[entry.id] = granted
            return 0.0
        cap.settle(granted, 0, now)
        free_at = cap.next_free_at(now, count)
        return max(1.0, (free_at - now) if free_at is not None else 5.0)

    async def wait_rate(self, entry: Entry, count: int = 1) -> None:
        if self.rate is not None and limited(self.limits, entry.envelope.priority):
            await self.rate.wait(max(1, count))

    def counts_deliveries(self) -> bool:
        return self._cap is not None

    def delivered(self, entry: Entry, count: int, now: float) -> None:
        cap = self._cap
        granted = self._grants.pop(entry.id, 0)
        if cap is None:
            return
        if granted:
            cap.settle(granted, count, now)
        elif count:
            cap.record(count, now)

    def hard_bounce(self, rcpt: str, reply: Reply) -> None:
        """``do_not_email.auto_add: [hard_bounce]``: a 5.1.x "no such user" joins the list."""
        if "hard_bounce" in self.config.do_not_email.auto_add and is_hard_bounce(reply):
            self.store.add([rcpt], "hard_bounce")
            log.info("added <%s> to the do-not-email list after a hard bounce (%s)", rcpt, reply)

    def cap_remaining(self, now: float) -> int | None:
        return None if self._cap is None else self._cap.remaining(now)

    def suppressed_outcome(self, rcpt: str) -> RecipientOutcome:
        return RecipientOutcome(rcpt, Status.SUPPRESSED, Reply(250, "2.0.0 on the do-not-email list"),
                                "2.0.0")
