"""One node's connection to the fleet's database: opened on first use, its schema checked,
every unit of work one transaction, and "down" remembered so that callers fail fast.

Everything here blocks (psycopg's synchronous API): callers run it in worker threads, never on
the event loop. One connection per process is enough: the work is a few short statements per
message, serialized by a lock. While the database cannot be reached, ``run`` raises
``StateUnavailable`` at once and tries to reconnect at most once per ``retry_after``
seconds, so a down database costs callers nothing but the wait they were going to do anyway.
Error messages come from libpq, which never includes the password.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
from psycopg.conninfo import make_conninfo

from relayd.config.schema import SharedStateConfig
from relayd.errors import StateUnavailable
from relayd.shared import schema

T = TypeVar("T")
Conn = psycopg.Connection[tuple[object, ...]]
log = logging.getLogger("relayd")

CONNECT_TIMEOUT = 3  # seconds; libpq's connect_timeout (whole seconds)
RETRY_AFTER = 1.0
# A statement that waits longer than this (a lock held by a hung node) is cancelled, so that a
# delivery thread never hangs on the database.
STATEMENT_TIMEOUT_MS = 10000


def conninfo(cfg: SharedStateConfig, *, application: str = "relayd") -> str:
    """The libpq connection string for ``cfg`` (it holds the password: never print it)."""
    extra: dict[str, str | int | None] = {
        "sslmode": cfg.sslmode.value,
        "connect_timeout": CONNECT_TIMEOUT,
        "application_name": f"{application} {cfg.node}"[:63],
        # A database host that vanished (no RST) is noticed within about 15 s, not hours.
        "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
        "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
    }
    if cfg.password is not None:
        extra["password"] = cfg.password.reveal()
    if cfg.ca_file is not None:
        extra["sslrootcert"] = str(cfg.ca_file)
    return make_conninfo(cfg.url, **extra)


def describe(cfg: SharedStateConfig) -> str:
    """The database for log lines and messages: the URL (which never holds a password)."""
    return cfg.url


def connect(cfg: SharedStateConfig, *, application: str = "relayd") -> Conn:
    """A new autocommit connection (transactions are explicit); StateUnavailable if the
    database cannot be reached."""
    try:
        return psycopg.connect(conninfo(cfg, application=application), autocommit=True)
    except psycopg.Error as exc:
        raise StateUnavailable(f"cannot reach {describe(cfg)}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """libpq's message, on one line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def migrate(cfg: SharedStateConfig) -> tuple[int, int]:
    """``relayd shared-state migrate``: (schema version before, after); StateUnavailable when
    the database cannot be reached, holds a newer schema, or refuses a statement (a missing
    grant, a table owned by another role), with libpq's reason."""
    conn = connect(cfg)
    try:
        return schema.migrate(conn)
    except psycopg.Error as exc:
        raise StateUnavailable(f"cannot migrate {describe(cfg)}: {_reason(exc)}") from None
    finally:
        conn.close()


def probe(cfg: SharedStateConfig) -> None:
    """Connect once and check the schema (``relayd run`` before it starts): SchemaMismatch
    if relayd must not run against this database, StateUnavailable if it cannot be reached."""
    conn = connect(cfg)
    try:
        schema.check(conn)
    finally:
        conn.close()


class SharedDB:
    """The node's connection, thread-safe; ``up`` and ``problem`` say how it fares."""

    def __init__(self, cfg: SharedStateConfig, *, retry_after: float = RETRY_AFTER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.node = cfg.node
        self._retry_after = retry_after
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: Conn | None = None
        self._failed_at: float | None = None
        self.problem = ""         # why the last attempt failed ("" while up)
        self.up = True            # until proven otherwise: nothing alerts before a failure
        self._connected = False   # ever: before that, callers report failures (the CLI prints)
        self.in_flight_recovered = False  # see relayd.shared.cap

    def location(self) -> str:
        return describe(self.cfg)

    def run(self, work: Callable[[Conn], T]) -> T:
        """``work(conn)`` in one transaction; StateUnavailable when the database cannot be
        reached or its schema is not this relayd's (nothing of ``work`` is then committed)."""
        with self._lock:
            if (self._conn is None and self._failed_at is not None
                    and self._clock() - self._failed_at < self._retry_after):
                raise StateUnavailable(self.problem)
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._open()
                with self._conn.transaction():
                    result = work(self._conn)
            except schema.SchemaMismatch as exc:
                self._down(str(exc))
                raise
            except psycopg.Error as exc:
                # Unreachable, or refused (a missing grant): either way the state cannot be
                # used, and the alert says why.
                what = ("cannot reach" if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
                        else "error from")
                self._down(f"{what} {self.location()}: {_reason(exc)}")
                raise StateUnavailable(self.problem) from None
            except StateUnavailable as exc:
                self._down(str(exc))
                raise
            if not self.up:
                log.warning("shared state: %s is reachable again", self.location())
            self.up, self.problem, self._failed_at, self._connected = True, "", None, True
            return result

    def _open(self) -> Conn:
        conn = connect(self.cfg)
        try:
            schema.check(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _down(self, problem: str) -> None:
        """Hold the lock. Forget the connection; callers fail fast until the next retry."""
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
        if self._connected and (self.up or problem != self.problem):
            log.error("shared state: %s", problem)
        self.up, self.problem, self._failed_at = False, problem, self._clock()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
