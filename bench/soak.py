"""Soak test (on demand, not in CI): a real `relayd run` takes a large volume from concurrent
clients while the fake smarthost misbehaves at random and relayd is killed with SIGKILL now
and then; at the end every message that got a 250 must have arrived.

    python bench/soak.py --messages 200000 --workers 16
    python bench/soak.py --messages 5000 --kill-every 4 --fault-every 1.5

Upstream faults (transient only, so that every message can arrive in the end): 421 at the
greeting, 451 at MAIL, 450 at RCPT, 451 to DATA, 451 after the final dot, disconnect at
MAIL / RCPT / during the body / after the final dot (before the reply), and a silent server
(at the greeting, MAIL or RCPT; relayd's per-command timeout ends it). Prints a Markdown
summary for docs/reliability.md; exit status 1 if anything was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relayd.model import State
from relayd.spool.store import Spool
from tests.support.crashload import KillableRelay, Load, spool_files, wait_for_delivery
from tests.support.relay import free_port, upstream_smarthost, wait_until, write_config
from tests.support.upstream import FakeUpstream

FAULTS: dict[str, dict[str, object]] = {
    "421 at greeting": {"replies": {"greeting": "421 4.3.2 maintenance"}},
    "451 at MAIL": {"replies": {"mail": "451 4.3.0 try later"}},
    "450 at RCPT": {"replies": {"rcpt": {"user@example.net": "450 4.2.1 mailbox busy"}}},
    "451 to DATA": {"replies": {"data": "451 4.3.0 try later"}},
    "451 after dot": {"replies": {"dot": "451 4.3.0 queue full"}},
    "drop at MAIL": {"drop_at": "mail"},
    "drop at RCPT": {"drop_at": "rcpt"},
    "drop in body": {"drop_at": "body"},
    "drop after dot": {"drop_at": "dot"},
    "silent at greeting": {"hang_at": "greeting"},
    "silent at MAIL": {"hang_at": "mail"},
    "silent at RCPT": {"hang_at": "rcpt"},
}


def set_fault(up: FakeUpstream, fault: dict[str, object] | None) -> None:
    up.replies = dict(fault.get("replies", {})) if fault else {}  # type: ignore[call-overload]
    up.drop_at = fault.get("drop_at") if fault else None  # type: ignore[assignment]
    up.hang_at = fault.get("hang_at") if fault else None  # type: ignore[assignment]
    up.drop_once = False


async def soak(args: argparse.Namespace, work: Path) -> int:
    rng = random.Random(args.seed)
    started = time.monotonic()
    faults: collections.Counter[str] = collections.Counter()
    kills = 0
    async with FakeUpstream() as up:
        port = free_port()
        cfg = write_config(work, [upstream_smarthost(up, tls="none", max_connections=4, timeout="1s")],
                           port=port, max_sessions=args.workers + 8,
                           spool={"retry": {"initial": "200ms", "max_interval": "2s"}})
        relay = KillableRelay(cfg, port, work / "relayd.log")
        await asyncio.to_thread(relay.start)
        load = Load(port, workers=args.workers, size=args.size, limit=args.messages, seed=args.seed)
        load.start()
        done = asyncio.Event()

        async def chaos() -> None:
            while not done.is_set():
                if rng.random() < 0.5:
                    name = rng.choice(list(FAULTS))
                    faults[name] += 1
                    set_fault(up, FAULTS[name])
                else:
                    set_fault(up, None)
                await asyncio.sleep(rng.uniform(0.3, args.fault_every * 2))

        async def killer() -> None:
            nonlocal kills
            while not done.is_set():
                await asyncio.sleep(rng.uniform(0.5, args.kill_every * 2))
                if done.is_set():
                    break
                relay.kill9()
                kills += 1
                await asyncio.to_thread(relay.start)

        async def progress() -> None:
            while not done.is_set():
                await asyncio.sleep(10)
                print(f"{time.monotonic() - started:6.0f}s sent={load.sent} accepted={len(load.ledger.accepted)} "
                      f"delivered={len(up.messages)} kills={kills}", file=sys.stderr)

        side = [asyncio.create_task(chaos()), asyncio.create_task(progress())]
        if args.kill_every > 0:
            side.append(asyncio.create_task(killer()))
        try:
            await load.finish(timeout=args.messages * 2 + 600)
            done.set()
            await asyncio.gather(*side)
            set_fault(up, None)
            if not relay.running():
                await asyncio.to_thread(relay.start)
            await wait_for_delivery(load.ledger, up.messages, 600, relay)
            spool = Spool(work / "spool")
            await wait_until(lambda: not spool.ids(State.QUEUED) and not spool.ids(State.ACTIVE),
                             timeout=300, what="empty queue")
            clean_exit = relay.stop()
        finally:
            done.set()
            for t in side:
                t.cancel()
            await load.cancel()
            if relay.running():
                relay.kill9()
    verdict = load.ledger.verdict(m.data for m in up.messages)
    leftovers = {k: len(v) for k, v in spool_files(work / "spool").items() if k not in ("meta", "poke", "free") and v}
    elapsed = time.monotonic() - started
    print(f"""
### soak.py --messages {args.messages} --workers {args.workers} --size {args.size} --kill-every {args.kill_every} --fault-every {args.fault_every} --seed {args.seed}

| measure | value |
|---|---|
| messages submitted (distinct) | {verdict.accepted + verdict.refused} |
| acknowledged with 250 | {verdict.accepted} |
| refused with 5xx (NUL byte, by design) | {verdict.refused} |
| delivered (distinct) / copies | {verdict.delivered} / {verdict.copies} |
| **lost** | **{len(verdict.lost)}** |
| refused but sent | {len(verdict.refused_sent)} |
| duplicates | {verdict.duplicates} |
| SIGKILLs of relayd | {kills} |
| upstream fault periods | {sum(faults.values())}: {', '.join(f'{k} x{v}' for k, v in sorted(faults.items()))} |
| client attempts cut by a kill / 4xx replies to clients | {verdict.unknown_attempts} / {verdict.temp_replies} |
| spool leftovers after drain | {leftovers or 'none'} |
| final SIGTERM exit status | {clean_exit} |
| wall time | {elapsed:.0f} s ({verdict.accepted / elapsed:.0f} accepted messages/s overall) |
""")
    return 0 if verdict.ok and not leftovers else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--size", type=int, default=2000, help="approximate body size in bytes")
    p.add_argument("--kill-every", type=float, default=5.0, help="mean seconds between SIGKILLs (0: none)")
    p.add_argument("--fault-every", type=float, default=2.0, help="mean seconds between fault changes")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="relayd-soak-") as tmp:
        return asyncio.run(soak(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
