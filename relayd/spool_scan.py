"""A listing of a spool directory handed out in batches, from whichever worker thread asks.

The queue manager's rescan of ``queued/`` (relayd/qmgr.py) checks each batch against its
schedule on the event loop and reads only the files it does not know: the whole listing as
one list of names would be ~8 MB with 100,000 messages queued, and reading every file's
header ~200,000 opens per rescan.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Generator, Iterator


class QueuedScan:
    """Queue IDs from an iterator over a directory, a batch per call."""

    def __init__(self, ids: Iterator[str]) -> None:
        self._ids: Iterator[str] | None = ids
        self._lock = threading.Lock()  # one thread at a time in the directory iterator

    def next_batch(self, size: int) -> list[str]:
        """Up to ``size`` more IDs; an empty list at the end (then the listing is closed)."""
        with self._lock:
            if self._ids is None:
                return []
            batch = list(itertools.islice(self._ids, size))
            if len(batch) < size:
                self._close()
            return batch

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        ids, self._ids = self._ids, None
        if isinstance(ids, Generator):
            ids.close()  # closes the directory now, not when garbage-collected
