"""The protocol between the two processes of ``relayd run``: the child's command line and
its two pipes.

- *notify*, accepting to delivery process: first ``config <base64 YAML>``, the exact text
  the accepting process validated (the delivery process never reads the config file), then
  one line ``ID P`` per stored message (``P`` is 1 for priority mail), a new ``config``
  line after every reload the accepting process accepted, and ``spool W <base64 path>
  <base64 reason>`` when a store failed (``W`` 0) or succeeded again after a failure
  (``W`` 1), for the ``spool_unwritable`` alert (relayd/spool/health.py);
- *events*, delivery to accepting process: one JSON array ``[method, args, kwargs]`` per
  line, a recording that ``/metrics`` shows, applied by the accepting process to its
  ``Metrics`` (an allow-list of methods, ``FORWARDED``; nothing else is called).

Lines are written once per event-loop iteration, not once per line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayd.control.metrics import Recorder
from relayd.model import Status
from relayd.spool.health import SpoolHealth

CONFIG_LINE = b"config "  # notify-pipe line carrying the accepted config text (base64)
SPOOL_LINE = b"spool "  # notify-pipe line: whether the last store succeeded (SpoolHealth)
# The Recorder methods the delivery process may call in the accepting process.
FORWARDED = frozenset({"delivery", "suppressed", "set_smarthost", "set_token_expiry",
                       "set_daily_cap_remaining", "set_shared_state_up"})


@dataclass(frozen=True)
class DeliverArgs:
    """What the accepting process passes its child: the config file and the two pipes."""

    config: Path
    notify_fd: int
    events_fd: int


def child_argv(args: DeliverArgs) -> list[str]:
    """The delivery process's arguments after ``python -m relayd`` (``ps`` shows them)."""
    return ["-c", str(args.config), "_deliver", "--notify-fd", str(args.notify_fd),
            "--events-fd", str(args.events_fd)]


def from_argv(argv: Sequence[str]) -> DeliverArgs | None:
    """``child_argv``'s output read back, else None (the CLI parses any other spelling).
    relayd/__main__.py uses it so the child never loads argparse and the CLI's parser."""
    if len(argv) != 7 or [argv[0], argv[2], argv[3], argv[5]] != [
            "-c", "_deliver", "--notify-fd", "--events-fd"]:
        return None
    try:
        return DeliverArgs(Path(argv[1]), int(argv[4]), int(argv[6]))
    except ValueError:
        return None


def config_line(text: str) -> bytes:
    """The notify-pipe line that hands the delivery process its config text."""
    return CONFIG_LINE + base64.b64encode(text.encode("utf-8")) + b"\n"


def parse_config_line(line: bytes) -> str | None:
    """The text of a ``config_line``, else None (a queue ID line, or damage)."""
    if not line.startswith(CONFIG_LINE):
        return None
    try:
        return base64.b64decode(line[len(CONFIG_LINE):], validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def spool_line(health: SpoolHealth) -> bytes:
    """The notify-pipe line that hands the delivery process a ``SpoolHealth``."""
    path = base64.b64encode(health.path.encode("utf-8", "surrogateescape"))
    error = base64.b64encode(health.error.encode("utf-8", "replace"))
    return b"%s%d %s %s\n" % (SPOOL_LINE, int(health.writable), path, error)


def parse_spool_line(line: bytes) -> SpoolHealth | None:
    """The record of a ``spool_line``, else None (another line, or damage)."""
    if not line.startswith(SPOOL_LINE):
        return None
    fields = line[len(SPOOL_LINE):].split(b" ")
    if len(fields) != 3 or fields[0] not in (b"0", b"1"):
        return None
    try:
        path, error = [base64.b64decode(f, validate=True).decode("utf-8", "replace")
                       for f in fields[1:]]
    except binascii.Error:
        return None
    return SpoolHealth(fields[0] == b"1", path, error)


def read_first_line(fd: int) -> tuple[bytes, bytes]:
    """Blocking, before the event loop runs: the first line on ``fd`` (without its newline)
    and whatever was read after it, for the line reader. (b"", b"") at end of file."""
    buf = b""
    while b"\n" not in buf:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"", b""
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    return line, rest


class _Lines(asyncio.Protocol):
    """Reads newline-terminated lines from a pipe."""

    def __init__(self, on_line: Callable[[bytes], None], on_eof: Callable[[], None],
                 initial: bytes = b"") -> None:
        self._on_line = on_line
        self._on_eof = on_eof
        self._buf = initial

    def data_received(self, data: bytes) -> None:
        lines = (self._buf + data).split(b"\n")
        self._buf = lines.pop()
        for line in lines:
            self._on_line(line)

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_eof()


class Batcher:
    """Lines written to a pipe once per event-loop iteration, not once per line."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []

    def write(self, line: bytes) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(line)

    def _flush(self) -> None:
        data, self._pending = b"".join(self._pending), []
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()


async def write_pipe(fd: int) -> asyncio.WriteTransport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(fd, "wb", buffering=0))
    return transport


async def read_lines(fd: int, on_line: Callable[[bytes], None], on_eof: Callable[[], None],
                     initial: bytes = b"") -> None:
    """Call ``on_line`` for each line on ``fd``; ``initial`` is data read from it already."""
    loop = asyncio.get_running_loop()
    protocol = _Lines(on_line, on_eof, initial)
    await loop.connect_read_pipe(lambda: protocol, os.fdopen(fd, "rb", buffering=0))
    if initial:
        protocol.data_received(b"")  # lines that arrived with the config line


class EventMetrics(Recorder):
    """The delivery process's recorder: the forwarded recordings go to the accepting process;
    the rest are dropped (nothing in the delivery process serves /metrics)."""

    def __init__(self, events: Batcher) -> None:
        self._events = events

    def _send(self, name: str, *args: Any, **kwargs: Any) -> None:
        self._events.write(json.dumps([name, args, kwargs]).encode() + b"\n")

    def delivery(self, smarthost: str, status: Status, seconds: float | None = None, *,
                 route: str | None = None) -> None:
        if route is None:
            self._send("delivery", smarthost, status.value, seconds)
        else:
            self._send("delivery", smarthost, status.value, seconds, route=route)

    def suppressed(self, count: int = 1) -> None:
        self._send("suppressed", count)

    def set_smarthost(self, name: str, *, up: bool, paused: bool) -> None:
        self._send("set_smarthost", name, up=up, paused=paused)

    def set_token_expiry(self, smarthost: str, seconds: float) -> None:
        self._send("set_token_expiry", smarthost, seconds)

    def set_daily_cap_remaining(self, remaining: int | None) -> None:
        self._send("set_daily_cap_remaining", remaining)

    def set_shared_state_up(self, up: bool) -> None:
        self._send("set_shared_state_up", up)


async def open_events(fd: int) -> Batcher:
    return Batcher(await write_pipe(fd))
