"""``relayd _deliver``: the delivery process that ``relayd run`` starts (relayd/split.py).

Not for operators: it runs only as the child of ``relayd run``, which passes it the two pipe
descriptors. It schedules what arrives on the notify pipe (and what its rescans find), reports
metrics on the events pipe, reloads the file on SIGHUP, stops cleanly on SIGTERM, and exits
at once when the notify pipe closes because its parent is gone.

``relayd run`` starts it as ``python -m relayd -c FILE _deliver --notify-fd N --events-fd M``
(``split.child_argv``); ``relayd/__main__.py`` reads exactly that with ``split.from_argv``
and calls ``deliver`` instead of the CLI, so the long-running child never imports argparse
or builds the CLI's parser (about 1 MB).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import TYPE_CHECKING

from relayd.app import Daemon, Role
from relayd.cmd_run import Background, reload_from_file
from relayd.config import Config, load_config
from relayd.logsetup import setup_logging
from relayd.metrics import Recorder
from relayd.split import DeliverArgs, EventMetrics, open_events, read_lines

if TYPE_CHECKING:
    import argparse

    from relayd.cli import IO

log = logging.getLogger("relayd")


async def run_delivery(args: DeliverArgs, cfg: Config) -> int:
    events = await open_events(args.events_fd)
    # Without metrics.listen the accepting process records nothing (app.py), so the delivery
    # process does not encode an event per recipient for it to decode and drop: that was ~4 %
    # of this loop's time and ~6 % of the accepting loop's in the relay benchmark.
    recorder = EventMetrics(events) if cfg.metrics.listen is not None else Recorder()
    daemon = Daemon(cfg, role=Role.DELIVER, metrics=recorder)
    loop = asyncio.get_running_loop()
    background = Background(loop)

    def on_line(line: bytes) -> None:
        qid, _, priority = line.decode("ascii", "replace").partition(" ")
        if qid:
            daemon.qmgr.enqueue(qid, priority=priority.strip() == "1")

    def orphaned() -> None:
        # The accepting process is gone (killed): stop now, as if killed with it, so that a
        # new relayd run never finds this one still delivering. Claimed messages stay in
        # active/ and the next start's recovery queues them again.
        log.error("relayd run (the accepting process) is gone; the delivery process exits")
        os._exit(1)

    await read_lines(args.notify_fd, on_line, orphaned)
    # Only SIGTERM, from the parent: a Ctrl-C reaches the whole process group, and the parent
    # decides when this process stops (after its listener), or it would be restarted.
    loop.add_signal_handler(signal.SIGTERM, daemon.stop)
    # The accepting process logs the problems of an invalid file; this one only keeps going.
    loop.add_signal_handler(signal.SIGHUP, lambda: background.spawn(
        reload_from_file(daemon, args.config, report=False)))
    try:
        await daemon.serve()
    finally:
        background.cancel()
        events.close()
    return 0


def main(args: argparse.Namespace, io: IO) -> int:
    """The CLI's handler (any other spelling of the command line)."""
    from relayd.cli import config_path

    return deliver(DeliverArgs(config_path(args), args.notify_fd, args.events_fd))


def deliver(args: DeliverArgs) -> int:
    cfg = load_config(args.config)
    setup_logging(cfg.logging)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # Ctrl-C in a terminal reaches the whole process group: the parent decides when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import uvloop

    return int(uvloop.run(run_delivery(args, cfg)))
