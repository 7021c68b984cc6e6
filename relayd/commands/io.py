"""What every command handler shares with the CLI: its streams, the config path, exit codes.

``relayd.cli`` parses argv and calls a handler ``main(args, io) -> int`` in one module of
``relayd.commands``; the handlers import this module, never ``relayd.cli``, so the arrows point
one way (cli -> commands -> commands.io).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from relayd.config.load import load_config
from relayd.config.schema import DEFAULT_CONFIG_PATH, Config

if TYPE_CHECKING:
    import argparse

# Exit codes. 0 and 1 as SPEC.md's command table says; the others from sysexits.h, which
# cron, PHP, systemd and content filters understand.
EX_OK = 0
EX_FAIL = 1
EX_USAGE = 64        # bad argv, or an address the daemon refused with 5xx (sendmail)
EX_DATAERR = 65      # the message itself was refused with 5xx (sendmail)
EX_UNAVAILABLE = 69  # relayd refuses this client (5xx greeting)
EX_TEMPFAIL = 75     # try again later: daemon down, 4xx, timeout
EX_NOPERM = 77       # may not read the queue
EX_CONFIG = 78       # the config file is unreadable or invalid


@dataclass
class IO:
    """The streams a command handler may use (injected so tests can capture them)."""

    out: TextIO
    err: TextIO
    stdin: TextIO

    def config(self, args: argparse.Namespace) -> Config:
        """Load the config named by -c / $RELAYD_CONFIG / the default path."""
        return load_config(config_path(args))


def config_path(args: argparse.Namespace) -> Path:
    """The config file: ``-c``, else ``$RELAYD_CONFIG``, else /etc/relayd/relayd.yaml."""
    explicit = getattr(args, "config", None)
    if explicit:
        return Path(explicit)
    env = os.environ.get("RELAYD_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH
