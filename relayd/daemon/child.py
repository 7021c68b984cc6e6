"""The delivery process as the accepting process sees it: started, fed, reloaded, restarted
and stopped. ``relayd run`` on a machine with two or more CPUs is two processes.

One Python process has one event loop and one GIL, so acceptance (the listener, the policy,
the spool write) and delivery (the queue manager and the smarthost connections) took turns
on one core. Postfix spreads the same work over smtpd, cleanup, qmgr and smtp processes.
relayd now runs the queue manager in a child process with its own loop and GIL:

- the accepting process (the one systemd starts, holding the spool lock) writes the queue ID
  of every message it stored to the *notify* pipe, one line ``ID P`` each (``P`` is 1 for
  priority mail); the delivery process schedules it at once. The pipe is only a shortcut:
  the delivery process also finds queued mail by its periodic rescan of ``queued/``;
- the delivery process sends what ``/metrics`` shows about deliveries back on the *events*
  pipe, one JSON array ``[method, args...]`` per line, which the accepting process applies to
  its ``Metrics`` (an allow-list of recording methods; nothing else is called);
- the delivery process owns the alerts, the OAuth token sources and the delivery gate;
- the delivery process never reads the config file: the first line on the notify pipe, and
  one after every reload the accepting process accepted, is ``config <base64 YAML>`` with
  the exact text the accepting process validated. A file refused on SIGHUP therefore reaches
  neither process, and a delivery process started again later runs the accepted settings,
  not whatever the file holds by then (SPEC: "an invalid config on reload is refused and
  the old one kept");
- SIGTERM: the accepting process closes the listener, then stops the delivery process, which
  lets in-flight deliveries finish or return to the queue, as before;
- the delivery process exits at once when the notify pipe closes (the accepting process was
  killed): a new ``relayd run`` must not find an old delivery process still at work;
- a delivery process that dies is started again (after one second), once its claimed
  messages are back in ``queued/``.

``RELAYD_SINGLE_PROCESS=1`` in the environment keeps everything in one process (``=0`` asks
for two even on one CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from relayd.config.schema import Config
from relayd.control.metrics import Recorder
from relayd.daemon.pipe import (
    FORWARDED,
    Batcher,
    DeliverArgs,
    child_argv,
    config_line,
    read_lines,
    spool_line,
    write_pipe,
)
from relayd.model import Status
from relayd.spool.health import SpoolHealth
from relayd.spool.store import Spool

log = logging.getLogger("relayd")

SINGLE_PROCESS_ENV = "RELAYD_SINGLE_PROCESS"
PARENT_ENV = "RELAYD_DELIVERY_PARENT"
RESTART_DELAY = 1.0


def split_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Two processes when the machine has a second CPU; ``RELAYD_SINGLE_PROCESS=1`` forces
    one, ``=0`` forces two (on one CPU they only take turns, but it works the same)."""
    env = os.environ if environ is None else environ
    value = env.get(SINGLE_PROCESS_ENV, "").strip().lower()
    if value in ("1", "yes", "true"):
        return False
    if value in ("0", "no", "false"):
        return True
    return (os.cpu_count() or 1) >= 2


class DeliveryProcess:
    """The accepting process's handle on the delivery process: starts, feeds, reloads,
    restarts and stops it."""

    def __init__(self, config_path: Path, config_text: str, spool: Spool, metrics: Recorder) -> None:
        self._config_path = config_path
        self._config_text = config_text
        self._spool = spool
        self._metrics = metrics
        self._proc: asyncio.subprocess.Process | None = None
        self._notify: Batcher | None = None
        self._spool_failure: SpoolHealth | None = None  # the outage a new child must hear of
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self.started = asyncio.Event()

    async def start(self) -> None:
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="delivery-process")

    async def _spawn(self) -> None:
        notify_r, notify_w = os.pipe()
        events_r, events_w = os.pipe()
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relayd",
                *child_argv(DeliverArgs(self._config_path, notify_r, events_w)),
                pass_fds=(notify_r, events_w), env=env, stdin=asyncio.subprocess.DEVNULL)
        finally:
            os.close(notify_r)
            os.close(events_w)
        self._notify = Batcher(await write_pipe(notify_w))
        self._notify.write(config_line(self._config_text))
        if self._spool_failure is not None:  # a restarted child resolves the ongoing outage
            self._notify.write(spool_line(self._spool_failure))
        await read_lines(events_r, self._on_event, lambda: None)
        log.info("delivery process started (pid %d)", self._proc.pid)
        self.started.set()

    def _on_event(self, line: bytes) -> None:
        try:
            name, args, kwargs = json.loads(line)
            if name not in FORWARDED:
                return
            if name == "delivery":
                args[1] = Status(args[1])
            getattr(self._metrics, name)(*args, **kwargs)
        except (ValueError, TypeError, KeyError, IndexError):
            log.warning("ignored a malformed event from the delivery process")

    # -- the Delivery protocol of relayd/daemon/app.py ---------------------------------------
    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        return ()  # a crashed delivery process is started again, not a reason to stop

    def enqueue(self, queue_id: str, priority: bool) -> None:
        """A new message is in ``queued/``: deliver it now (best effort; see the module doc)."""
        if self._notify is not None:
            self._notify.write(f"{queue_id} {int(priority)}\n".encode())

    def reload(self, new: Config) -> None:
        """Hand the delivery process a config the accepting process accepted (and keep it
        for a restart of the delivery process)."""
        self._config_text = new.text
        if self._notify is not None:
            self._notify.write(config_line(new.text))

    def housekeeping(self, oldest_age: float) -> None:
        """The delivery process keeps its own alerts and gauges."""

    def spool_health(self, health: SpoolHealth) -> None:
        """A store failed or succeeded again: the delivery process's alerts hear of it."""
        self._spool_failure = None if health.writable else health
        if self._notify is not None:
            self._notify.write(spool_line(health))

    async def _supervise(self) -> None:
        while True:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            log.error("the delivery process exited unexpectedly (status %s); starting it again "
                      "in %.0fs", code, RESTART_DELAY)
            if self._notify is not None:
                self._notify.close()
                self._notify = None
            await asyncio.sleep(RESTART_DELAY)
            if self._stopping:
                return
            # Messages it had claimed go back to queued/ (only it claims, and it is gone).
            loop = asyncio.get_running_loop()
            with contextlib.suppress(OSError):
                await loop.run_in_executor(None, self._spool.recover_active)
            await self._spawn()

    async def stop(self, grace: float = 60.0) -> None:
        """SIGTERM, then wait: in-flight deliveries finish or go back to the queue."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                log.error("the delivery process did not stop within %.0fs; killing it", grace)
                proc.kill()
                await proc.wait()
        if self._notify is not None:
            self._notify.close()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
