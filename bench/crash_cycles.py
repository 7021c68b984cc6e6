"""Kill/restart campaign (on demand, not in CI): SIGKILL a real `relayd run` at the named crash
points (relayd/faults.py) for N cycles while concurrent clients send, then let it drain and
check the ledger: every 250-acknowledged message reached the smarthost, nothing refused did.

    python bench/crash_cycles.py --cycles 100 --workers 8

Prints a Markdown summary (paste into docs/reliability.md). Exit status 1 if anything was
lost or a refused message was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import signal
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

POINTS = ("data", "spool-fsync", "before-250", "after-upstream-250", "spool-recycle")


async def campaign(args: argparse.Namespace, work: Path) -> int:
    rng = random.Random(args.seed)
    started = time.monotonic()
    async with FakeUpstream() as up:
        port = free_port()
        cfg = write_config(work, [upstream_smarthost(up, tls="none", max_connections=4)], port=port)
        relay = KillableRelay(cfg, port, work / "relayd.log")
        load = Load(port, workers=args.workers, size=args.size, seed=args.seed)
        load.start()
        kills: collections.Counter[str] = collections.Counter()
        other_exits: list[tuple[str, int]] = []
        try:
            for cycle in range(args.cycles):
                point = POINTS[cycle % len(POINTS)]
                nth = rng.randint(1, args.max_hits)
                await asyncio.to_thread(relay.start, 15.0, {"RELAYD_CRASH_AT": f"{point}@{nth}"})
                deadline = time.monotonic() + 60
                while relay.running() and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                if relay.running():
                    relay.kill9()
                    other_exits.append((f"{point}@{nth} not reached", -9))
                code = relay.returncode()
                if code == -signal.SIGKILL:
                    kills[point] += 1
                else:
                    other_exits.append((point, code or 0))
                if (cycle + 1) % 10 == 0:
                    print(f"cycle {cycle + 1}/{args.cycles}: accepted={len(load.ledger.accepted)}",
                          file=sys.stderr)
            await asyncio.to_thread(relay.start)
            await load.finish(timeout=300)
            await wait_for_delivery(load.ledger, up.messages, 300, relay)
            spool = Spool(work / "spool")
            await wait_until(lambda: not spool.ids(State.QUEUED) and not spool.ids(State.ACTIVE),
                             timeout=120, what="empty queue")
            clean_exit = relay.stop()
        finally:
            await load.cancel()
            if relay.running():
                relay.kill9()
    verdict = load.ledger.verdict(m.data for m in up.messages)
    files = spool_files(work / "spool")
    leftovers = {k: len(v) for k, v in files.items() if k not in ("meta", "poke", "free") and v}
    # A message in flight at MAX_RECOVERIES crashes in a row is set aside as failed (kept, with
    # the reason): with a kill every fraction of a second, one can be unlucky enough.
    why = collections.Counter(Spool(work / "spool").get(name.removesuffix(".msg")).last_error or "?"
                              for name in files.get("failed", []))
    elapsed = time.monotonic() - started
    print(f"""
### crash_cycles.py --cycles {args.cycles} --workers {args.workers} --size {args.size} --seed {args.seed}

| measure | value |
|---|---|
| kill/restart cycles | {sum(kills.values())} ({', '.join(f'{p}: {n}' for p, n in sorted(kills.items()))}) |
| unexpected exits | {other_exits or 'none'} |
| messages acknowledged with 250 | {verdict.accepted} |
| messages refused with 5xx (NUL byte) | {verdict.refused} |
| delivered (distinct) / copies | {verdict.delivered} / {verdict.copies} |
| **lost** | **{len(verdict.lost)}** |
| refused but sent | {len(verdict.refused_sent)} |
| duplicates | {verdict.duplicates} |
| client attempts cut by a kill (retried) | {verdict.unknown_attempts} |
| spool leftovers after drain | {leftovers or 'none'} |
| why the failed ones failed | {dict(why) or '-'} |
| final SIGTERM exit status | {clean_exit} |
| wall time | {elapsed:.0f} s |
""")
    return 0 if verdict.ok and not other_exits and not leftovers else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=100)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--size", type=int, default=2000, help="approximate body size in bytes")
    p.add_argument("--max-hits", type=int, default=15, help="kill on a random hit in 1..N")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="relayd-crash-") as tmp:
        return asyncio.run(campaign(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
