"""Daemon assembly: builds the components from a Config, runs them, reloads and stops them.

``Daemon.serve()`` follows Hypercorn's order: recover the spool, bind the listener, report
ready, then run the queue manager and the side servers; on stop it closes the listener, gives
open sessions a grace period, and lets in-flight deliveries finish or return to the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from relayd import faults
from relayd.alerts import Alerts
from relayd.config import Config, Smarthost
from relayd.errors import SpoolError
from relayd.listener import Listener, ListenerSettings
from relayd.metrics import Metrics
from relayd.metrics_http import MetricsServer
from relayd.model import Envelope, Message, Reply, State
from relayd.qmgr import Pool, QueueManager
from relayd.spool import Spool

log = logging.getLogger("relayd")


class Intake:
    """The listener's Acceptor: policy at acceptance, then the durable spool, then the
    queue manager. Answers 250 only after ``Spool.put`` returned (RFC 5321 §6.1)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def check_recipient(self, rcpt: str) -> Reply | None:
        return None

    async def accept(self, queue_id: str, envelope: Envelope, content: bytes) -> Reply:
        d = self.daemon
        message = Message(envelope, content)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(d.executor, d.spool.put, message, queue_id)
        except SpoolError as exc:
            log.error("%s: not accepted, the spool failed: %s", queue_id, exc)
            return Reply(451, "4.3.0 Temporary local problem storing the message, try again later")
        faults.crash_point("before-250")
        log.info("%s: client=[%s], helo=<%s>, from=<%s>, size=%d, nrcpt=%d", queue_id,
                 envelope.client, envelope.helo, envelope.mail_from, len(content),
                 len(envelope.rcpt_tos))
        if d.metrics:
            d.metrics.message_received()
        d.qmgr.enqueue(queue_id, priority=envelope.priority)
        return Reply(250, f"2.0.0 Ok: queued as {queue_id}")


HOUSEKEEPING_INTERVAL = 5.0


@dataclass
class Hooks:
    """Callbacks the caller of ``serve`` may set (sd_notify, tests)."""

    on_ready: Callable[[list[tuple[str, int]]], object] | None = None
    on_reloading: Callable[[], object] | None = None
    on_reloaded: Callable[[], object] | None = None
    on_status: Callable[[str], object] | None = None


def default_pool_factory(config_ref: Callable[[], Config]) -> Callable[[Smarthost], Pool]:
    """Builds forwarder pools; the OAuth token source is created per smarthost."""

    def factory(sh: Smarthost) -> Pool:
        from relayd.forwarder import SmarthostPool  # the forwarder pulls in aiosmtplib

        cfg = config_ref()
        token_source = None
        if sh.auth.oauth is not None:
            from relayd.oauth import build_token_source

            token_source = build_token_source(sh, state_dir=cfg.state_dir,
                                              key_file=cfg.secrets.key_file)
        pool: Pool = SmarthostPool(sh, hostname=cfg.hostname, token_source=token_source,
                                   transcripts=cfg.logging.smtp_transcripts)
        return pool

    return factory


class Daemon:
    """One running relayd."""

    def __init__(self, config: Config, *, pool_factory: Callable[[Smarthost], Pool] | None = None,
                 clock: Callable[[], float] = time.time, sockets: Sequence[Any] | None = None) -> None:
        self.config = config
        self.clock = clock
        self.executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="relayd-io")
        self.spool = Spool(config.spool.path)
        self.metrics = Metrics()
        self.metrics.declare_smarthosts(s.name for s in config.smarthosts)
        self.alerts = Alerts(config.alerts, hostname=config.hostname, send_email=self.send_alert_email,
                             clock=clock)
        self.intake = Intake(self)
        self.listener = Listener(ListenerSettings.from_config(config), self.intake)
        self.qmgr = QueueManager(self.spool, config.spool, config.smarthosts,
                                 pool_factory or default_pool_factory(lambda: self.config),
                                 executor=self.executor, clock=clock, metrics=self.metrics,
                                 alerts=self.alerts)
        self.metrics_server = (MetricsServer(config.metrics.listen, self.metrics.render)
                               if config.metrics.listen is not None else None)
        self._sockets = list(sockets or [])
        self._stop = asyncio.Event()
        self.hooks = Hooks()

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def stop(self) -> None:
        """Begin a clean shutdown (SIGTERM)."""
        self._stop.set()

    async def serve(self) -> None:
        """Run until ``stop()``; raises SpoolError when another relayd holds the spool."""
        await self._io(self.spool.lock)
        tasks: list[asyncio.Task[None]] = []
        try:
            recovered = await self._io(self.spool.recover)
            if recovered:
                log.warning("recovered %d message(s) that were being delivered when relayd stopped",
                            len(recovered))
            addresses = await self.listener.start(self._sockets or None)
            log.info("relayd listening on %s", ", ".join(_fmt(a) for a in addresses))
            if self.metrics_server is not None:
                await self.metrics_server.start()
                log.info("metrics at http://%s/metrics", self.metrics_server.address)
            qmgr_task = asyncio.create_task(self.qmgr.run(), name="qmgr")
            tasks = [qmgr_task, asyncio.create_task(self.alerts.run(), name="alerts"),
                     asyncio.create_task(self._housekeeping(), name="housekeeping")]
            if self.hooks.on_ready:
                self.hooks.on_ready(addresses)
            stop_wait = asyncio.create_task(self._stop.wait())
            try:
                await asyncio.wait({*tasks, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_wait.cancel()
            for t in tasks:
                if t.done():
                    t.result()  # propagate a crash of a component
            log.info("relayd stopping")
            await self.listener.aclose(grace=5.0)
            self.qmgr.stop()
            await qmgr_task
            await self.alerts.close(grace=2.0)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.listener.stop_accepting()
            if self.metrics_server is not None:
                await self.metrics_server.close()
            self.spool.close()
            self.executor.shutdown(wait=False)
        log.info("relayd stopped")

    async def _housekeeping(self) -> None:
        """Queue gauges, the queue_age alert and the systemd STATUS= line, every few seconds."""
        while True:
            counts, oldest = await self._io(self._queue_snapshot)
            age = max(0.0, self.clock() - oldest) if oldest is not None else 0.0
            self.metrics.set_queue(counts, age)
            self.alerts.check_queue_age(age)
            if self.hooks.on_status:
                self.hooks.on_status(f"{counts.get(State.QUEUED, 0)} queued, "
                                     f"{counts.get(State.ACTIVE, 0)} in delivery, "
                                     f"{counts.get(State.FAILED, 0)} failed")
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)

    def _queue_snapshot(self) -> tuple[dict[State, int], float | None]:
        counts = self.spool.counts()
        queued = self.spool.ids(State.QUEUED) + self.spool.ids(State.ACTIVE)
        # Queue IDs start with the acceptance time in microseconds (hex), so the smallest ID
        # is the oldest message: no file needs to be opened.
        oldest = min((int(q[:13], 16) / 1_000_000 for q in queued), default=None)
        return counts, oldest

    async def send_alert_email(self, content: bytes, to: str) -> None:
        """Alert mail goes straight through the smarthosts (no spool, cap or suppression):
        the operator must hear about an outage even when the queue is what is stuck."""
        sender = self.config.sender.envelope_from or f"relayd@{self.config.hostname}"
        last = ""
        for sh in self.config.smarthosts:
            result = await self.qmgr.pool_for(sh).deliver("alert", content, sender, [to])
            if result.delivered:
                return
            last = result.error or (str(result.outcomes[0].reply) if result.outcomes else "")
        raise OSError(f"no smarthost accepted the alert mail: {last}")

    def reload(self, new: Config) -> None:
        """Apply a validated config: smarthosts and retry settings for every later attempt."""
        if self.hooks.on_reloading:
            self.hooks.on_reloading()
        old = self.config
        self.config = new
        self.qmgr.update_smarthosts(new.smarthosts, new.spool)
        if new.listen != old.listen or new.spool.path != old.spool.path:
            log.warning("listen and spool.path changes need a restart; other settings are applied")
        self.listener.handler.settings = ListenerSettings.from_config(new)
        log.info("configuration reloaded")
        if self.hooks.on_reloaded:
            self.hooks.on_reloaded()


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
