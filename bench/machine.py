"""The machine's state around one benchmark run, so that a slow round can be told apart from
a slow relay.

Two kinds of figures, both recorded in each measurement's JSON (``extra["machine"]``):

- a probe taken just before the relay starts, with nothing else of the benchmark running:
  the fastest of three runs of a fixed pure-Python loop (the CPU's speed as one thread sees
  it; relayd's per-message work is mostly the interpreter's) and the
  latency of small-file fsyncs in the run's work directory (what the spool's durability
  waits for, on the same file system);
- the kernel's pressure stall information over the load itself (``/proc/pressure``, Linux
  4.20+): the share of the wall time in which at least one task waited for a CPU
  (``cpu_some_pct``) or for I/O (``io_some_pct``). Both relays are measured the same way, so
  a round whose relay CPU per message is 15 % higher and whose probe is slower says the
  machine was slower then, not the code.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PROBE_LOOP = 1_500_000
PROBE_REPEAT = 3  # the fastest of three: the CPU's speed, not one preemption's
PROBE_FILES = 60


def _stall_total_us(resource: str) -> int | None:
    """The ``some`` total of /proc/pressure/<resource> in microseconds (None without PSI)."""
    try:
        with open(f"/proc/pressure/{resource}", encoding="ascii") as f:
            for line in f:
                if line.startswith("some "):
                    return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class Pressure:
    """PSI ``some`` shares over the time between ``start()`` and ``stop()``."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self._start: dict[str, int | None] = {}

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._start = {r: _stall_total_us(r) for r in ("cpu", "io")}

    def stop(self) -> dict[str, float]:
        wall_us = (time.monotonic() - self._t0) * 1e6
        out: dict[str, float] = {}
        for resource, before in self._start.items():
            after = _stall_total_us(resource)
            if before is not None and after is not None and wall_us > 0:
                out[f"{resource}_some_pct"] = round(100 * (after - before) / wall_us, 1)
        return out


def _loop_ms() -> float:
    t = time.perf_counter()
    total = 0
    for i in range(PROBE_LOOP):
        total += i
    return (time.perf_counter() - t) * 1000


def probe(directory: Path) -> dict[str, float]:
    """CPU loop time and fsync latency of ``PROBE_FILES`` 1 KB files in ``directory``."""
    cpu_ms = min(_loop_ms() for _ in range(PROBE_REPEAT))
    where = directory / "fsync-probe"
    where.mkdir(parents=True, exist_ok=True)
    latencies = []
    for i in range(PROBE_FILES):
        fd = os.open(where / f"{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"x" * 1024)
            t = time.perf_counter()
            os.fsync(fd)
            latencies.append((time.perf_counter() - t) * 1000)
        finally:
            os.close(fd)
    for i in range(PROBE_FILES):
        os.unlink(where / f"{i}")
    where.rmdir()
    latencies.sort()
    return {"cpu_probe_ms": round(cpu_ms, 1),
            "fsync_p50_ms": round(latencies[len(latencies) // 2], 2),
            "fsync_max_ms": round(latencies[-1], 2)}
