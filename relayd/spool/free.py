"""What becomes of a delivered message's file: kept in ``free/`` and overwritten by a later
message, in a background thread (``Reaper``).

Creating a file allocates an inode, which costs far more kernel CPU than moving an existing
file, so relayd keeps the files of delivered messages and writes the next messages into them
(Postfix creates a queue file per message). A small file keeps its content until it is
overwritten: emptying it first would only free its data blocks for the next message to
allocate again. docs/performance.md has the measurements.

The life of a file:

1. ``give`` (the delivery side, once every recipient is done): a file over
   ``KEEP_CONTENT_MAX`` is emptied where it is (``truncate`` in ``active/``), so ``free/``
   never holds more than ``limit`` times that much data; then the file is renamed into
   ``free/``. A crash between the two steps leaves an empty file in ``active/``: no writer
   ever puts an empty file there (``queued/`` only receives complete, flushed files), so
   recovery knows it for a delivered message and drops it quietly. A crash after the rename
   leaves a file in ``free/``, which start-up removes (``sweep``).
2. ``take`` (the accepting side, in ``Spool.put``): ``link(free/F, tmp/ID.msg)`` then
   ``unlink(free/F)``. ``link`` fails with EEXIST when ``tmp/ID.msg`` exists, the same
   protection against a duplicate queue ID as the ``O_EXCL`` create it replaces (``rename``
   would silently replace the other message's file). If two takers link the same free file,
   only one ``unlink`` succeeds; the other removes its link before writing anything.
3. The taker writes the new file from its first byte, cuts it to the new length
   (``ftruncate``: no stale tail of a longer message), flushes and renames it exactly like a
   new file. Until then recovery sees in ``tmp/`` a file whose length or CRC-32 does not
   match its header, or whose header names another ID, and removes it: never acknowledged,
   never delivered.

Delivered content does not stay in ``free/``: ``scrub`` (the reaper thread, every
``SCRUB_INTERVAL`` seconds, busy or idle) removes the files that were there at its previous
round already, so a file is either overwritten or gone within two intervals; stopping
relayd and starting it remove them all (``sweep``). Removing is safe against a taker at any
step: an ``unlink`` before its ``link`` makes the link fail, one between its ``link`` and
its ``unlink`` makes its unlink fail (it drops its link before writing anything), and after
that the name is gone. Under load, scrubbing shrinks the pool to what ten to twenty seconds
of mail need.

At most ``limit`` files are kept: after a backlog drains, the surplus is unlinked as before.
The accepting process lists ``free/`` when its list of names runs out (not more often than
every ``REFILL_PAUSE`` seconds while the directory is empty, when new files are created
instead); the giving side counts ``free/`` again every ``RECOUNT_INTERVAL`` seconds, and
whenever its count says the pool is full, since another process takes from it.

Blocking; called from the spool's worker threads.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable

from relayd import faults

log = logging.getLogger("relayd.spool")

FREE_FILES_MAX = 1000  # about one second of mail at the rates relayd reaches
KEEP_CONTENT_MAX = 128 * 1024  # so free/ holds at most ~128 MB of delivered mail
REFILL_PAUSE = 0.05
RECOUNT_INTERVAL = 1.0
FULL_RECOUNT_PAUSE = 0.05
SCRUB_INTERVAL = 10.0


class FreeFiles:
    """The pool of reusable message files in one spool's ``free/`` directory."""

    def __init__(self, directory: str, *, limit: int = FREE_FILES_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._dir = directory
        self._limit = limit
        self._clock = clock
        self._names: collections.deque[str] = collections.deque()
        self._refill_lock = threading.Lock()
        self._refill_after = 0.0
        self._count_lock = threading.Lock()
        self._count = 0
        self._recount_at = 0.0
        self._full_recount_at = 0.0
        self._seen: set[str] = set()  # free/ at the previous scrub

    # -- the accepting side -----------------------------------------------------------------
    def take(self, dst: str, *, relist: bool = False) -> bool:
        """Give a free file the new name ``dst``; False when there is none (create one).
        ``relist`` lists free/ even within the pause after an empty listing.

        FileExistsError when ``dst`` exists already (a duplicate queue ID)."""
        failed: set[str] = set()
        while True:
            try:
                name = self._names.popleft()
            except IndexError:
                if not self._refill(relist):
                    return False
                relist = False  # once per call
                continue
            if name in failed:
                # Listed again after it could not be taken: the spool itself refuses (a
                # read-only file system, EACCES, EIO), not another taker. A new file is tried
                # instead, which fails with the reason (451), rather than listing forever.
                return False
            src = f"{self._dir}/{name}"
            try:
                os.link(src, dst)
            except FileExistsError:
                raise
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT) and self._move(src, dst):
                    return True
                failed.add(name)
                continue  # taken by someone else since the listing (or not a file)
            try:
                os.unlink(src)
            except FileNotFoundError:
                # Another taker linked the same file and unlinked it first: it is theirs.
                os.unlink(dst)
                continue
            self._taken()
            return True

    def _move(self, src: str, dst: str) -> bool:
        """tmpfs counts a hard link against its inode limit, so when the inodes ran out (which
        is when the free files matter most) the file is renamed instead. ``rename`` replaces an
        existing ``dst``, hence the check first; check and rename are two steps, so this
        corner alone would not tell apart two puts of one queue ID in the same microsecond."""
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            return False
        self._taken()
        return True

    def _taken(self) -> None:
        with self._count_lock:
            self._count = max(0, self._count - 1)

    def _refill(self, relist: bool = False) -> bool:
        if self._clock() < self._refill_after and not relist:
            return False
        with self._refill_lock:
            # Twenty threads may find the list empty at once: one lists, the others take from
            # what it found (listing again would hand out every name once per thread).
            if self._names:
                return True
            names = self._list(self._limit)
            self._names.extend(names)
            if not names:
                self._refill_after = self._clock() + REFILL_PAUSE
            return bool(names)

    def _list(self, limit: int | None = None) -> list[str]:
        names: list[str] = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self._dir) as it:
            for e in it:
                names.append(e.name)
                if limit is not None and len(names) >= limit:
                    break
        return names

    # -- the delivering side ----------------------------------------------------------------
    def give(self, path: str, name: str) -> None:
        """The message in ``path`` is done: keep its file for reuse, or remove it when the
        pool is full. FileNotFoundError when ``path`` is gone."""
        if self._full():
            os.unlink(path)
            return
        if os.stat(path).st_size > KEEP_CONTENT_MAX:
            os.truncate(path, 0)  # before it is in free/: see the module docstring
        os.rename(path, f"{self._dir}/{name}")
        faults.crash_point("spool-recycle")
        with self._count_lock:
            self._count += 1
        self._refill_after = 0.0  # a taker in this process may list free/ again at once

    def scrub(self) -> int:
        """Remove the files that were in free/ at the previous call already (delivered
        content is not kept for longer than two calls apart); returns how many."""
        names = self._list()
        removed = 0
        for name in names:
            if name in self._seen:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                    os.unlink(f"{self._dir}/{name}")
                    removed += 1
        self._seen = set(names) - self._seen
        if removed:
            with self._count_lock:
                self._count = max(0, self._count - removed)
        return removed

    def _full(self) -> bool:
        # The accepting process takes files without telling this one, so between listings
        # the count here only grows and soon says "full" while free/ is nearly empty; then
        # delivered files would be removed and new ones created. So a count that says "full"
        # is checked against a new listing (at most every FULL_RECOUNT_PAUSE seconds while
        # free/ really is full).
        now = self._clock()
        if now >= self._recount_at or (self._count >= self._limit and now >= self._full_recount_at):
            count = len(self._list())
            with self._count_lock:
                self._count = count
                self._recount_at = now + RECOUNT_INTERVAL
                self._full_recount_at = now + FULL_RECOUNT_PAUSE
        return self._count >= self._limit

    # -- recovery -----------------------------------------------------------------------------
    def sweep(self) -> None:
        """Start and stop: remove every file in ``free/`` that holds something (delivered
        content, or a file placed there by hand) or is not a regular file; only the empty
        files an earlier version kept stay for reuse."""
        for name in self._list():
            path = f"{self._dir}/{name}"
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if st.st_size != 0 or not stat.S_ISREG(st.st_mode):
                    os.unlink(path)
        self._names.clear()
        self._seen.clear()
        self._recount_at = 0.0


class Reaper:
    """Runs ``complete(queue_id)`` for delivered messages in one background thread, and
    ``tidy()`` every ``interval`` seconds while the thread runs, busy or idle.

    The queue manager does not wait for the file system, and under load one thread working
    through a queue costs less than a thread-pool round trip per message. ``flush`` waits
    until everything put so far is done (the thread starts again on the next ``put``).
    """

    def __init__(self, complete: Callable[[str], None], *,
                 tidy: Callable[[], object] | None = None, interval: float = SCRUB_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._complete = complete
        self._tidy = tidy
        self._interval = interval
        self._clock = clock
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def put(self, queue_id: str) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="relayd-spool-reaper",
                                                daemon=True)
                self._thread.start()
        self._queue.put(queue_id)

    def _run(self) -> None:
        due = self._clock() + self._interval
        while True:
            try:
                queue_id = self._queue.get(timeout=None if self._tidy is None
                                           else max(0.0, due - self._clock()))
            except queue.Empty:
                queue_id = ""
            if queue_id is None:
                return
            if queue_id:
                try:
                    self._complete(queue_id)
                except OSError as exc:  # read-only or failing disk: recovery delivers it again
                    log.error("%s: delivered, but its spool file could not be removed: %s",
                              queue_id, exc.strerror or exc)
            if self._tidy is not None and self._clock() >= due:
                due = self._clock() + self._interval
                try:
                    self._tidy()
                except OSError as exc:
                    log.error("cannot tidy the spool's free files: %s", exc.strerror or exc)

    def flush(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(None)
                thread.join()
