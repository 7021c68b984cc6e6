"""Whole-file reads in few system calls, for the spool's worker threads.

``open(path, "rb").read()`` makes nine system calls (openat, two fstat, an ioctl for isatty,
two lseek, two reads and close); these make four (docs/performance.md, "System calls in
the worker threads"). Each call drops and takes back the GIL, and when the event loop holds
it every take-back is a hand-off between threads that costs far more than the call itself.
"""

from __future__ import annotations

import os

_CHUNK = 1 << 16


def read_fd(fd: int, size_hint: int | None = None) -> bytes:
    """The rest of the open file ``fd``: one ``read`` when the size is known or hinted."""
    size = os.fstat(fd).st_size if size_hint is None else size_hint
    # One byte more than expected: a short read of a regular file is its end (read(2)).
    data = os.read(fd, size + 1)
    if len(data) <= size:
        return data
    parts = [data]  # it grew since fstat, or the size was not known (procfs says 0)
    while chunk := os.read(fd, _CHUNK):
        parts.append(chunk)
    return b"".join(parts)


def read_whole(path: str | os.PathLike[str], size_hint: int | None = None) -> bytes:
    """The bytes of the file at ``path`` (raises OSError like ``open()`` does)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_fd(fd, size_hint)
    finally:
        os.close(fd)
