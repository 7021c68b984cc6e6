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


def count_and_oldest(directory: str | Path) -> tuple[int, int | None]:
    """(number of message files in ``directory``, acceptance time of the oldest in
    microseconds or None), in one pass. Queue IDs start with that time (hex), so no file is
    opened; a name that is no number (a stray file) is counted but not dated."""
    n, oldest = 0, None
    try:
        with os.scandir(directory) as it:
            for e in it:
                name = e.name
                if not name.endswith(".msg"):
                    continue
                n += 1
                try:
                    us = int(name[:-4][:13], 16)
                except ValueError:
                    continue
                if oldest is None or us < oldest:
                    oldest = us
    except FileNotFoundError:
        pass
    return n, oldest


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
