"""SMTP load generator: N concurrent sessions, each reused for many messages.

Each session connects once, says EHLO, then runs transactions back to back (MAIL, RCPT,
DATA, body, final dot; one command per round trip unless ``--pipelining``, as most
application mailers do) until the shared budget of messages (``--count``) or time
(``--duration``) is used up, then QUITs. With ``--rate R`` the messages are offered on a fixed
schedule (R per second in total, open loop): a message's latency then counts from its
scheduled time, so a relay that falls behind is charged for the queueing it causes
(no coordinated omission).

Acceptance latency is the time from the start of a transaction (sending MAIL, or the
scheduled time with ``--rate``) to the ``250`` after the final dot: what a submitting
application waits for. Each message carries ``X-Bench-T: <time.monotonic()>`` so a sink
started with ``--latency`` can measure end-to-end delivery latency as well.

Run: ``python bench/load.py --port 2525 --sessions 20 --size 1024 --count 10000``; prints one
JSON object (see ``Result``) on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import cast


@dataclass
class Result:
    sessions: int
    size: int
    offered_rate: float
    attempted: int
    accepted: int
    rejected: int
    errors: int
    start: float  # time.monotonic() when the first transaction began
    end: float  # time.monotonic() when the last reply arrived
    accept_rate: float  # accepted / (end - start)
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    first_rejection: str


def make_body(size: int) -> bytes:
    """A plain-text body of about ``size`` bytes: 76-character lines, a few starting with a
    dot (so dot-stuffing is exercised both ways), CRLF line ends."""
    line = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\r\n"
    dotted = b".A line that starts with a dot and must be dot-stuffed on the wire, twice ok.\r\n"
    out = bytearray()
    n = 0
    while len(out) < size:
        out += dotted if n % 50 == 25 else line
        n += 1
    return bytes(out[:max(0, size - 2)]).rstrip(b"\r") + b"\r\n" if size > 2 else b"\r\n"


def stuff(body: bytes) -> bytes:
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed[:1] == b"." else stuffed


class Budget:
    """Hands out message tickets (a scheduled time, or None when unpaced) to the sessions."""

    def __init__(self, count: int, duration: float, rate: float) -> None:
        self.count = count
        self.deadline = 0.0
        self.duration = duration
        self.rate = rate
        self.issued = 0
        self.t0 = 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()
        if self.duration:
            self.deadline = self.t0 + self.duration

    def take(self) -> float | bool | None:
        """False when exhausted; else the scheduled start (rate mode) or None."""
        if self.count and self.issued >= self.count:
            return False
        if self.deadline and time.monotonic() >= self.deadline:
            return False
        i = self.issued
        self.issued += 1
        if self.rate:
            return self.t0 + i / self.rate
        return None


class ClientProtocol(asyncio.Protocol):
    """Parses replies (multi-line aware) and resolves one future per expected reply."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiters: collections.deque[asyncio.Future[tuple[int, bytes]]] = collections.deque()
        self.early: collections.deque[tuple[int, bytes]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def expect(self) -> asyncio.Future[tuple[int, bytes]]:
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        if self.early:  # the reply came before anyone waited for it (e.g. the greeting)
            fut.set_result(self.early.popleft())
        elif self.transport is None or self.transport.is_closing():
            fut.set_exception(ConnectionError("connection lost"))
        else:
            self.waiters.append(fut)
        return fut

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            i = self.buf.find(b"\r\n")
            if i < 0:
                return
            line = bytes(self.buf[:i])
            del self.buf[:i + 2]
            if len(line) > 3 and line[3:4] == b"-":
                continue  # continuation of a multi-line reply
            reply = (int(line[:3]) if line[:3].isdigit() else 0, line)
            if self.waiters:
                self.waiters.popleft().set_result(reply)
            else:
                self.early.append(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError("connection lost"))
        if not self.lost.done():
            self.lost.set_result(None)


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.body = stuff(make_body(args.size))
        self.budget = Budget(args.count, args.duration, args.rate)
        self.latencies: list[float] = []
        self.trace: list[tuple[float, float]] = []  # (scheduled or start time, latency)
        self.accepted = self.rejected = self.errors = 0
        self.first_rejection = ""
        self.last_reply = 0.0
        self.seq = 0
        self.settled = 0  # sessions that are ready (or failed to become ready)
        self.all_settled = asyncio.Event()

    def settle(self) -> None:
        self.settled += 1
        if self.settled >= self.a.sessions:
            self.all_settled.set()

    def message(self) -> bytes:
        self.seq += 1
        head = (f"From: load@bench.example\r\nTo: sink@sink.example\r\n"
                f"Subject: bench message {self.seq}\r\nMessage-ID: <{self.seq}.{id(self)}@bench>\r\n"
                f"X-Bench-T: {time.monotonic():.6f}\r\n\r\n").encode()
        return head + self.body + b".\r\n"

    async def session(self, opened: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        a = self.a
        try:
            _, proto = await loop.create_connection(ClientProtocol, a.host, a.port)
        except OSError as exc:
            self.errors += 1
            self.first_rejection = self.first_rejection or f"connect: {exc}"
            self.settle()
            return
        assert proto.transport is not None
        tr = proto.transport
        ready = False
        try:
            code, line = await proto.expect()
            if code != 220:
                raise ConnectionError(line.decode(errors="replace"))
            tr.write(b"EHLO load.bench\r\n")
            code, line = await proto.expect()
            if code != 250:
                raise ConnectionError(line.decode(errors="replace"))
            ready = True
            self.settle()
            await opened.wait()
            while True:
                ticket = self.budget.take()
                if ticket is False:
                    break
                if isinstance(ticket, float):
                    delay = ticket - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    t0 = ticket
                else:
                    t0 = time.monotonic()
                ok, line = await self.transaction(proto, tr)
                now = time.monotonic()
                self.last_reply = now
                if ok:
                    self.accepted += 1
                    self.latencies.append(now - t0)
                    self.trace.append((t0, now - t0))
                else:
                    self.rejected += 1
                    self.first_rejection = self.first_rejection or line.decode(errors="replace")
                    tr.write(b"RSET\r\n")
                    await proto.expect()
            tr.write(b"QUIT\r\n")
            await asyncio.wait_for(proto.expect(), 5)
        except (ConnectionError, OSError, TimeoutError) as exc:
            self.errors += 1
            self.first_rejection = self.first_rejection or f"session: {exc}"
        finally:
            if not ready:
                self.settle()
            tr.close()

    async def transaction(self, proto: ClientProtocol, tr: asyncio.Transport) -> tuple[bool, bytes]:
        mail = b"MAIL FROM:<load@bench.example>\r\n"
        rcpt = b"RCPT TO:<sink@sink.example>\r\n"
        if self.a.pipelining:
            tr.write(mail + rcpt + b"DATA\r\n")
            replies = [proto.expect(), proto.expect(), proto.expect()]
            r = [await f for f in replies]
            for (code, line), want in zip(r, (250, 250, 354), strict=True):
                if code != want:
                    return False, line
        else:
            for cmd, want in ((mail, 250), (rcpt, 250), (b"DATA\r\n", 354)):
                tr.write(cmd)
                code, line = await proto.expect()
                if code != want:
                    return False, line
        tr.write(self.message())
        code, line = await proto.expect()
        return code == 250, line

    async def run(self) -> Result:
        opened = asyncio.Event()
        tasks = [asyncio.create_task(self.session(opened)) for _ in range(self.a.sessions)]
        # Sessions connect and greet first; the clock starts when every one is ready.
        await asyncio.wait_for(self.all_settled.wait(), 30)
        self.budget.start()
        opened.set()
        await asyncio.gather(*tasks)
        if self.a.trace:
            write_trace(self.a.trace, self.budget.t0, self.trace)
        lat = sorted(self.latencies)
        n = len(lat)

        def pct(q: float) -> float:
            return lat[min(n - 1, int(n * q))] * 1000 if n else 0.0

        start = self.budget.t0
        end = self.last_reply or start
        return Result(sessions=self.a.sessions, size=self.a.size, offered_rate=self.a.rate,
                      attempted=self.budget.issued, accepted=self.accepted, rejected=self.rejected,
                      errors=self.errors, start=start, end=end,
                      accept_rate=self.accepted / (end - start) if end > start else 0.0,
                      p50_ms=pct(0.5), p90_ms=pct(0.9), p99_ms=pct(0.99),
                      max_ms=lat[-1] * 1000 if n else 0.0, first_rejection=self.first_rejection)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=1024, help="body bytes per message")
    p.add_argument("--count", type=int, default=0, help="messages in total (0: no limit)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds (0: no limit)")
    p.add_argument("--rate", type=float, default=0.0, help="offered msgs/s, open loop (0: as fast as accepted)")
    p.add_argument("--pipelining", action="store_true", help="send MAIL, RCPT, DATA in one write")
    p.add_argument("--trace", help="write each accepted message's start (s from the first) and "
                                   "acceptance latency (ms) to this file, one per line")
    a = p.parse_args(argv)
    if not a.count and not a.duration:
        p.error("give --count or --duration")
    return a


def write_trace(path: str, t0: float, rows: list[tuple[float, float]]) -> None:
    """``<seconds since t0> <latency ms>`` per message, in the order the replies came."""
    with open(path, "w", encoding="ascii") as f:
        f.writelines(f"{t - t0:.6f} {lat * 1000:.3f}\n" for t, lat in rows)


async def run_load(args: argparse.Namespace) -> Result:
    return await Load(args).run()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        import uvloop
        result = uvloop.run(run_load(a))
    except ImportError:
        result = asyncio.run(run_load(a))
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
