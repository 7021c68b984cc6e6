"""The daemon: the accepting half plus a delivery, run, reloaded and stopped in order.

The delivery is either the delivering half in this process (``single_process``) or the
handle on the delivery process that ``relayd run`` starts on a machine with two CPUs
(``with_delivery_process``, relayd/daemon/child.py); both satisfy ``Delivery``, so nothing
here asks which process it is in. ``Daemon.serve()`` follows Hypercorn's order: lock and
recover the spool, bind the listener, start the delivery, report ready; on stop it closes the
listener, gives open sessions a grace period, and lets in-flight deliveries finish or return
to the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from relayd.config.schema import Config, Smarthost
from relayd.control.metrics import Metrics, Recorder
from relayd.daemon.accepting import Accepting
from relayd.daemon.child import DeliveryProcess
from relayd.daemon.state import StateBackend, build_state
from relayd.model import State
from relayd.policy.acceptance import read_dkim_keys
from relayd.spool.health import SpoolHealth
from relayd.spool.store import Spool

if TYPE_CHECKING:
    from relayd.daemon.delivering import Delivering
    from relayd.delivery.ports import Pool

log = logging.getLogger("relayd")

HOUSEKEEPING_INTERVAL = 5.0
IO_THREADS = 16


class Delivery(Protocol):
    """What the daemon needs of its delivery, in this process or in the delivery process."""

    async def start(self) -> None: ...

    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        """Components whose crash must stop the daemon."""

    def enqueue(self, queue_id: str, priority: bool) -> None: ...

    def reload(self, new: Config) -> None: ...

    def housekeeping(self, oldest_age: float) -> None: ...

    def spool_health(self, health: SpoolHealth) -> None:
        """A store failed, or succeeded again after a failure (the spool_unwritable alert)."""

    async def stop(self, grace: float = 60.0) -> None: ...


D = TypeVar("D", bound=Delivery)


@dataclass
class Hooks:
    """Callbacks the caller of ``serve`` may set (sd_notify, tests)."""

    on_ready: Callable[[list[tuple[str, int]]], object] | None = None
    on_reloading: Callable[[], object] | None = None
    on_reloaded: Callable[[], object] | None = None
    on_status: Callable[[str], object] | None = None


@dataclass(frozen=True)
class Parts:
    """What both halves share in one process: the spool, the I/O threads, the metrics, the
    state beyond the spool (the do-not-email list, the daily cap's count)."""

    config: Config
    spool: Spool
    executor: ThreadPoolExecutor
    metrics: Recorder
    state: StateBackend

    @classmethod
    def build(cls, config: Config, *, keep_recent: bool, metrics: Recorder | None = None) -> Parts:
        # prometheus_client costs the process about 2 MB; nothing can read the registry unless
        # /metrics is served, so without metrics.listen the recordings go nowhere.
        if metrics is None:
            metrics = Metrics() if config.metrics.listen is not None else Recorder()
        metrics.declare_smarthosts(s.name for s in config.smarthosts)
        if config.shared_state is not None:
            metrics.set_node(config.shared_state.node)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        return cls(config, Spool(config.spool.path, keep_recent=keep_recent),
                   ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="relayd-io"),
                   metrics, build_state(config))


class Daemon(Generic[D]):
    """One running relayd: the accepting half and a delivery."""

    def __init__(self, parts: Parts, delivery: D, *, sockets: Sequence[Any] = (),
                 clock: Callable[[], float] = time.time,
                 housekeeping_interval: float = HOUSEKEEPING_INTERVAL) -> None:
        self.config = parts.config
        self.clock = clock
        self.spool = parts.spool
        self.metrics = parts.metrics
        self.executor = parts.executor
        self._state = parts.state
        self.delivery = delivery
        self.accepting = Accepting(parts.config, spool=parts.spool, executor=parts.executor,
                                   metrics=parts.metrics, store=parts.state.store,
                                   dkim_keys=read_dkim_keys(parts.config), clock=clock,
                                   enqueue=delivery.enqueue, sockets=sockets,
                                   on_spool=delivery.spool_health)
        self._housekeeping_interval = housekeeping_interval
        self._stop = asyncio.Event()
        self.hooks = Hooks()

    def stop(self) -> None:
        """Begin a clean shutdown (SIGTERM)."""
        self._stop.set()

    async def serve(self) -> None:
        """Run until ``stop()``; raises SpoolError when another relayd holds the spool."""
        tasks: list[asyncio.Task[None]] = []
        try:
            addresses = await self.accepting.start()
            await self.delivery.start()
            tasks = [*self.delivery.tasks,
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
            await self.accepting.close_listener(grace=5.0)
            await self.delivery.stop()
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.accepting.aclose()
            await self.delivery.stop(grace=5.0)
            # Off the loop: it waits for the removal thread and removes the delivered
            # content kept in free/ (spool/free.py).
            await asyncio.get_running_loop().run_in_executor(self.executor, self.spool.close)
            self._state.close()
            self.executor.shutdown(wait=False)
        log.info("relayd stopped")

    async def _housekeeping(self) -> None:
        """Queue gauges, the delivery's alerts and the systemd STATUS= line, every few seconds."""
        loop = asyncio.get_running_loop()
        while True:
            counts, oldest = await loop.run_in_executor(self.executor, self.spool.snapshot)
            age = max(0.0, self.clock() - oldest) if oldest is not None else 0.0
            self.metrics.set_queue(counts, age)
            self.delivery.housekeeping(age)
            if self.hooks.on_status:
                self.hooks.on_status(f"{counts.get(State.QUEUED, 0)} queued, "
                                     f"{counts.get(State.ACTIVE, 0)} in delivery, "
                                     f"{counts.get(State.FAILED, 0)} failed")
            await asyncio.sleep(self._housekeeping_interval)

    def reload(self, new: Config, dkim_keys: dict[str, bytes] | None = None) -> None:
        """Apply a validated config to both halves: every later attempt uses it."""
        if self.hooks.on_reloading:
            self.hooks.on_reloading()
        self.config = new
        if new.shared_state is not None:
            self.metrics.set_node(new.shared_state.node)
        self.accepting.reload(new, read_dkim_keys(new) if dkim_keys is None else dkim_keys)
        self.delivery.reload(new)
        log.info("configuration reloaded")
        if self.hooks.on_reloaded:
            self.hooks.on_reloaded()


def single_process(config: Config, *, pool_factory: Callable[[Smarthost], Pool] | None = None,
                   clock: Callable[[], float] = time.time, sockets: Sequence[Any] = (),
                   housekeeping_interval: float = HOUSEKEEPING_INTERVAL,
                   cap_window: float = 86400.0) -> Daemon[Delivering]:
    """Both halves in this process (one CPU, ``RELAYD_SINGLE_PROCESS=1``, tests)."""
    # lazy: the two-process accepting side never loads the queue manager and aiosmtplib.
    from relayd.daemon.delivering import Delivering

    # Just-stored messages are kept in memory: the queue manager here reads them back.
    parts = Parts.build(config, keep_recent=True)
    delivering = Delivering(config, spool=parts.spool, executor=parts.executor,
                            metrics=parts.metrics, state=parts.state, clock=clock,
                            pool_factory=pool_factory, cap_window=cap_window)
    return Daemon(parts, delivering, sockets=sockets, clock=clock,
                  housekeeping_interval=housekeeping_interval)


def with_delivery_process(config: Config, config_path: Path, *,
                          sockets: Sequence[Any] = ()) -> Daemon[DeliveryProcess]:
    """The accepting process of ``relayd run``; the delivery process is its child."""
    # Nothing just stored is read back in this process: its child delivers.
    parts = Parts.build(config, keep_recent=False)
    child = DeliveryProcess(config_path, config.text, parts.spool, parts.metrics)
    return Daemon(parts, child, sockets=sockets)
