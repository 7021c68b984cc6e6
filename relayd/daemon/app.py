"""Daemon assembly: builds the components from a Config, runs them, reloads and stops them.

``Daemon.serve()`` follows Hypercorn's order: recover the spool, bind the listener, report
ready, then run the queue manager and the side servers; on stop it closes the listener, gives
open sessions a grace period, and lets in-flight deliveries finish or return to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relayd import faults
from relayd.config.schema import Config, Smarthost
from relayd.control.metrics import Metrics, Recorder
from relayd.daemon.split import DeliveryProcess
from relayd.delivery import logline
from relayd.errors import SpoolError, UnknownMessage
from relayd.model import Envelope, Message, Reply, State, Status
from relayd.policy.pipeline import log_summary
from relayd.policy.runtime import Accepted, SendingPolicy, read_dkim_keys
from relayd.spool.hops import Batches, Err, Ok, Outcome
from relayd.spool.records import new_queue_id
from relayd.spool.store import Spool

# Each half of ``relayd run`` imports only what it runs (the listener side never loads
# aiosmtplib, the queue manager or the alerts; the delivery side never loads aiosmtpd or the
# HTTP servers): a process's memory is mostly its imported modules.
if TYPE_CHECKING:
    from relayd.control.alerts import Alerts
    from relayd.control.metrics_http import MetricsServer
    from relayd.control.unsubscribe_http import UnsubscribeServer
    from relayd.delivery.qmgr import Pool, QueueManager
    from relayd.oauth.source import TokenStatistics
    from relayd.smtpd.listener import Listener

log = logging.getLogger("relayd")

# One message whose DATA has ended: (queue ID, envelope, content, time of acceptance).
_Arrival = tuple[str, Envelope, bytes, float]


class Intake:
    """The listener's Acceptor: the sending policy at acceptance, then the durable spool, then
    the queue manager. Answers 250 only after every copy is on disk (RFC 5321 §6.1)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        # Messages whose DATA ended while the previous ones were being stored go to the spool
        # together, with one flush for all of them (relayd/spool/write.py).
        self._stores: Batches[_Arrival] = Batches(self._store_batch, daemon.executor)

    def check_recipient(self, mail_from: str, rcpt: str) -> Reply | None:
        return self.daemon.sending.check_recipient(mail_from, rcpt, self.daemon.clock())

    def _store_batch(self, batch: list[_Arrival]) -> list[Outcome]:
        """Worker thread: the policy (CPU) for each message, then the spool writes of all
        of them, one hop off the loop. Per message: Ok((Accepted, [(ID, stored copy)]))
        or Err(the error)."""
        d = self.daemon
        decisions: list[Accepted | Exception] = []
        items: list[tuple[Message, str]] = []
        owners: list[int] = []  # which message of the batch each spool item is a copy of
        for k, (queue_id, envelope, content, now) in enumerate(batch):
            try:
                accepted = d.sending.accept(Message(envelope, content), now)
            except Exception as exc:  # handed to that message's session, as before batching
                decisions.append(exc)
                continue
            decisions.append(accepted)
            for i, message in enumerate(accepted.outputs):
                items.append((message, queue_id if i == 0 else new_queue_id(now)))
                owners.append(k)
        results = d.spool.put_batch(items) if items else []
        stored: list[list[tuple[str, Message]]] = [[] for _ in batch]
        errors: dict[int, SpoolError] = {}
        for (message, _qid), k, result in zip(items, owners, results, strict=True):
            if isinstance(result, SpoolError):
                errors.setdefault(k, result)
            else:
                stored[k].append((result, message))
        out: list[Outcome] = []
        for k, decision in enumerate(decisions):
            if isinstance(decision, Exception):
                out.append(Err(decision))
            elif k in errors:
                # All or nothing: the client will retry the whole message after our 451.
                for qid, _ in stored[k]:
                    with contextlib.suppress(SpoolError, UnknownMessage):
                        d.spool.delete(qid)
                out.append(Err(errors[k]))
            else:
                out.append(Ok((decision, stored[k])))
        return out

    async def accept(self, queue_id: str, envelope: Envelope, content: bytes) -> Reply:
        d = self.daemon
        now = d.clock()
        try:
            accepted, stored = await self._stores.submit((queue_id, envelope, content, now))
        except SpoolError as exc:
            log.error("%s: not accepted, the spool failed: %s", queue_id, exc)
            return Reply(451, "4.3.0 Temporary local problem storing the message, try again later")
        faults.crash_point("before-250")
        log.info("%s: client=[%s], helo=<%s>, from=<%s>, size=%d, nrcpt=%d, %s", queue_id,
                 envelope.client, envelope.helo, envelope.mail_from, len(content),
                 len(envelope.rcpt_tos), log_summary(accepted.result))
        if len(stored) > 1:
            log.info("%s: one copy per recipient (personal unsubscribe token): %s", queue_id,
                     ", ".join(q for q, _ in stored))
        for rcpt in accepted.suppressed:
            log.info("%s", logline.delivery_line(queue_id, rcpt, "none", 0.0, 0, "2.0.0",
                                                 Status.SUPPRESSED, "on the do-not-email list"))
            d.metrics.suppressed()
        d.metrics.message_received()
        for qid, message in stored:
            d.enqueue(qid, message.envelope.priority)
        return Reply(250, f"2.0.0 Ok: queued as {queue_id}")


HOUSEKEEPING_INTERVAL = 5.0


@dataclass
class Hooks:
    """Callbacks the caller of ``serve`` may set (sd_notify, tests)."""

    on_ready: Callable[[list[tuple[str, int]]], object] | None = None
    on_reloading: Callable[[], object] | None = None
    on_reloaded: Callable[[], object] | None = None
    on_status: Callable[[str], object] | None = None


class Role(enum.Enum):
    """What this process does (relayd/daemon/split.py): everything, or one half of ``relayd run``."""

    ALL = "all"
    ACCEPT = "accept"  # listener, spool writes, /metrics, unsubscribe page; runs DELIVER
    DELIVER = "deliver"  # queue manager, smarthost connections, alerts


class Daemon:
    """One running relayd (or one of its two processes, see ``Role``)."""

    def __init__(self, config: Config, *, pool_factory: Callable[[Smarthost], Pool] | None = None,
                 clock: Callable[[], float] = time.time, sockets: Sequence[Any] | None = None,
                 housekeeping_interval: float = HOUSEKEEPING_INTERVAL,
                 cap_window: float = 86400.0, role: Role = Role.ALL,
                 config_path: Path | None = None, metrics: Recorder | None = None) -> None:
        self.config = config
        self.clock = clock
        self.role = role
        self.executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="relayd-io")
        # In the accepting process nothing is delivered, so nothing just stored is read back.
        self.spool = Spool(config.spool.path, keep_recent=role is not Role.ACCEPT)
        # prometheus_client costs the process about 2 MB; nothing can read the registry unless
        # /metrics is served, so without metrics.listen the recordings go nowhere.
        if metrics is None:
            metrics = Metrics() if config.metrics.listen is not None else Recorder()
        self.metrics: Recorder = metrics
        self.metrics.declare_smarthosts(s.name for s in config.smarthosts)
        self.delivery_process = (DeliveryProcess(config_path, config.text, self.spool, self.metrics)
                                 if role is Role.ACCEPT and config_path is not None else None)
        self.sending = SendingPolicy(config, dkim_keys=read_dkim_keys(config), cap_window=cap_window)
        self.intake = Intake(self)
        self._alerts: Alerts | None = None
        self._qmgr: QueueManager | None = None
        self._listener: Listener | None = None
        self.unsubscribe_server: UnsubscribeServer | None = None
        self.metrics_server: MetricsServer | None = None
        if role is not Role.ACCEPT:
            from relayd.control.alerts import Alerts
            from relayd.delivery.qmgr import QueueManager

            self._alerts = Alerts(config.alerts, hostname=config.hostname,
                                  send_email=self.send_alert_email, clock=clock)
            self._qmgr = QueueManager(self.spool, config.spool, config.smarthosts,
                                      pool_factory or self._make_pool,
                                      executor=self.executor, clock=clock, metrics=self.metrics,
                                      alerts=self._alerts, gate=self.sending)
        if role is not Role.DELIVER:
            from relayd.control.metrics_http import MetricsServer
            from relayd.smtpd.listener import Listener, ListenerSettings

            self._listener = Listener(ListenerSettings.from_config(config), self.intake)
            self.unsubscribe_server = _unsubscribe_server(config, self.sending)
            if config.metrics.listen is not None:
                if not isinstance(self.metrics, Metrics):
                    raise TypeError("serving /metrics needs a Metrics registry")
                self.metrics_server = MetricsServer(config.metrics.listen, self.metrics.render)
        self._sockets = list(sockets or [])
        self._housekeeping_interval = housekeeping_interval
        self._stop = asyncio.Event()
        self.hooks = Hooks()

    @property
    def qmgr(self) -> QueueManager:
        """The queue manager (not in the accepting process: its child delivers)."""
        if self._qmgr is None:
            raise RuntimeError("the accepting process has no queue manager")
        return self._qmgr

    @property
    def alerts(self) -> Alerts:
        """The alerts (where deliveries run)."""
        if self._alerts is None:
            raise RuntimeError("the accepting process sends no alerts")
        return self._alerts

    @property
    def listener(self) -> Listener:
        """The SMTP listener (not in the delivery process)."""
        if self._listener is None:
            raise RuntimeError("the delivery process has no listener")
        return self._listener

    def _make_pool(self, sh: Smarthost) -> Pool:
        """A forwarder pool for ``sh`` with the current settings (and its OAuth token source)."""
        from relayd.delivery.smtp.pool import SmarthostPool

        cfg = self.config
        token_source = None
        if sh.auth.oauth is not None:
            # Imported only here: it loads cryptography (~5 MB per process) for the token cache.
            from relayd.oauth.source import build_token_source

            token_source = build_token_source(sh, state_dir=cfg.state_dir, key_file=cfg.secrets.key_file,
                                              clock=self.clock, on_status=self._token_status)
        return SmarthostPool(sh, hostname=cfg.hostname, token_source=token_source,
                             transcripts=cfg.logging.smtp_transcripts)

    def _token_status(self, st: TokenStatistics) -> None:
        """After every token refresh: the expiry gauge, and the alert for a dead grant."""
        if st.expires_at is not None:
            self.metrics.set_token_expiry(st.smarthost, st.expires_at - self.clock())
        if st.last_error_permanent:
            self.alerts.fire("token_refresh_failed", st.smarthost,
                             f"smarthost {st.smarthost}: {st.last_error}. {st.hint}".strip())
        elif st.failures == 0:
            self.alerts.clear("token_refresh_failed", st.smarthost,
                              f"smarthost {st.smarthost}: OAuth token refreshed again")

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def stop(self) -> None:
        """Begin a clean shutdown (SIGTERM)."""
        self._stop.set()

    def enqueue(self, queue_id: str, priority: bool) -> None:
        """A message was stored: schedule it here, or tell the delivery process."""
        if self.delivery_process is not None:
            self.delivery_process.notify(queue_id, priority)
        else:
            self.qmgr.enqueue(queue_id, priority=priority)

    async def serve(self) -> None:
        """Run until ``stop()``; raises SpoolError when another relayd holds the spool."""
        delivering = self.role is not Role.ACCEPT
        listening = self.role is not Role.DELIVER
        tasks: list[asyncio.Task[None]] = []
        qmgr_task: asyncio.Task[None] | None = None
        if listening:  # the delivery process runs under its parent's lock
            await self._io(self.spool.lock)
        try:
            if listening:
                # queued/ is read by the queue manager's first scan (in this process or the
                # delivery process), which sets unreadable files aside too: reading it here as
                # well took half of the time to the banner with 100,000 queued.
                recovered = await self._io(functools.partial(self.spool.recover,
                                                             check_queued=False))
                if recovered:
                    log.warning("recovered %d message(s) that were being delivered when relayd "
                                "stopped", len(recovered))
                addresses = await self.listener.start(self._sockets or None)
                log.info("relayd listening on %s", ", ".join(_fmt(a) for a in addresses))
                if self.metrics_server is not None:
                    await self.metrics_server.start()
                    log.info("metrics at http://%s/metrics", self.metrics_server.address)
                if self.unsubscribe_server is not None:
                    await self.unsubscribe_server.start()
            if self.delivery_process is not None:
                await self.delivery_process.start()
            if delivering:
                qmgr_task = asyncio.create_task(self.qmgr.run(), name="qmgr")
                tasks += [qmgr_task, asyncio.create_task(self.alerts.run(), name="alerts")]
            tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
            if self.hooks.on_ready and listening:
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
            if listening:
                await self.listener.aclose(grace=5.0)
            if self.delivery_process is not None:
                await self.delivery_process.stop()
            if qmgr_task is not None:
                self.qmgr.stop()
                await qmgr_task
                await self.alerts.close(grace=2.0)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if listening:
                self.listener.stop_accepting()
            if self.delivery_process is not None:
                await self.delivery_process.stop(grace=5.0)
            if self.metrics_server is not None:
                await self.metrics_server.close()
            if self.unsubscribe_server is not None:
                await self.unsubscribe_server.aclose()
            # Off the loop: it waits for the removal thread and removes the delivered
            # content kept in free/ (spool/free.py).
            await asyncio.get_running_loop().run_in_executor(self.executor, self.spool.close)
            self.sending.close()
            self.executor.shutdown(wait=False)
        log.info("relayd stopped")

    async def _housekeeping(self) -> None:
        """Queue gauges, the queue_age alert and the systemd STATUS= line, every few seconds.
        (The gauges and STATUS= where /metrics is served; the alerts where deliveries run.)"""
        while True:
            counts, oldest = await self._io(self._queue_snapshot)
            age = max(0.0, self.clock() - oldest) if oldest is not None else 0.0
            self.metrics.set_queue(counts, age)
            if self.role is not Role.ACCEPT:
                self.alerts.check_queue_age(age)
                remaining = self.sending.cap_remaining(self.clock())
                self.metrics.set_daily_cap_remaining(remaining)
                if remaining:
                    self.alerts.clear("daily_cap_reached", "daily_cap",
                                      "limits.daily_cap has room again")
            if self.hooks.on_status:
                self.hooks.on_status(f"{counts.get(State.QUEUED, 0)} queued, "
                                     f"{counts.get(State.ACTIVE, 0)} in delivery, "
                                     f"{counts.get(State.FAILED, 0)} failed")
            await asyncio.sleep(self._housekeeping_interval)

    def _queue_snapshot(self) -> tuple[dict[State, int], float | None]:
        return self.spool.snapshot()

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

    def reload(self, new: Config, dkim_keys: dict[str, bytes] | None = None) -> None:
        """Apply a validated config: smarthosts and retry settings for every later attempt."""
        if self.hooks.on_reloading:
            self.hooks.on_reloading()
        old = self.config
        self.config = new
        if self._qmgr is not None:
            self._qmgr.update_smarthosts(new.smarthosts, new.spool)
        self.sending.apply(new, dkim_keys=read_dkim_keys(new) if dkim_keys is None else dkim_keys)
        if self._listener is not None:
            from relayd.smtpd.listener import ListenerSettings

            if new.listen != old.listen or new.spool.path != old.spool.path:
                log.warning("listen and spool.path changes need a restart; other settings are "
                            "applied")
            self._listener.handler.settings = ListenerSettings.from_config(new)
        if self.delivery_process is not None:
            self.delivery_process.reload(new.text)  # what was accepted, not the file
        log.info("configuration reloaded")
        if self.hooks.on_reloaded:
            self.hooks.on_reloaded()


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _unsubscribe_server(cfg: Config, sending: SendingPolicy) -> UnsubscribeServer | None:
    unsub = cfg.unsubscribe
    if unsub is None or unsub.http_listen is None or unsub.url is None:
        return None
    from relayd.control.unsubscribe_http import UnsubscribeServer

    # Always records what it acknowledges, whatever do_not_email.auto_add says (SPEC).
    return UnsubscribeServer(unsub, sending.store)
