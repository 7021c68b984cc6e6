"""The fleet's ``limits.rate`` in PostgreSQL, with the local bucket's ``wait``
(``relayd.delivery.limits.Pacer``).

Time is cut into one-second windows of the nodes' clocks (epoch seconds; keep them in NTP, as
for the daily cap). Window ``k`` allows ``floor(R*(k+1)) - floor(R*k)`` sends for the whole
fleet (``R`` = ``rate.per_second``): ``R`` each second for a whole rate, and a fractional rate
(``10000/h``) spreads its sends over the windows, exactly ``R`` in the long run. One row per
window counts the slots the nodes took. A node takes a *batch* of slots in one statement (a
quarter of a second's worth, at least what the message needs) and spends them locally, so a
busy node asks the database a few times a second, not once per message. Within its slots
the node also paces with the ordinary token bucket at ``R``, so its own sends are spaced as a
single relay's are.

Error bound. Slots are taken under the window row's lock, so the fleet starts at most the
window's allowance in any one-second window: never faster than the rate. (One exception, as
with a single relay's bucket: a message with more recipients than one window allows collects
slots over successive windows and then goes at once.) Slots a node took and did not spend
expire with their window; the fleet then sends less than ``R`` in that window, by at most
``batch - 1`` per node, and only while that node had less to send than its batch.

While the database cannot be reached ``wait`` raises ``StateUnavailable`` at once: the queue
manager puts the message back in the spool to wait, as for the daily cap.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

from relayd.delivery.limits import RateLimiter
from relayd.shared.db import Conn, SharedDB
from relayd.units import Rate

BATCH_SECONDS = 0.25   # a batch is this much of a second's allowance
KEEP_WINDOWS = 60      # rows of windows older than this many seconds are deleted

# One statement: the row lock of the upsert serializes the nodes on a window. ``last_grant``
# returns what this statement added (the SET expressions see the row as it was).
_TAKE = (
    "INSERT INTO relayd_rate_windows AS w (second, used, last_grant) "
    "VALUES (%(k)s, %(first)s, %(first)s) ON CONFLICT (second) DO UPDATE SET "
    "used = greatest(w.used, least(w.used + %(want)s, %(allow)s)), "
    "last_grant = greatest(w.used, least(w.used + %(want)s, %(allow)s)) - w.used "
    "RETURNING last_grant")


def window_allowance(per_second: float, k: int) -> int:
    """The sends the fleet may start in the one-second window ``k`` (epoch seconds)."""
    return math.floor(per_second * (k + 1)) - math.floor(per_second * k)


class SharedRate:
    """``limits.rate`` for the whole fleet, paced locally within batches of shared slots."""

    def __init__(self, db: SharedDB, rate: Rate, *, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.db = db
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()   # callers queue in call order, as with the local bucket
        self._window = -1             # the window the slots in hand belong to
        self._slots = 0
        self._next_cleanup = 0
        self.update(rate)

    def update(self, rate: Rate) -> None:
        """A reload's ``limits.rate`` (the slots in hand stay valid for their window)."""
        self.rate = rate
        self.per_second = rate.per_second
        self.batch = max(1, math.ceil(rate.per_second * BATCH_SECONDS))
        self._local = RateLimiter(rate, sleep=self._sleep)

    async def wait(self, n: int = 1) -> None:
        """Wait until ``n`` sends may start for the fleet; StateUnavailable while the
        database cannot be reached (nothing is then spent)."""
        n = max(1, n)
        async with self._lock:
            await self._local.wait(n)
            have = 0
            while True:
                k = math.floor(self._clock())
                if k != self._window:
                    self._window, self._slots = k, 0   # last window's leftovers expire
                take = min(n - have, self._slots)
                self._slots -= take
                have += take
                if have >= n:
                    return
                granted = await asyncio.to_thread(self.take, k, max(n - have, self.batch))
                if granted:
                    if k == self._window:
                        self._slots += granted
                    continue
                # The fleet used this window's allowance: try again in the next one.
                await self._sleep(max(0.0, k + 1 - self._clock()))

    def take(self, k: int, want: int) -> int:
        """Worker thread: take up to ``want`` slots of window ``k``; the grant (0: full)."""
        allow = window_allowance(self.per_second, k)
        cleanup = k >= self._next_cleanup

        def work(conn: Conn) -> int:
            row = conn.execute(_TAKE, {"k": k, "first": min(want, allow), "want": want,
                                       "allow": allow}).fetchone()
            if cleanup:
                conn.execute("DELETE FROM relayd_rate_windows WHERE second < %s",
                             (k - KEEP_WINDOWS,))
            return 0 if row is None else int(str(row[0]))

        granted = self.db.run(work)
        if cleanup:
            self._next_cleanup = k + KEEP_WINDOWS
        return granted
