"""Listing spool directories without building lists of names.

With 100,000 messages queued, ``os.listdir``'s list of names next to the list of IDs made of
it cost ~16 MB at once, every few seconds (queue gauges, rescans, start-up recovery). Here a
directory is read one entry at a time (``iter_ids``), or handed out in batches from whichever
worker thread asks (``QueuedScan``): the queue manager's rescan of ``queued/`` checks each
batch against its schedule on the event loop and reads only the files it does not know.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Generator, Iterator
from pathlib import Path

from relayd.spool_records import valid_id


def iter_ids(directory: str | Path) -> Iterator[str]:
    """The queue IDs of the message files (``ID.msg``) in ``directory``, one by one; none
    when it does not exist."""
    try:
        with os.scandir(directory) as it:
            for e in it:
                if e.name.endswith(".msg"):
                    yield e.name[:-4]
    except FileNotFoundError:
        return


def oldest(*directories: str | Path) -> float | None:
    """The acceptance time of the oldest message in ``directories`` (None: no message).
    Queue IDs start with it, in microseconds (hex), so no file needs to be opened; a name
    that is no queue ID (a stray file) is left out rather than failing the whole count."""
    us: int | None = None
    for d in directories:
        for qid in iter_ids(d):
            if valid_id(qid):
                t = int(qid[:13], 16)
                us = t if us is None or t < us else us
    return None if us is None else us / 1_000_000


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
