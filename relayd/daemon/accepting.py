"""The accepting half of relayd, assembled from a Config: the SMTP listener with its intake
(acceptance policy, then the spool), the /metrics endpoint and the one-click unsubscribe
endpoint.

It runs in the process systemd starts (relayd/daemon/app.py). It never loads the queue
manager, aiosmtplib or the alerts: a process's memory is mostly its imported modules.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from relayd.config.schema import Config
from relayd.control.metrics import Metrics, Recorder
from relayd.control.metrics_http import MetricsServer
from relayd.policy.acceptance import AcceptancePolicy
from relayd.policy.suppressions import SuppressionList
from relayd.smtpd.intake import Intake
from relayd.smtpd.listener import Listener, ListenerSettings
from relayd.spool.health import SpoolHealth
from relayd.spool.store import Spool

if TYPE_CHECKING:
    from relayd.control.unsubscribe_http import UnsubscribeServer
    from relayd.smtpd.submission import Submission

log = logging.getLogger("relayd")


class Accepting:
    """Takes mail from local apps and stores it durably; hands each stored ID to ``enqueue``."""

    def __init__(self, config: Config, *, spool: Spool, executor: Executor, metrics: Recorder,
                 store: SuppressionList, dkim_keys: dict[str, bytes], clock: Callable[[], float],
                 enqueue: Callable[[str, bool], None], sockets: Sequence[Any] = (),
                 on_spool: Callable[[SpoolHealth], None] | None = None) -> None:
        self.config = config
        self.spool = spool
        self._executor = executor
        self.policy = AcceptancePolicy(config, store, dkim_keys=dkim_keys)
        self.intake = Intake(self.policy, spool, executor=executor, clock=clock, metrics=metrics,
                             enqueue=enqueue, on_spool=on_spool)
        self.listener = Listener(ListenerSettings.from_config(config), self.intake)
        self.submission = _submission(config, self.intake, executor, metrics)
        self.unsubscribe_server = _unsubscribe_server(config, store)
        self.metrics_server: MetricsServer | None = None
        if config.metrics.listen is not None:
            if not isinstance(metrics, Metrics):
                raise TypeError("serving /metrics needs a Metrics registry")
            self.metrics_server = MetricsServer(config.metrics.listen, metrics.render)
        self._sockets = list(sockets)

    async def _io(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def start(self) -> list[tuple[str, int]]:
        """Lock and recover the spool, then serve; the listening addresses. Raises SpoolError
        when another relayd holds the spool."""
        await self._io(self.spool.lock)
        # queued/ is read by the queue manager's first scan, which sets unreadable files aside
        # too: reading it here as well took half of the time to the banner with 100,000 queued.
        recovered = await self._io(functools.partial(self.spool.recover, check_queued=False))
        if recovered:
            log.warning("recovered %d message(s) that were being delivered when relayd stopped",
                        len(recovered))
        addresses = await self.listener.start(self._sockets or None)
        log.info("relayd listening on %s", ", ".join(_fmt(a) for a in addresses))
        if self.submission is not None:
            submission = await self.submission.start()
            log.info("submission (TLS and AUTH required) on %s",
                     ", ".join(_fmt(a) for a in submission))
        if self.metrics_server is not None:
            await self.metrics_server.start()
            log.info("metrics at http://%s/metrics", self.metrics_server.address)
        if self.unsubscribe_server is not None:
            await self.unsubscribe_server.start()
        return addresses

    async def close_listener(self, grace: float) -> None:
        """Stop taking mail; open sessions get ``grace`` seconds to finish."""
        if self.submission is not None:
            await asyncio.gather(self.listener.aclose(grace=grace),
                                 self.submission.aclose(grace=grace))
        else:
            await self.listener.aclose(grace=grace)

    async def aclose(self) -> None:
        self.listener.stop_accepting()
        if self.submission is not None:
            self.submission.stop_accepting()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self.unsubscribe_server is not None:
            await self.unsubscribe_server.aclose()

    def reload(self, new: Config, dkim_keys: dict[str, bytes]) -> None:
        old, self.config = self.config, new
        self.policy.apply(new, dkim_keys=dkim_keys)
        if new.listen != old.listen or new.spool.path != old.spool.path:
            log.warning("listen and spool.path changes need a restart; other settings are applied")
        self.listener.handler.settings = ListenerSettings.from_config(new)
        if self.submission is not None:
            self.submission.reload(new)
        elif new.submission:
            log.warning("submission listeners added to the config need a restart")


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _submission(cfg: Config, intake: Intake, executor: Executor,
                metrics: Recorder) -> Submission | None:
    if not cfg.submission:
        return None
    # lazy: TLS, AUTH and the users room only where submission listeners are configured
    # (the loopback-only process stays as small as before).
    from relayd.smtpd.submission import Submission

    return Submission(cfg, intake, executor=executor, metrics=metrics)


def _unsubscribe_server(cfg: Config, store: SuppressionList) -> UnsubscribeServer | None:
    unsub = cfg.unsubscribe
    if unsub is None or unsub.http_listen is None or unsub.url is None:
        return None
    # lazy: the endpoint's module (and its page templates) only where it is configured.
    from relayd.control.unsubscribe_http import UnsubscribeServer

    # Always records what it acknowledges, whatever do_not_email.auto_add says (SPEC).
    return UnsubscribeServer(unsub, store)
