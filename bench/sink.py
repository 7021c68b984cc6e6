"""A fast SMTP sink that counts delivered messages exactly (the benchmark's smarthost).

Postfix's ``smtp-sink`` reads message bodies a byte at a time (it tops out near 3,700 msgs/s
at 100 KB) and its ``-c`` counter under-counts, so the benchmark uses this instead: a plain
``asyncio.Protocol`` (uvloop when available) that reads DATA in whatever chunks the kernel
hands it and searches them for CRLF "." CRLF. A message is counted when its ``250`` is
written, so the count is exactly what a relay was told was delivered.

Besides SMTP (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT; PIPELINING offered) it answers
three private verbs on the same port, used by ``relay_bench.py``:

- ``XSTAT``  -> ``250 <messages> <bytes> <first monotonic> <last monotonic>``
- ``XLAT``   -> ``250 <n> <p50 ms> <p99 ms> <max ms>``: end-to-end latency of messages whose
  header carried ``X-Bench-T: <time.monotonic() at submission>`` (``--latency``); the
  monotonic clock is system-wide on Linux, so the load generator's stamp can be compared.
- ``XRESET`` -> ``250`` after zeroing the counters (after a warm-up round).

Run: ``python bench/sink.py [--host 127.0.0.1] [--port 0] [--latency]``; prints
``port <N>`` on stdout once listening and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from typing import cast

_END = b"\r\n.\r\n"
_STAMP = b"\r\nX-Bench-T: "


class Stats:
    """Counters shared by every session of one sink."""

    def __init__(self, latency: bool) -> None:
        self.latency = latency
        self.reset()

    def reset(self) -> None:
        self.messages = 0
        self.bytes = 0
        self.first = 0.0
        self.last = 0.0
        self.latencies: list[float] = []

    def counted(self, data: bytes | bytearray, end: int, now: float) -> None:
        if not self.messages:
            self.first = now
        self.messages += 1
        self.bytes += end
        self.last = now
        if self.latency:
            # Headers come first; only look at the first few KB.
            i = data.find(_STAMP, 0, min(end, 8192))
            if i >= 0:
                j = data.find(b"\r\n", i + len(_STAMP), i + 64)
                with contextlib.suppress(ValueError):
                    self.latencies.append(now - float(data[i + len(_STAMP):j]))

    def percentiles(self) -> tuple[int, float, float, float]:
        lat = sorted(self.latencies)
        if not lat:
            return 0, 0.0, 0.0, 0.0
        n = len(lat)
        return n, lat[n // 2] * 1000, lat[min(n - 1, int(n * 0.99))] * 1000, lat[-1] * 1000


class SinkProtocol(asyncio.Protocol):
    """One SMTP session: a byte buffer and two states (commands, data)."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.buf = bytearray()
        self.in_data = False
        self.scan = 0  # where the next search for the end of data may start
        self.closing = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(b"220 sink.bench ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out: list[bytes] = []
        while True:
            if self.in_data:
                # The DATA line's CRLF counts as the CRLF before the dot: an empty message.
                if self.scan == 0 and buf[:3] == b".\r\n":
                    end, skip = 0, 3
                elif self.scan == 0 and len(buf) < 3 and b".\r\n".startswith(bytes(buf)):
                    break  # maybe an empty message, split across reads
                else:
                    i = buf.find(_END, max(0, self.scan - 4))
                    if i < 0:
                        self.scan = len(buf)
                        break
                    end, skip = i + 2, i + 5
                self.stats.counted(buf, end, time.monotonic())
                del buf[:skip]
                self.in_data = False
                self.scan = 0
                out.append(b"250 2.0.0 Ok: counted\r\n")
                continue
            i = buf.find(b"\r\n")
            if i < 0:
                if len(buf) > 4096:
                    out.append(b"500 5.5.2 line too long\r\n")
                    buf.clear()
                break
            line = bytes(buf[:i])
            del buf[:i + 2]
            out.append(self.command(line))
            if self.closing:
                break
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
            if self.closing:
                self.transport.close()

    def command(self, line: bytes) -> bytes:
        verb = line[:4].upper()
        if verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
            return b"250 2.0.0 Ok\r\n"
        if verb == b"DATA":
            self.in_data = True
            self.scan = 0
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb == b"EHLO":
            return (b"250-sink.bench\r\n250-PIPELINING\r\n250-SIZE 0\r\n250-8BITMIME\r\n"
                    b"250 SMTPUTF8\r\n")
        if verb == b"HELO":
            return b"250 sink.bench\r\n"
        if verb == b"QUIT":
            self.closing = True
            return b"221 2.0.0 Bye\r\n"
        word = line.strip().upper()
        s = self.stats
        if word == b"XSTAT":
            return f"250 {s.messages} {s.bytes} {s.first:.6f} {s.last:.6f}\r\n".encode()
        if word == b"XLAT":
            n, p50, p99, mx = s.percentiles()
            return f"250 {n} {p50:.3f} {p99:.3f} {mx:.3f}\r\n".encode()
        if word == b"XRESET":
            s.reset()
            return b"250 2.0.0 reset\r\n"
        return b"502 5.5.2 command not implemented\r\n"


async def serve(host: str, port: int, latency: bool, ready: asyncio.Future[int] | None = None,
                stop: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats(latency)
    server = await loop.create_server(lambda: SinkProtocol(stats), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready.set_result(bound)
    else:
        print(f"port {bound}", flush=True)
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", action="store_true", help="record end-to-end latency (X-Bench-T)")
    a = p.parse_args(argv)
    try:
        import uvloop
        uvloop.run(serve(a.host, a.port, a.latency))
    except ImportError:
        asyncio.run(serve(a.host, a.port, a.latency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
