"""The sending policy where mail is accepted: the compiled pipeline and the RCPT-time check,
applied against the current do-not-email list, rebuilt on reload.

The decisions themselves are the pure functions of ``relayd.policy.pipeline``; this module
holds the state they are applied to (the compiled policy with its DKIM keys, the list).
The delivery side has its own half, ``relayd.delivery.gate``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from relayd.config.schema import Config, SuppressAction
from relayd.model import Message, Reply
from relayd.policy.by_route import route_policy, split_by_route
from relayd.policy.dkim import DkimKeyError, load_private_key
from relayd.policy.pipeline import build_policy, rcpt_decision, run_pipeline
from relayd.policy.records import PipelineResult, Policy, PolicyContext
from relayd.policy.suppressions import SuppressionList

log = logging.getLogger("relayd.policy")


def load_dkim_keys(cfg: Config) -> tuple[dict[str, bytes], list[str]]:
    """Read and check every ``dkim[].private_key_file`` (blocking): the PEM of each usable key
    by its file name, and one ``dkim[i].private_key_file: why`` line per unusable one (never
    any of the key's bytes)."""
    keys: dict[str, bytes] = {}
    problems: list[str] = []
    for i, k in enumerate(cfg.dkim):
        where = f"dkim[{i}].private_key_file"
        try:
            pem = Path(k.private_key_file).read_bytes()
        except OSError as exc:
            problems.append(f"{where}: cannot read {k.private_key_file} ({exc.strerror or exc})")
            continue
        try:
            load_private_key(pem, k.algorithm)
        except DkimKeyError as exc:
            problems.append(f"{where}: {k.private_key_file} {exc}")
            continue
        keys[str(k.private_key_file)] = pem
    return keys, problems


def read_dkim_keys(cfg: Config) -> dict[str, bytes]:
    """``load_dkim_keys`` for the daemon: unusable keys are logged and skipped, so mail still
    flows (unsigned by that key) instead of bouncing."""
    keys, problems = load_dkim_keys(cfg)
    for problem in problems:
        log.error("%s; mail is not signed with it", problem)
    return keys


@dataclass(frozen=True)
class Accepted:
    """What acceptance produced: messages to spool and recipients dropped by the list."""

    outputs: tuple[Message, ...]
    suppressed: tuple[str, ...]
    result: PipelineResult


class AcceptancePolicy:
    """The listener's policy: RCPT-time refusals and the pipeline run on every message."""

    def __init__(self, cfg: Config, store: SuppressionList, *, dkim_keys: dict[str, bytes]) -> None:
        self.store = store
        self.apply(cfg, dkim_keys=dkim_keys)

    def apply(self, cfg: Config, *, dkim_keys: dict[str, bytes]) -> None:
        """(Re)build from a validated config."""
        self.policy: Policy = build_policy(cfg, dkim_keys)
        self.routes = cfg.routes
        self._route_policies = {r.name: route_policy(self.policy, r) for r in cfg.routes
                                if r.changes_content}

    # Called in a worker thread: SQLite and MIME work.
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
        if self.routes:  # without routes, nothing more per message
            result = split_by_route(self.routes, self._route_policies, message, ctx, result)
        return Accepted(outputs=result.outputs, suppressed=result.suppressed, result=result)
