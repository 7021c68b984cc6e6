"""``relayd shared-state migrate|import``: the fleet's database (docs/fleet.md).

``migrate`` creates or upgrades relayd's tables (exit 1 when the database cannot be reached
or holds a newer relayd's schema); ``import`` copies this node's embedded do-not-email list
and daily cap counters into it. Neither prints the password: libpq's messages never hold it,
and the URL cannot.
"""

from __future__ import annotations

import argparse
import time

from relayd.commands.io import EX_FAIL, IO
from relayd.delivery.limits import WINDOW
from relayd.errors import StateUnavailable
from relayd.shared.db import SharedDB, describe, migrate
from relayd.shared.importer import import_embedded


def main(args: argparse.Namespace, io: IO) -> int:
    cfg = io.config(args)
    shared = cfg.shared_state
    if shared is None:
        print(f"relayd: shared_state is not configured in {cfg.source}", file=io.err)
        return EX_FAIL
    try:
        if args.shared_state_command == "migrate":
            before, after = migrate(shared)
            if before == after:
                print(f"schema version {after} is current in {describe(shared)}", file=io.out)
            else:
                print(f"migrated {describe(shared)} from schema version {before} to {after}",
                      file=io.out)
            return 0
        db = SharedDB(shared)
        try:
            done = import_embedded(db, cfg.state_dir, time.time(), WINDOW)
        finally:
            db.close()
    except StateUnavailable as exc:
        print(f"relayd: shared_state: {exc}", file=io.err)
        return EX_FAIL
    print(f"imported {done.addresses} do-not-email addresses ({done.new_addresses} new) "
          f"from {cfg.state_dir} as node {shared.node}", file=io.out)
    if done.counters_skipped:
        print(f"daily cap counters: node {shared.node} was imported before; not counted again",
              file=io.out)
    else:
        print(f"daily cap counters: {done.deliveries} recipients delivered in the last 24 h "
              "now count against the fleet's cap", file=io.out)
    return 0
