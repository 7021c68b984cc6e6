"""Crash safety: a real `relayd run` is killed with SIGKILL at each named point (relayd/faults.py)
while eight clients send concurrently, restarted, killed again, and finally left to drain.

The promise (RFC 5321 §6.1) checked after every run: every message that got a 250 reached the
smarthost at least once, nothing that got a 5xx ever did, and the spool is clean. Duplicates
are allowed (at-least-once, RFC 1047) but where a point makes one certain, the test asserts it
happened, which proves the kill landed where its name says. The >=100-cycle version is
bench/crash_cycles.py (results in docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from relayd.model import State
from relayd.spool.store import Spool
from tests.support.crashload import KillableRelay, Load, crash_cycles, spool_files, wait_for_delivery
from tests.support.relay import ROOT, free_port, upstream_smarthost, wait_until, write_config
from tests.support.upstream import FakeUpstream

CYCLES = 3


def assert_spool_clean(spool: Path) -> None:
    files = spool_files(spool)
    for name in ("tmp", "queued", "active", "held", "failed", "corrupt"):
        assert files.get(name, []) == [], f"{name}/ not empty: {files.get(name)}"
    # relayd stopped: no delivered message's content is left in the files kept for reuse.
    kept = {n: os.stat(spool / "free" / n).st_size for n in files.get("free", [])}
    assert not any(kept.values()), f"free/ still holds delivered content: {kept}"


@pytest.mark.parametrize("point", ["data", "spool-fsync", "before-250", "after-upstream-250",
                                   "spool-recycle"])
async def test_kill_at_point_under_load_loses_nothing(tmp_path: Path, point: str) -> None:
    async with FakeUpstream() as up:
        port = free_port()
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], port=port)
        relay = KillableRelay(cfg, port, tmp_path / "relayd.log")
        load = Load(port, workers=8, seed=hash(point) & 0xFFFF)
        load.start()
        try:
            codes = await crash_cycles(relay, point, CYCLES, hits=(2, 10), rng=random.Random(point))
            left = os.listdir(tmp_path / "spool" / "free")
            await asyncio.to_thread(relay.start)  # unarmed: drains the queue
            before = len(load.ledger.accepted)
            await wait_until(lambda: len(load.ledger.accepted) >= before + 8, what="load after restart")
            await load.finish()
            await wait_for_delivery(load.ledger, up.messages, 30, relay)
            # Copies committed before a kill but never acknowledged are delivered too.
            await wait_until(lambda: not Spool(tmp_path / "spool").ids(State.QUEUED)
                             and not Spool(tmp_path / "spool").ids(State.ACTIVE), timeout=20,
                             what="empty queue")
            assert relay.stop() == 0
        finally:
            await load.cancel()
            if relay.running():
                relay.kill9()
    assert codes == [-signal.SIGKILL] * CYCLES  # each armed run died at the point, not otherwise
    verdict = load.ledger.verdict(m.data for m in up.messages)
    print(f"{point}: {verdict.summary()}")
    assert verdict.ok, f"{verdict.summary()} lost={verdict.lost} refused_sent={verdict.refused_sent}"
    assert verdict.accepted >= 10 and verdict.refused >= 1
    assert verdict.unknown_attempts >= 1  # the kills really cut sessions
    if point in ("before-250", "after-upstream-250"):
        # Committed but unacknowledged / delivered but not recorded: a re-send is certain.
        assert verdict.duplicates >= 1
    if point == "spool-recycle":
        # Killed right after a delivered message's file, content and all, went into free/:
        # the restart removed it (and the test's ledger shows no new message got its content).
        assert left
        assert not set(left) & set(os.listdir(tmp_path / "spool" / "free"))
    assert_spool_clean(tmp_path / "spool")
    assert "Traceback" not in relay.log()


async def test_kill_during_a_queue_command_loses_nothing(tmp_path: Path) -> None:
    """`relayd queue retry` SIGKILLed mid-command while the daemon runs: the message must still
    be delivered. (It used to be stranded in held/, where retry parked it as a lock.)"""
    async with FakeUpstream(replies={"greeting": "421 4.3.2 down for maintenance"}) as up:
        port = free_port()
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], port=port)
        relay = KillableRelay(cfg, port, tmp_path / "relayd.log")
        await asyncio.to_thread(relay.start)
        load = Load(port, workers=4, limit=12, refuse_every=0)
        load.start()
        await load.finish()
        spool = Spool(tmp_path / "spool")
        env = dict(os.environ, PYTHONPATH=str(ROOT), RELAYD_CONFIG=str(cfg),
                   RELAYD_CRASH_AT="queue-command")
        killed = 0
        try:
            for qid in spool.ids(State.QUEUED)[:6]:
                res = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "relayd", "queue",
                                                               "retry", qid], env=env, capture_output=True)
                killed += res.returncode == -signal.SIGKILL
            up.replies = {}  # the provider is back
            await wait_for_delivery(load.ledger, up.messages, 30, relay)
            await wait_until(lambda: not spool.list(), timeout=10, what="empty queue")
        finally:
            relay.stop()
    assert killed >= 1
    verdict = load.ledger.verdict(m.data for m in up.messages)
    assert verdict.ok and verdict.accepted == 12, verdict.summary()
