"""``relayd _deliver``: the delivery process that ``relayd run`` starts (relayd/daemon/child.py).

Not for operators: it runs only as the child of ``relayd run``, which passes it the two pipe
descriptors. It takes its config text from the notify pipe (the first line, and a new one
after each reload the accepting process accepted; it never reads the file), schedules what
else arrives there (and what its rescans find), reports metrics on the events pipe, stops
cleanly on SIGTERM, and exits at once when the notify pipe closes because its parent is gone.

``relayd run`` starts it as ``python -m relayd -c FILE _deliver --notify-fd N --events-fd M``
(``pipe.child_argv``); ``relayd/__main__.py`` reads exactly that with ``pipe.from_argv``
and calls ``deliver`` instead of the CLI, so the long-running child never imports argparse
or builds the CLI's parser (about 1 MB).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import uvloop

from relayd.commands.io import EX_CONFIG, IO, config_path
from relayd.config.load import parse_config
from relayd.config.schema import Config
from relayd.control.metrics import Recorder
from relayd.daemon.background import Background
from relayd.daemon.delivering import Delivering, serve_alone
from relayd.daemon.logsetup import setup_logging
from relayd.daemon.pipe import (
    DeliverArgs,
    EventMetrics,
    open_events,
    parse_config_line,
    parse_spool_line,
    read_first_line,
    read_lines,
)
from relayd.daemon.state import build_state
from relayd.errors import ConfigError
from relayd.spool.store import Spool

if TYPE_CHECKING:
    import argparse

log = logging.getLogger("relayd")


IO_THREADS = 16


async def apply_config(delivering: Delivering, text: str, source: Path) -> None:
    """A config the accepting process accepted on reload: parse it (off the loop) and apply.
    It validated the same text, so a failure here means a file it names (a secret, a key)
    changed in between: keep the running settings, as the accepting process would."""
    try:
        new = await asyncio.to_thread(parse_config, text, source=source)
    except ConfigError as exc:
        log.error("the delivery process keeps its running configuration: %s", "; ".join(
            str(p) for p in exc.problems))
        return
    delivering.reload(new)
    await delivering.reloaded()  # the line tells the operator the new limits are in force
    log.info("configuration reloaded")


async def run_delivery(args: DeliverArgs, cfg: Config, pending: bytes = b"") -> int:
    events = await open_events(args.events_fd)
    # Without metrics.listen the accepting process records nothing (daemon/app.py), so the
    # delivery process does not encode an event per recipient for it to decode and drop.
    recorder = EventMetrics(events) if cfg.metrics.listen is not None else Recorder()
    recorder.declare_smarthosts(s.name for s in cfg.smarthosts)
    # It runs under the accepting process's spool lock, which also recovered the spool.
    spool = Spool(cfg.spool.path)
    state = build_state(cfg)
    executor = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="relayd-io")
    delivering = Delivering(cfg, spool=spool, executor=executor, metrics=recorder, state=state)
    loop = asyncio.get_running_loop()
    background = Background(loop)
    stop = asyncio.Event()

    def on_line(line: bytes) -> None:
        text = parse_config_line(line)
        if text is not None:
            background.spawn(apply_config(delivering, text, args.config))
            return
        health = parse_spool_line(line)
        if health is not None:
            delivering.spool_health(health)
            return
        qid, _, priority = line.decode("ascii", "replace").partition(" ")
        if qid:
            delivering.enqueue(qid, priority.strip() == "1")

    def orphaned() -> None:
        # The accepting process is gone (killed): stop now, as if killed with it, so that a
        # new relayd run never finds this one still delivering. Claimed messages stay in
        # active/ and the next start's recovery queues them again.
        log.error("relayd run (the accepting process) is gone; the delivery process exits")
        os._exit(1)

    await read_lines(args.notify_fd, on_line, orphaned, pending)
    # Only SIGTERM, from the parent: a Ctrl-C reaches the whole process group, and the parent
    # decides when this process stops (after its listener), or it would be restarted.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await serve_alone(delivering, spool, stop)
    finally:
        background.cancel()
        state.close()
        executor.shutdown(wait=False)
        events.close()
    return 0


def main(args: argparse.Namespace, io: IO) -> int:
    """The CLI's handler (any other spelling of the command line)."""
    return deliver(DeliverArgs(config_path(args), args.notify_fd, args.events_fd))


def deliver(args: DeliverArgs) -> int:
    # Ctrl-C or a hangup of the terminal reaches the whole process group: the parent decides
    # when to stop, and a reload reaches this process as a config line, not as SIGHUP.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    line, pending = read_first_line(args.notify_fd)
    text = parse_config_line(line)
    if text is None:
        print("relayd: the delivery process is started by 'relayd run' only", file=sys.stderr)
        return 1
    try:
        cfg = parse_config(text, source=args.config)
    except ConfigError as exc:
        # A file it names (a secret, a key) changed since the accepting process read it.
        print(f"relayd: invalid config {args.config} (as accepted by relayd run):",
              file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EX_CONFIG
    setup_logging(cfg.logging)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    return int(uvloop.run(run_delivery(args, cfg, pending)))
