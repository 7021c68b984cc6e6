"""``relayd suppress add|remove|list [--json]|import FILE``: manage the do-not-email list.

Writes go straight to the SQLite store under ``state_dir``; a running daemon sees them at
its next message (``SuppressionStore.snapshot`` notices the change), no restart or reload.
With ``shared_state`` they go to the fleet's database, and every node enforces them within a
second (relayd/shared/suppressions.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from relayd.commands.io import IO
from relayd.daemon.state import build_state
from relayd.policy.suppressions import SuppressionList, normalize
from relayd.units import is_address


def main(args: argparse.Namespace, io: IO) -> int:
    cfg = io.config(args)
    state = build_state(cfg)
    try:
        return _act(args, io, state.store)
    finally:
        state.close()


def _act(args: argparse.Namespace, io: IO, store: SuppressionList) -> int:
    command = args.suppress_command
    if command == "list":
        addresses = store.list()
        if args.json:
            print(json.dumps(addresses), file=io.out)
        else:
            for a in addresses:
                print(a, file=io.out)
        return 0
    if command == "import":
        path = Path(args.file)
        try:
            result = store.import_file(path)
        except (OSError, UnicodeDecodeError) as exc:
            print(f"relayd: cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
                  file=io.err)
            return 1
        for line_no, text in result.invalid:
            print(f"{path}:{line_no}: not an email address, skipped: {text}", file=io.err)
        print(f"imported {result.added} new, {result.present} already listed"
              + (f", {len(result.invalid)} invalid lines skipped" if result.invalid else ""),
              file=io.out)
        return 0
    addresses = [normalize(a) for a in args.addresses]
    bad = [a for a in addresses if not is_address(a)]
    for a in bad:
        print(f"relayd: not an email address: {a!r}", file=io.err)
    good = [a for a in dict.fromkeys(addresses) if a not in bad]
    if command == "add":
        n = store.add(good)
        print(f"added {n}, already listed {len(good) - n}", file=io.out)
    else:
        n = store.remove(good)
        print(f"removed {n}, not listed {len(good) - n}", file=io.out)
    return 1 if bad else 0
