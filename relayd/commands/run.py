"""``relayd run``: the daemon in the foreground, with signals, reload and readiness.

SIGTERM/SIGINT stop cleanly (exit 0); SIGHUP reloads the file and keeps the old settings when
the new file is invalid, logging the same ``path: message`` lines as check-config.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop

from relayd.commands.io import IO, config_path
from relayd.config.load import load_config
from relayd.config.schema import Config
from relayd.daemon.app import Daemon, single_process, with_delivery_process
from relayd.daemon.background import Background
from relayd.daemon.child import split_enabled
from relayd.daemon.logsetup import setup_logging
from relayd.daemon.sdnotify import Notifier, listen_fds, run_watchdog
from relayd.errors import ConfigError, RelaydError, SpoolError
from relayd.policy.acceptance import read_dkim_keys

if TYPE_CHECKING:
    import argparse

log = logging.getLogger("relayd")


def _setup_logging(cfg: Config) -> None:
    setup_logging(cfg.logging)
    # aiosmtpd logs every command line at INFO (addresses, and data at DEBUG): keep it quiet.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


async def reload_from_file(daemon: Daemon[Any], path: Path, *, report: bool) -> None:
    """SIGHUP: load ``path`` and apply it; an invalid file keeps the running settings (and,
    with ``report``, logs the same ``path: message`` lines as check-config)."""
    try:
        new = await asyncio.to_thread(load_config, path)
    except ConfigError as exc:
        if report:
            log.error("reload refused, keeping the running configuration: %s is invalid", path)
            for problem in exc.problems:
                log.error("%s", problem)
        return
    if report:
        for warning in new.warnings:
            log.warning("config: %s", warning)
    keys = await asyncio.to_thread(read_dkim_keys, new)
    daemon.reload(new, keys)


async def run_daemon(args: argparse.Namespace, io: IO, cfg: Config) -> int:
    notifier = Notifier.from_env()
    # Two processes (accepting and delivering) when there is a second CPU: relayd/daemon/child.py.
    daemon: Daemon[Any] = (with_delivery_process(cfg, config_path(args), sockets=listen_fds())
                           if split_enabled() else single_process(cfg, sockets=listen_fds()))
    daemon.hooks.on_ready = lambda addrs: notifier.ready(f"listening on {len(addrs)} socket(s)")
    daemon.hooks.on_reloading = notifier.reloading
    daemon.hooks.on_reloaded = notifier.ready
    daemon.hooks.on_status = notifier.status
    loop = asyncio.get_running_loop()
    reloading = asyncio.Lock()
    background = Background(loop)

    async def reload() -> None:
        async with reloading:
            await reload_from_file(daemon, config_path(args), report=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: background.spawn(reload()))
    background.spawn(run_watchdog(notifier))
    try:
        await daemon.serve()
    except SpoolError as exc:
        print(f"relayd: {exc}", file=io.err)
        return 1
    except OSError as exc:
        print(f"relayd: cannot start: {exc.strerror or exc}", file=io.err)
        return 1
    finally:
        notifier.stopping()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        background.cancel()
    return 0


def shared_state_refuses(cfg: Config, io: IO) -> bool:
    """With shared_state: True (after saying why) when the database's schema is not this
    relayd's. An unreachable database does not stop the start: mail is accepted into the
    local spool and deliveries that need the fleet's cap wait for it."""
    if cfg.shared_state is None:
        return False
    # lazy: psycopg (and libpq) only for a relay in a fleet
    from relayd.shared.db import probe
    from relayd.shared.schema import SchemaMismatch

    try:
        probe(cfg.shared_state)
    except SchemaMismatch as exc:
        print(f"relayd: cannot start: shared_state: {exc}", file=io.err)
        return True
    except RelaydError as exc:
        log.warning("shared_state: %s; starting anyway: mail is accepted, deliveries that need "
                    "limits.daily_cap wait for the database", exc)
    return False


def main(args: argparse.Namespace, io: IO) -> int:
    cfg = io.config(args)
    _setup_logging(cfg)
    for warning in cfg.warnings:
        log.warning("config: %s", warning)
    if shared_state_refuses(cfg, io):
        return 1
    return int(uvloop.run(run_daemon(args, io, cfg)))
