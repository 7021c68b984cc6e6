"""``relayd shared-state import``: a single relay's embedded state copied into the fleet's
database, so that it can grow into a fleet without losing an unsubscribe.

The do-not-email list keeps each address's reason and time (an address already in the
database keeps its row). The daily cap's deliveries within the window are added as this
node's (in their minutes, as the fleet counts them), once: ``relayd_imports`` remembers the
node, so a second import adds addresses only (counting deliveries twice would shrink the
fleet's cap for a day).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from relayd.delivery.limits import DB_NAME as CAP_DB
from relayd.policy.suppressions import DB_NAME as LIST_DB
from relayd.shared.cap import minute_of
from relayd.shared.db import Conn, SharedDB


@dataclass(frozen=True)
class Imported:
    addresses: int          # read from the embedded list
    new_addresses: int      # not in the database before
    deliveries: int         # recipients counted against the fleet's cap (0 if imported before)
    counters_skipped: bool  # this node's counters were imported before


def _rows(path: Path, query: str) -> list[tuple[object, ...]]:
    """Rows of an embedded SQLite file, read-only; none when it does not exist or is empty."""
    if not path.exists() or path.stat().st_size == 0:
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        return list(db.execute(query).fetchall())
    except sqlite3.OperationalError:  # the file exists but never got its table
        return []
    finally:
        db.close()


def import_embedded(db: SharedDB, state_dir: Path, now: float, window: float) -> Imported:
    listed = _rows(state_dir / LIST_DB, "SELECT address, reason, added FROM suppressed")
    deliveries = _rows(state_dir / CAP_DB, "SELECT at, n FROM deliveries")
    recent = [(float(str(at)), int(str(n))) for at, n in deliveries if float(str(at)) > now - window]
    # The fleet counts per minute (relayd/shared/schema.py, version 4).
    per_minute: dict[int, int] = {}
    for at, n in recent:
        if n > 0:
            per_minute[minute_of(at)] = per_minute.get(minute_of(at), 0) + n

    def work(conn: Conn) -> Imported:
        new = 0
        with conn.cursor() as cur:
            for address, reason, added in listed:
                cur.execute("INSERT INTO relayd_suppressions (address, reason, added, node) "
                            "VALUES (%s, %s, to_timestamp(%s), %s) ON CONFLICT DO NOTHING",
                            (str(address), str(reason), float(str(added)), db.node))
                new += max(0, cur.rowcount)
        done = conn.execute("INSERT INTO relayd_imports (node, addresses, deliveries) "
                            "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                            (db.node, len(listed), sum(n for _, n in recent)))
        if done.rowcount == 0:
            return Imported(len(listed), new, 0, True)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO relayd_cap_minutes (minute, node, n) VALUES (%s, %s, %s) "
                "ON CONFLICT (minute, node) DO UPDATE SET n = relayd_cap_minutes.n + EXCLUDED.n",
                [(minute, db.node, n) for minute, n in sorted(per_minute.items())])
        return Imported(len(listed), new, sum(per_minute.values()), False)

    return db.run(work)
