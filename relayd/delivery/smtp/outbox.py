"""The ``outbox:`` smarthost: writes each message as one ``.eml`` file instead of sending it.

For development and previews (``make run``). Each file appears atomically: written to a
temporary name, fsynced, linked to its final name (never overwriting an earlier copy) and the
directory fsynced, all in a worker thread so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path


def _header_safe(text: str) -> str:
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())


def envelope_headers(mail_from: str, rcpts: Sequence[str]) -> bytes:
    """``Return-Path`` and ``Envelope-To`` (as Exim writes them) so a preview shows the envelope."""
    lines = [f"Return-Path: <{_header_safe(mail_from)}>",
             "Envelope-To: " + ", ".join(_header_safe(r) for r in rcpts)]
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def write_eml(directory: Path, queue_id: str, data: bytes) -> Path:
    """Blocking: write ``data`` as ``<queue_id>.eml`` (or ``<queue_id>.<n>.eml`` if taken)."""
    directory.mkdir(parents=True, exist_ok=True)
    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in queue_id) or "message"
    tmp = directory / f".{safe_id}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        n = 0
        while True:
            final = directory / (f"{safe_id}.eml" if n == 0 else f"{safe_id}.{n}.eml")
            try:
                # link() fails if the name exists: an earlier copy is never replaced.
                os.link(tmp, final)
                break
            except FileExistsError:
                n += 1
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the new name is durable only once the directory is synced
    finally:
        os.close(dir_fd)
    return final


async def write_message(directory: Path, queue_id: str, content: bytes, mail_from: str,
                        rcpts: Sequence[str]) -> Path:
    """Write one message (envelope headers + content) to the outbox; returns its path."""
    data = envelope_headers(mail_from, rcpts) + content
    return await asyncio.to_thread(write_eml, directory, queue_id, data)
