"""The delivering half of relayd, assembled from a Config: the queue manager, its smarthost
pools (with their OAuth token sources), the delivery gate and the alerts.

It runs in the delivery process of ``relayd run`` (relayd/commands/deliver.py), or beside the
accepting half in one process (relayd/daemon/app.py). It never loads the listener, the
acceptance policy or the HTTP servers: a process's memory is mostly its imported modules.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from relayd.config.schema import Config, Smarthost
from relayd.control.alerts import Alerts
from relayd.control.metrics import Recorder
from relayd.daemon.state import StateBackend
from relayd.delivery.gate import DeliveryGate
from relayd.delivery.per_host import HostLimits
from relayd.delivery.ports import Pool
from relayd.delivery.qmgr import QueueManager
from relayd.spool.health import SpoolHealth
from relayd.spool.store import Spool

if TYPE_CHECKING:
    from relayd.oauth.source import TokenStatistics

log = logging.getLogger("relayd")


class Delivering:
    """Schedules and performs deliveries for one spool, and tells the operator when they stall."""

    def __init__(self, config: Config, *, spool: Spool, executor: Executor, metrics: Recorder,
                 state: StateBackend, clock: Callable[[], float] = time.time,
                 pool_factory: Callable[[Smarthost], Pool] | None = None,
                 cap_window: float = 86400.0) -> None:
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self.state = state
        self.alerts = Alerts(config.alerts, hostname=config.hostname,
                             send_email=self.send_alert_email, clock=clock,
                             fleet=state.alert_fleet())
        self._loop: asyncio.AbstractEventLoop | None = None
        self.gate = DeliveryGate(config, state.store, cap_window=cap_window,
                                 cap_factory=state.daily_cap, rate_factory=state.rate,
                                 alert=self._alert_soon)
        # Each smarthost's own daily_cap and rate (routing); nothing per send without them.
        self.host_limits = HostLimits(config.state_dir, clock, cap_window=cap_window)
        self.qmgr = QueueManager(spool, config.spool, config.smarthosts,
                                 pool_factory or self.make_pool, executor=executor, clock=clock,
                                 metrics=metrics, alerts=self.alerts, gate=self.gate,
                                 host_limits=self.host_limits, on_clock_jump=self._clock_jumped)
        self.qmgr.update_routes(config.routes, config.reply_rules,
                                priority_exempt=config.limits.priority_exempt)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self._refreshing: asyncio.Future[None] | None = None
        self._saving: asyncio.Future[None] | None = None  # the caps' files after a clock jump
        self._reloading: set[asyncio.Task[None]] = set()
        self._gate_reload = asyncio.Lock()

    def make_pool(self, sh: Smarthost) -> Pool:
        """A smarthost pool for ``sh`` with the current settings (and its OAuth token source)."""
        # lazy: aiosmtplib is loaded when the first pool is built, not when the CLI imports this.
        from relayd.delivery.smtp.pool import SmarthostPool

        cfg = self.config
        token_source = None
        if sh.auth.oauth is not None:
            # lazy: it loads cryptography (~5 MB per process) for the token cache.
            from relayd.oauth.source import build_token_source

            token_source = build_token_source(sh, state_dir=cfg.state_dir, key_file=cfg.secrets.key_file,
                                              clock=self.clock, on_status=self._token_status,
                                              shared=self.state.oauth_copies())
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

    # -- the Delivery protocol of relayd/daemon/app.py ---------------------------------------
    def _alert_soon(self, event: str, key: str, message: str) -> None:
        """An alert from the gate, which runs in worker threads: fired on the loop."""
        loop = self._loop
        if loop is None:
            self.alerts.fire(event, key, message)
        else:
            loop.call_soon_threadsafe(self.alerts.fire, event, key, message)

    def _clock_jumped(self, jump: float, now: float) -> None:
        """The queue manager saw the wall clock jump: the caps follow it like its schedule, in
        memory at once (the next reading already counts on the moved stamps), their files in
        a worker thread."""
        self.gate.shift(jump, now)
        self.host_limits.shift(jump, now)
        if self._loop is not None:
            self._saving = self._loop.run_in_executor(None, self._save_limits)

    def _save_limits(self) -> None:
        """Worker thread: the caps' files, after a clock jump."""
        try:
            self.gate.flush()
            self.host_limits.flush()
        except Exception as exc:  # memory counts right; a restart would read the old stamps
            log.error("could not write the daily caps after a clock jump: %s", exc)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks = [asyncio.create_task(self.qmgr.run(), name="qmgr"),
                       asyncio.create_task(self.alerts.run(), name="alerts")]

    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        """The running components: a crash of one stops the daemon (it is re-raised)."""
        return tuple(self._tasks)

    def enqueue(self, queue_id: str, priority: bool) -> None:
        self.qmgr.enqueue(queue_id, priority=priority)

    def reload(self, new: Config) -> None:
        """Smarthosts and retry settings for every later attempt; the gate's list rules and
        limits."""
        self.config = new
        self.qmgr.update_smarthosts(new.smarthosts, new.spool)
        self.qmgr.update_routes(new.routes, new.reply_rules,
                                priority_exempt=new.limits.priority_exempt)
        if self._loop is None:  # not started: nothing runs on a loop yet
            self.gate.apply(new)
            return
        # Opening a new daily cap (SQLite, or a fleet's database) and the users' limits blocks:
        # a worker thread opens them, then the loop swaps them in. Reloads apply in order.
        task = self._loop.create_task(self._reload_gate(new), name="reload-gate")
        self._reloading.add(task)
        task.add_done_callback(self._reloading.discard)

    async def reloaded(self) -> None:
        """Wait until the reloads handed to ``reload`` have reached the gate."""
        await asyncio.gather(*self._reloading, return_exceptions=True)

    async def _reload_gate(self, new: Config) -> None:
        assert self._loop is not None
        async with self._gate_reload:
            try:
                prepared = await self._loop.run_in_executor(None, self.gate.prepare, new)
            except Exception as exc:  # the rest of the config applies; delivery goes on
                log.error("reload: the daily cap or the users' limits could not be opened "
                          "(%s); the previous ones stay in force", exc)
                prepared = self.gate.running()
            self.gate.apply(new, prepared)
            # A replaced daily cap writes its last counts (a fleet's to the database).
            await self._loop.run_in_executor(None, self.gate.close_retired)

    def housekeeping(self, oldest_age: float) -> None:
        """Every few seconds: the queue_age alert, the daily cap's gauge and, in a fleet, the
        shared state's."""
        self.alerts.check_queue_age(oldest_age)
        health = self.state.health()
        if health is not None:
            up, problem = health
            self.metrics.set_shared_state_up(up)
            self._refresh_cap()
            if up:
                self.alerts.clear("shared_state_down", "shared_state",
                                  "shared_state: the database is reachable again")
            else:
                self.alerts.fire("shared_state_down", "shared_state",
                                 f"shared_state: {problem}; mail is accepted, deliveries that "
                                 "need limits.daily_cap or limits.rate wait")
        # The queue manager's reading: a jump it has not noticed yet would empty the caps.
        remaining = self.gate.cap_remaining(self.qmgr.now())
        self.metrics.set_daily_cap_remaining(remaining)
        if remaining:
            self.alerts.clear("daily_cap_reached", "daily_cap", "limits.daily_cap has room again")

    def spool_health(self, health: SpoolHealth) -> None:
        """The intake's report on the spool (here, or over the notify pipe): the
        spool_unwritable alert."""
        self.alerts.spool_health(health)

    def _refresh_cap(self) -> None:
        """In a fleet the others' deliveries change the cap: re-read it in a worker thread
        (the database is never asked on the loop), for the gauge of the next housekeeping."""
        if self._loop is None or (self._refreshing is not None and not self._refreshing.done()):
            return
        self._refreshing = self._loop.run_in_executor(None, self.gate.refresh_cap, self.clock())

    async def stop(self, grace: float = 60.0) -> None:
        """In-flight deliveries finish or go back to the queue; then the alerts flush."""
        if self._stopped:
            return
        self._stopped = True
        self.qmgr.stop()
        qmgr_task = next((t for t in self._tasks if t.get_name() == "qmgr"), None)
        if qmgr_task is not None and not qmgr_task.done():
            await qmgr_task
        await self.alerts.close(grace=2.0)
        for t in self._tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.reloaded()
        if self._saving is not None:
            await self._saving
        # Blocking: a fleet's cap writes its last counts and gives its lease back.
        await asyncio.to_thread(self.gate.close)
        self.host_limits.close()

    # -- alerts by mail ------------------------------------------------------------------------
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


async def serve_alone(delivering: Delivering, spool: Spool, stop: asyncio.Event, *,
                      housekeeping_interval: float = 5.0) -> None:
    """The delivery process's main loop: deliver until ``stop`` is set (SIGTERM from the
    accepting process), keeping the alerts' view of the queue up to date."""
    loop = asyncio.get_running_loop()

    async def housekeeping() -> None:
        while True:
            _counts, oldest = await loop.run_in_executor(None, spool.snapshot)
            delivering.housekeeping(max(0.0, delivering.clock() - oldest) if oldest is not None else 0.0)
            await asyncio.sleep(housekeeping_interval)

    await delivering.start()
    tasks = [*delivering.tasks, asyncio.create_task(housekeeping(), name="housekeeping")]
    stop_wait = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({*tasks, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            if t.done():
                t.result()  # propagate a crash of a component
        log.info("relayd stopping")
    finally:
        stop_wait.cancel()
        await delivering.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await loop.run_in_executor(None, spool.close)
    log.info("relayd stopped")
