"""The fleet's copy of the OAuth records (``relayd.oauth.store``) and the lock that lets one
node refresh a smarthost's token for all of them.

The records arrive here already encrypted with ``secrets.key_file`` (every node has the same
key file): this module stores and returns opaque bytes and never sees a token. Reads and
writes are one short transaction each on the node's connection (``SharedDB``); the refresh
lock is a session advisory lock on a connection of its own, held while the node asks the
token endpoint, so that it never blocks the cap or the do-not-email list of this process.
Everything here blocks: the token source calls it in a worker thread. ``StateUnavailable``
means "do without the fleet": the caller then reads, refreshes and writes on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import psycopg

from relayd.errors import StateUnavailable
from relayd.shared.db import Conn, SharedDB, connect
from relayd.shared.schema import OAUTH_LOCK_CLASS

# How long a node waits for another one's refresh before refreshing on its own: longer than
# a token request normally takes, short enough that mail does not wait long behind a node
# that hangs (its connection dies with it, which frees the lock at once).
_SET_LOCK_WAIT = "SET statement_timeout = 30000"  # milliseconds


def lock_key(name: str) -> int:
    """A stable signed 32-bit key for ``name`` (the same on every node and every version)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "big", signed=True)


class SharedOAuth:
    """Encrypted OAuth records by name (``<smarthost>.<kind>``) in ``relayd_oauth``."""

    def __init__(self, db: SharedDB) -> None:
        self.db = db

    def read(self, name: str) -> bytes | None:
        def select(conn: Conn) -> bytes | None:
            row = conn.execute("SELECT blob FROM relayd_oauth WHERE name = %s", (name,)).fetchone()
            if row is None:
                return None
            blob = row[0]
            assert isinstance(blob, bytes | memoryview)  # bytea
            return bytes(blob)
        return self.db.run(select)

    def write(self, name: str, blob: bytes) -> None:
        self.db.run(lambda conn: conn.execute(
            "INSERT INTO relayd_oauth (name, blob, node) VALUES (%s, %s, %s) ON CONFLICT (name) "
            "DO UPDATE SET blob = EXCLUDED.blob, node = EXCLUDED.node, updated = now()",
            (name, blob, self.db.node)))

    def delete(self, name: str) -> None:
        self.db.run(lambda conn: conn.execute("DELETE FROM relayd_oauth WHERE name = %s", (name,)))

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Held by one node of the fleet at a time for ``name``; StateUnavailable (before the
        body runs) when the database cannot be reached or the wait is too long."""
        if not self.db.up:
            # Known down: refresh on our own now rather than wait for a connect timeout.
            raise StateUnavailable(self.db.problem)
        conn = connect(self.db.cfg, application="relayd oauth")
        try:
            try:
                conn.execute(_SET_LOCK_WAIT)
                conn.execute("SELECT pg_advisory_lock(%s, %s)", (OAUTH_LOCK_CLASS, lock_key(name)))
            except psycopg.Error as exc:
                raise StateUnavailable(f"cannot take the OAuth refresh lock in "
                                       f"{self.db.location()}: {' '.join(str(exc).split())}") from None
            yield
        finally:
            # Closing the session releases its advisory lock.
            with contextlib.suppress(psycopg.Error):
                conn.close()
