"""Storing new messages: each one's file in ``tmp/``, one flush for the batch, the renames.

Every message that arrives while the previous batch is being stored goes into the next
batch, which one worker thread stores in three passes: write each file (a free file taken
under the new name, spool/free.py), make them all durable, then rename each into
``queued/``. The listener answers 250 only after that (RFC 5321 §6.1), so nothing changes
for the client except that its reply comes sooner.

Making the files durable is the expensive part, and there are two ways:

- ``fsync(2)`` per file, as Postfix does for each queue file: from many threads it costs a
  journal commit, thread wake-ups and GIL hand-offs per file; in one thread it waits for one
  journal commit per file.
- ``syncfs(2)`` once for the batch: it writes out and commits everything pending on the
  spool's file system in one journal commit, a fraction of the CPU per file
  (docs/performance.md has the measurements).

syncfs also writes out every *other* program's pending data on the same file system, so
beside a big writer (a backup, a ``dd``) one syncfs can take most of a second. So ``auto``
(the default) uses syncfs only for batches of two or more,
only while the kernel holds less than ``DIRTY_LIMIT_KB`` of unwritten data (``Dirty`` plus
``Writeback`` in ``/proc/meminfo``, read once per batch), and not for ``SLOW_PAUSE``
seconds after a syncfs that took longer than ``SLOW_SYNC``; otherwise it fsyncs each file.

Linux reports write-back errors from syncfs only since 5.8 (before, it returned 0 even when
the data never reached the disk); on older kernels, and where libc has no syncfs, every file
gets its own fsync. When a syncfs fails, each file is fsynced on its own, so that only the
files that really failed (fsync reports each file's own write-back error) are refused.
Durability is the same either way: the file and its directory entry in ``tmp/`` are on disk
before the rename, and recovery queues every complete file left in ``tmp/`` (spool/store.py).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import logging
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from relayd import faults
from relayd.errors import SpoolError
from relayd.model import Message
from relayd.spool.cache import RecentMessages
from relayd.spool.fileio import read_whole
from relayd.spool.free import FreeFiles
from relayd.spool.records import FORMAT_VERSION, MAGIC, envelope_to_json

log = logging.getLogger("relayd.spool")

DIRTY_LIMIT_KB = 16 * 1024
SLOW_SYNC = 0.05
SLOW_PAUSE = 30.0
SYNCFS_KERNEL = (5, 8)


class Flush(enum.Enum):
    """How a batch of new files is made durable."""

    AUTO = "auto"  # syncfs when it is cheap (see the module docstring), else fsync per file
    FILE = "file"  # fsync per file, always
    FILESYSTEM = "filesystem"  # syncfs for every batch of two or more (tests, benchmarks)
    NONE = "none"  # nothing: tests that do not need durability


def kernel_reports_syncfs_errors(release: str) -> bool:
    """True for a Linux release string (``os.uname().release``) of 5.8 or later."""
    parts = release.split(".")
    try:
        return (int(parts[0]), int(parts[1].split("-")[0])) >= SYNCFS_KERNEL
    except (IndexError, ValueError):
        return False


def load_syncfs() -> Callable[[int], None] | None:
    """libc's syncfs as a function raising OSError, or None where it must not be used."""
    if not sys.platform.startswith("linux") or not kernel_reports_syncfs_errors(os.uname().release):
        return None
    import ctypes  # lazy: about 0.5 MB, and only the accepting process stores messages

    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        # ctypes releases the GIL for the call, like os.fsync.
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return syncfs


def dirty_kb(path: str = "/proc/meminfo") -> int:
    """Data the kernel still has to write, in kB (0 when it cannot tell)."""
    try:
        text = read_whole(path, size_hint=8192)  # procfs reports no size
    except OSError:
        return 0
    total = 0
    for line in text.splitlines():
        if line.startswith((b"Dirty:", b"Writeback:")):
            with contextlib.suppress(IndexError, ValueError):
                total += int(line.split()[1])
    return total


class Flusher:
    """Makes a batch of written files durable (thread-safe enough: one batch at a time runs in
    the daemon; concurrent callers only race on the advisory ``_slow_until``)."""

    def __init__(self, mode: Flush = Flush.AUTO, *,
                 syncfs: Callable[[int], None] | bool | None = True,
                 dirty: Callable[[], int] = dirty_kb,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode
        # True: look libc's syncfs up on first use; None/False: there is none.
        self._syncfs: Callable[[int], None] | bool | None = syncfs
        self._dirty = dirty
        self._clock = clock
        self._slow_until = 0.0

    def _fs(self) -> Callable[[int], None] | None:
        if self._syncfs is True:
            self._syncfs = load_syncfs()
        return self._syncfs or None

    def use_syncfs(self, files: int) -> bool:
        """Whether a batch of ``files`` files gets one syncfs instead of an fsync each."""
        if self.mode is Flush.FILE or self.mode is Flush.NONE or files < 2:
            return False
        if self.mode is Flush.AUTO and (self._clock() < self._slow_until
                                        or self._dirty() > DIRTY_LIMIT_KB):
            return False
        return self._fs() is not None

    def flush(self, fds: Sequence[int]) -> list[OSError | None]:
        """Make every file durable; for each, None or the error that kept it from being."""
        if self.mode is Flush.NONE or not fds:
            return [None] * len(fds)
        if self.use_syncfs(len(fds)):
            syncfs = self._fs()
            assert syncfs is not None
            started = self._clock()
            try:
                syncfs(fds[0])
            except OSError as exc:
                log.warning("syncfs of the spool failed (%s); syncing each new file on its own",
                            exc.strerror or exc)
            else:
                if self._clock() - started > SLOW_SYNC and self.mode is Flush.AUTO:
                    log.info("the spool's file system is busy with other writes; syncing each "
                             "new file on its own for %.0f s", SLOW_PAUSE)
                    self._slow_until = self._clock() + SLOW_PAUSE
                return [None] * len(fds)
        out: list[OSError | None] = []
        for fd in fds:
            try:
                os.fsync(fd)
            except OSError as exc:
                out.append(exc)
            else:
                out.append(None)
        return out


@dataclass(frozen=True)
class _Written:
    queue_id: str
    tmp: str
    fd: int
    message: Message


class Writer:
    """Stores batches of new messages in one spool (blocking; a worker thread calls it)."""

    def __init__(self, root: str, free: FreeFiles | None, recent: RecentMessages,
                 flusher: Flusher) -> None:
        self._root = root
        self._free = free
        self._recent = recent
        self.flusher = flusher

    def put_batch(self, items: Sequence[tuple[Message, str]]) -> list[str | SpoolError]:
        """Store each (message, queue ID); for each, the ID once it is durable in ``queued/``,
        or the SpoolError that kept it out (its temporary file is removed: nothing is
        half-stored). One item's failure does not affect the others."""
        results: list[str | SpoolError] = []
        written: list[tuple[int, _Written]] = []
        for message, qid in items:
            try:
                written.append((len(results), self._write(message, qid)))
                results.append(qid)
            except SpoolError as exc:
                results.append(exc)
        errors = self.flusher.flush([w.fd for _, w in written])
        for k, (_, w) in enumerate(written):
            try:
                os.close(w.fd)
            except OSError as exc:  # NFS may report a failed write only here
                errors[k] = errors[k] or exc
        if written:
            faults.crash_point("spool-fsync")
        for (i, w), error in zip(written, errors, strict=True):
            try:
                if error is not None:
                    raise error
                os.rename(w.tmp, f"{self._root}/queued/{w.queue_id}.msg")
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(w.tmp)
                results[i] = SpoolError(f"cannot store message: {exc.strerror or exc}")
                continue
            self._recent.remember(w.queue_id, w.message)
        return results

    def _write(self, message: Message, qid: str) -> _Written:
        """The message's file in tmp/, written and still open (not yet durable)."""
        header = json.dumps({"version": FORMAT_VERSION, "id": qid,
                             "envelope": envelope_to_json(message.envelope),
                             "size": len(message.content), "crc32": zlib.crc32(message.content)},
                            ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        tmp = f"{self._root}/tmp/{qid}.msg"
        try:
            fd, reused = self._open_tmp(tmp)
        except OSError as exc:
            raise SpoolError(f"cannot store message: {exc.strerror or exc}") from exc
        try:
            data = b"".join((MAGIC, str(len(header)).encode(), b"\n", header, b"\n",
                             message.content))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if reused:  # a longer delivered message's tail must not follow this one
                os.ftruncate(fd, len(data))
            faults.fail_point("spool-write")
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise SpoolError(f"cannot store message: {exc.strerror or exc}") from exc
        return _Written(qid, tmp, fd, message)

    def _open_tmp(self, tmp: str) -> tuple[int, bool]:
        """A descriptor on a new file ``tmp`` and whether it is a reused one (a free file taken
        under that name, still holding a delivered message: overwritten from its first byte
        and cut to length, spool/free.py), else a new, empty one. Raises FileExistsError when
        ``tmp`` exists (a duplicate ID: the other file stays)."""
        free = self._free
        if free is None or not free.take(tmp):
            try:
                return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), False
            except OSError as exc:
                # Out of inodes: the free files hold some, look again now (not after a pause).
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or free is None \
                        or not free.take(tmp, relist=True):
                    raise
        try:
            # No O_TRUNC: freeing the old data blocks only to allocate them again for the new
            # content cost more than the write itself (spool/free.py).
            return os.open(tmp, os.O_WRONLY), True
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
