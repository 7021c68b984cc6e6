"""Crash-campaign helpers: a killable relayd process, a retrying load generator that keeps a
ledger of what the relay answered, and the verdict (lost / duplicated / refused-but-sent).

Used by tests/integration/test_crash_points.py (a few cycles per point, in CI) and by the
on-demand scripts bench/crash_cycles.py and bench/soak.py (hundreds of cycles).

The load generator behaves like a well-behaved legacy app (RFC 5321 §3.8, §4.5.4.1): a broken
connection or a 4xx means "try again later", a 250 means the relay now owns the message, a 5xx
means "never". Every message carries an ``X-Load-Id`` header; the verdict matches what the
fake smarthost received against the ledger:

- lost: got a 250 but never reached the smarthost (must be 0, always);
- refused_sent: only ever got 5xx but reached the smarthost anyway (must be 0);
- duplicates: extra copies (allowed: at-least-once; counted and reported).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib

from tests.support.relay import ROOT, RelayProcess, wait_for_greeting
from tests.support.waiting import WaitTimeout, wait_until

_ID = re.compile(rb"^X-Load-Id: (\S+)\r$", re.M)


class KillableRelay(RelayProcess):
    """``relayd run`` with extra environment (the fault-injection variables)."""

    def __init__(self, config_path: Path, port: int, log_path: Path,
                 tmpfs: tuple[Path, str] | None = None) -> None:
        super().__init__(config_path, port, log_path)
        self.starts = 0
        # (mount point, tmpfs options such as "size=1m"): run relayd in its own mount namespace (unshare) with a small
        # tmpfs there, so the spool can really fill up (ENOSPC) or go read-only (EROFS).
        self.tmpfs = tmpfs

    def start(self, timeout: float = 15.0, env: Mapping[str, str] | None = None) -> None:
        """Start and wait for the 220 greeting. ``env`` arms RELAYD_CRASH_AT / RELAYD_FAIL_AT."""
        full = dict(os.environ, PYTHONPATH=str(ROOT), RELAYD_CONFIG=str(self.config_path))
        for key in ("NOTIFY_SOCKET", "RELAYD_CRASH_AT", "RELAYD_FAIL_AT"):
            full.pop(key, None)
        full.update(env or {})
        argv = [sys.executable, "-m", "relayd", "run"]
        if self.tmpfs is not None:
            where, options = self.tmpfs
            where.mkdir(parents=True, exist_ok=True)
            argv = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                    f'mount -t tmpfs -o {options} relayd-test "$0" && exec "$@"', str(where), *argv]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, env=full, stdout=log, stderr=log)
        self.starts += 1
        try:
            if wait_for_greeting(self.proc, self.port, timeout):
                return
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.log()[-3000:]}") from None
        code = self.proc.returncode
        if code == -signal.SIGKILL and env:
            return  # armed and killed before the probe got in: still a valid cycle
        raise AssertionError(f"relayd exited with {code}: {self.log()[-3000:]}")

    def inside(self, path: Path) -> Path:
        """``path`` as the relayd process sees it (inside its mount namespace)."""
        assert self.proc is not None
        return Path(f"/proc/{self.proc.pid}/root") / path.relative_to("/")

    def in_namespace(self, *argv: str) -> None:
        """Run a command in relayd's user and mount namespaces (e.g. remount the tmpfs)."""
        assert self.proc is not None
        res = subprocess.run(["nsenter", "-t", str(self.proc.pid), "--user", "--mount",
                              "--preserve-credentials", *argv], capture_output=True)
        if res.returncode != 0:
            raise AssertionError(f"{argv} in relayd's namespace: exit {res.returncode}: "
                                 f"{res.stderr.decode(errors='replace')}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


def message(load_id: str, size: int = 0) -> bytes:
    body = b"".join(b"line %d of the body %s\r\n" % (i, b"." if i % 7 == 0 else b"")
                    for i in range(max(1, size // 24)))
    return (b"From: app@example.com\r\nTo: user@example.net\r\nSubject: load %s\r\n"
            b"X-Load-Id: %s\r\n\r\n" % (load_id.encode(), load_id.encode())) + body


@dataclass
class Ledger:
    """What the relay told the senders, per message id."""

    accepted: set[str] = field(default_factory=set)      # got 250 at least once
    refused: set[str] = field(default_factory=set)       # got a 5xx (and never a 250)
    unknown_attempts: int = 0                            # connection broke before the reply
    temp_replies: int = 0                                # 4xx replies (retried)

    def verdict(self, received: Iterable[bytes]) -> Verdict:
        counts: collections.Counter[str] = collections.Counter()
        for data in received:
            m = _ID.search(data)
            if m:
                counts[m.group(1).decode()] += 1
        return Verdict(
            accepted=len(self.accepted), refused=len(self.refused),
            delivered=len(counts), copies=sum(counts.values()),
            lost=sorted(self.accepted - set(counts)),
            refused_sent=sorted(self.refused & set(counts)),
            unexpected=sorted(set(counts) - self.accepted - self.refused),
            duplicates=sum(c - 1 for c in counts.values()),
            unknown_attempts=self.unknown_attempts, temp_replies=self.temp_replies)


@dataclass(frozen=True)
class Verdict:
    accepted: int
    refused: int
    delivered: int
    copies: int
    lost: list[str]
    refused_sent: list[str]
    unexpected: list[str]   # delivered, never got 250 (the client gave up or was stopped)
    duplicates: int
    unknown_attempts: int
    temp_replies: int

    @property
    def ok(self) -> bool:
        return not self.lost and not self.refused_sent

    def summary(self) -> str:
        return (f"accepted={self.accepted} refused={self.refused} delivered={self.delivered} "
                f"copies={self.copies} lost={len(self.lost)} refused_sent={len(self.refused_sent)} "
                f"duplicates={self.duplicates} unknown_attempts={self.unknown_attempts} "
                f"temp_replies={self.temp_replies} delivered_without_250={len(self.unexpected)}")


class Load:
    """``workers`` concurrent senders; each message is retried until 250 or 5xx.

    Every ``refuse_every``-th message contains a NUL byte, which the listener refuses with 554:
    those must never reach the smarthost, whatever crashes in between.
    """

    def __init__(self, port: int, *, workers: int = 8, size: int = 200, refuse_every: int = 9,
                 limit: int | None = None, prefix: str = "m", seed: int = 0) -> None:
        self.port = port
        self.workers = workers
        self.size = size
        self.refuse_every = refuse_every
        self.limit = limit
        self.prefix = prefix
        self.ledger = Ledger()
        self.sent = 0
        self._next = 0
        self._stop = asyncio.Event()
        self._rng = random.Random(seed)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(w)) for w in range(self.workers)]

    async def finish(self, timeout: float = 60.0) -> None:
        """Stop taking new messages (unless a ``limit`` was given: then send them all); wait
        until every started one got a final answer."""
        if self.limit is None:
            self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), timeout)

    async def cancel(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _worker(self, w: int) -> None:
        while not self._stop.is_set():
            if self.limit is not None and self._next >= self.limit:
                return
            n = self._next
            self._next += 1
            load_id = f"{self.prefix}{n}"
            data = message(load_id, self.size)
            if self.refuse_every and n % self.refuse_every == self.refuse_every - 1:
                data += b"NUL \x00 here\r\n"
            await self._send_until_final(load_id, data)
            self.sent += 1

    async def _send_until_final(self, load_id: str, data: bytes) -> None:
        delay = 0.02
        while True:
            try:
                await aiosmtplib.send(data, sender="app@example.com", recipients=["user@example.net"],
                                      hostname="127.0.0.1", port=self.port, start_tls=False,
                                      use_tls=False, timeout=10)
            except aiosmtplib.SMTPResponseException as exc:
                if 500 <= exc.code < 600:
                    if load_id not in self.ledger.accepted:
                        self.ledger.refused.add(load_id)
                    return
                if 400 <= exc.code < 500:
                    self.ledger.temp_replies += 1
                else:
                    self.ledger.unknown_attempts += 1  # -1: connection broke mid-reply
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                self.ledger.unknown_attempts += 1
            else:
                self.ledger.accepted.add(load_id)
                return
            await asyncio.sleep(delay * (0.5 + self._rng.random()))
            delay = min(delay * 2, 0.5)


async def wait_for_delivery(ledger: Ledger, received: Sequence[Any], timeout: float,
                            relay: KillableRelay | None = None) -> None:
    """Wait until every accepted message reached the smarthost (or time out; the verdict
    then names the lost ones)."""
    def all_arrived() -> bool:
        got = {m.group(1).decode() for r in received
               if (m := _ID.search(getattr(r, "data", b""))) is not None}
        if ledger.accepted <= got:
            return True
        if relay is not None and not relay.running():
            raise AssertionError(f"relayd died: {relay.returncode()}: {relay.log()[-3000:]}")
        return False
    with contextlib.suppress(WaitTimeout):
        await wait_until(all_arrived, timeout, "every accepted message at the smarthost", interval=0.05)


async def crash_cycles(relay: KillableRelay, point: str, cycles: int, *, hits: tuple[int, int] = (1, 12),
                       rng: random.Random | None = None, cycle_timeout: float = 20.0) -> list[int]:
    """Run ``cycles`` armed starts of ``relay``: each is killed by SIGKILL at ``point`` on a random
    hit; returns the exit codes (each must be -SIGKILL). The relay is left stopped."""
    rng = rng or random.Random(0)
    codes = []
    for _ in range(cycles):
        nth = rng.randint(*hits)
        await asyncio.to_thread(relay.start, 15.0, {"RELAYD_CRASH_AT": f"{point}@{nth}"})
        try:
            await wait_until(lambda: not relay.running(), cycle_timeout, f"{point}@{nth}", interval=0.01)
        except WaitTimeout:
            relay.kill9()
            raise AssertionError(f"{point}@{nth} was not reached in {cycle_timeout}s: "
                                 f"{relay.log()[-2000:]}") from None
        code = relay.returncode()
        assert code is not None
        codes.append(code)
    return codes


def spool_files(spool: Path) -> dict[str, list[str]]:
    """The file names per spool directory (for "nothing half-stored" checks)."""
    if not spool.exists():
        return {}
    return {sub.name: sorted(os.listdir(sub)) for sub in sorted(spool.iterdir()) if sub.is_dir()}
