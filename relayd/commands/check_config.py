"""``relayd check-config``: validate the config file and say what is wrong, one line per problem.

Prints ``config OK`` (after any ``warning:`` lines, e.g. a plain-text secret) and exits 0, or
prints each problem as ``path.to.key: message`` (SPEC: scripts parse these) and exits 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from relayd.commands.io import EX_FAIL, EX_OK, IO
from relayd.errors import ConfigError

if TYPE_CHECKING:
    import argparse


def main(args: argparse.Namespace, io: IO) -> int:
    """``config OK`` or one ``path: message`` line per problem."""
    try:
        cfg = io.config(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(str(problem), file=io.out)
        return EX_FAIL
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=io.out)
    print("config OK", file=io.out)
    return EX_OK
