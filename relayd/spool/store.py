"""The durable queue: the only module that touches spool files.

Layout under ``spool.path``::

    tmp/       writes in progress; recover() keeps the complete ones, removes the rest
    free/      files of delivered messages, overwritten by the next ones (spool/free.py)
    queued/    waiting for delivery          held/    taken out of delivery by an operator
    active/    claimed by a delivery now     failed/  given up on (kept until deleted/retried)
    meta/      ID.json: attempts, history, next attempt, remaining recipients (mutable)
    poke/      empty files named by ID: "look at this one again" from `relayd queue`
    corrupt/   files set aside: unreadable, of another format version, or altered content
    lock       flock held by the running daemon (a second daemon refuses to start)

A message file ``ID.msg`` holds one header line ``RELAYD-SPOOL 1 <n>``, ``n`` bytes of JSON
(the envelope, the content's length and CRC-32), a newline, then the exact message bytes to
send (CRLF, not dot-stuffed). It is written once: tmp/ -> flushed to disk -> rename into
queued/, and only then does the listener answer 250 (RFC 5321 §6.1: accepting a message
means taking responsibility for it). Messages arriving together are stored as one batch with
one flush (``put_batch``, spool/write.py): an fsync per file, or one syncfs for the batch.

One flush per file, like Postfix's fsync of its queue file: on a journaling file system
(ext4, XFS, btrfs) making a new file durable also commits its directory entry in tmp/, so
once the flush returns the message survives a power loss in tmp/ or, if the later rename was
committed too, in queued/. ``recover()`` therefore moves every *complete* file in tmp/
(length and CRC-32 match the header) into queued/ and removes only the incomplete ones,
which were never acknowledged. Fsyncing queued/ after the rename as well would cost a second
journal commit per message on the acceptance path and buy nothing this does not. Every state
change is one ``rename``, which is atomic, so `relayd queue ...` in another process and the
daemon arbitrate by whoever renames first. One file per message (instead of an .eml plus a
.json sidecar) halves the flushes on the acceptance path; the mutable metadata lives in
``meta/`` and is only written on the slow paths (deferral, failure, operator commands).
The file of a delivered message is kept in ``free/`` for the next message to be written
into: allocating an inode was the costliest step of storing one (spool/free.py).

All methods are blocking; the daemon calls them through an executor.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from relayd import faults
from relayd.errors import SpoolError, UnknownMessage
from relayd.model import Message, State
from relayd.spool.cache import RECENT_CACHE_BYTES, RecentMessages
from relayd.spool.fileio import read_fd, read_whole
from relayd.spool.free import FreeFiles, Reaper
from relayd.spool.records import (
    FORMAT_VERSION,
    MAGIC,
    MAX_HEADER,
    RETRY_POKE,
    Attempt,
    Claimed,
    Entry,
    Meta,
    Poke,
    UnknownVersion,
    check_header,
    envelope_from_json,
    meta_from_json,
    meta_to_json,
    new_queue_id,
    parse_file,
    valid_id,
)
from relayd.spool.scan import QueuedScan, count_and_oldest, iter_ids
from relayd.spool.write import Flush, Flusher, Writer

__all__ = ["FORMAT_VERSION", "MAX_RECOVERIES", "RECENT_CACHE_BYTES", "Attempt", "Claimed", "Entry", "Meta",
           "Poke", "QueuedScan", "Spool", "new_queue_id"]

log = logging.getLogger("relayd.spool")

MAX_RECOVERIES = 5
_STATE_DIRS = (State.QUEUED, State.ACTIVE, State.HELD, State.FAILED)
_HEADER_READ = 4096  # bytes read at first for a header (envelopes are usually far smaller)


class Spool:
    """Durable message store with the states queued / active / held / failed."""

    def __init__(self, path: Path, *, fsync: bool = True, keep_recent: bool = True,
                 reuse_files: bool = True, flush: Flush = Flush.AUTO) -> None:
        self.path = Path(path)
        self._root = str(self.path)
        self._free = FreeFiles(f"{self._root}/free") if reuse_files else None
        self._reaper = Reaper(self.complete, tidy=self._free.scrub if self._free else None)
        self._fsync = fsync
        self._lock_fd: int | None = None
        self._dir_fds: dict[str, int] = {}
        self.recent = RecentMessages(enabled=keep_recent)
        self._writer = Writer(self._root, self._free, self.recent,
                              Flusher(flush if fsync else Flush.NONE))

    # -- set-up ------------------------------------------------------------------------------
    def ensure_dirs(self) -> None:
        """Create the spool directories (mode 0700: mail content is private)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            for name in ("tmp", "free", "meta", "poke", "corrupt", *(s.value for s in _STATE_DIRS)):
                (self.path / name).mkdir(exist_ok=True, mode=0o700)
        except OSError as exc:
            raise SpoolError(f"cannot create the spool at {self.path}: {exc.strerror or exc}") from exc

    def lock(self) -> None:
        """Take the daemon lock; SpoolError if another relayd already runs on this spool."""
        self.ensure_dirs()
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SpoolError(f"another relayd is already running on the spool {self.path}") from exc
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def close(self) -> None:
        self.flush_completions()
        for fd in self._dir_fds.values():
            os.close(fd)
        self._dir_fds.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _own(self, fd: int) -> None:
        """Files written by root (an operator running `relayd queue` with sudo) get the spool
        owner, so the daemon's unprivileged user can still read and rename them."""
        if os.geteuid() != 0:
            return
        st = os.stat(self.path)
        if st.st_uid != 0 or st.st_gid != 0:
            os.fchown(fd, st.st_uid, st.st_gid)

    def _dir(self, state: State | str) -> Path:
        return self.path / (state.value if isinstance(state, State) else state)

    # Plain strings, not Path objects: these run several times per message and pathlib's
    # joining and parsing showed up in the I/O threads' profile.
    def _file(self, state: State, queue_id: str) -> str:
        return f"{self._root}/{state.value}/{queue_id}.msg"

    def _meta_file(self, queue_id: str) -> str:
        return f"{self._root}/meta/{queue_id}.json"

    def _sync_dir(self, name: str) -> None:
        if not self._fsync:
            return
        fd = self._dir_fds.get(name)
        if fd is None:
            fd = os.open(self.path / name, os.O_RDONLY | os.O_DIRECTORY)
            self._dir_fds[name] = fd
        os.fsync(fd)

    # -- acceptance --------------------------------------------------------------------------
    def put(self, message: Message, queue_id: str | None = None) -> str:
        """Store ``message`` durably in ``queued/`` and return its queue ID.

        Returns only after the file is on disk (see the module docstring for why the rename
        needs no fsync of its own). On any error the temporary file is removed and SpoolError
        is raised: nothing is half-stored.
        """
        qid = queue_id or new_queue_id(message.envelope.received_at or None)
        result = self.put_batch([(message, qid)])[0]
        if isinstance(result, SpoolError):
            raise result
        return result

    def put_batch(self, items: Sequence[tuple[Message, str]]) -> builtins.list[str | SpoolError]:
        """Store several messages with one flush (spool/write.py); for each (message, ID), the
        ID once it is durable in ``queued/`` or the SpoolError that kept it out."""
        return self._writer.put_batch(items)

    # -- reading -----------------------------------------------------------------------------
    def _read_header(self, path: str | Path) -> tuple[dict[str, Any], int, int]:
        """(header json, offset of content, total file size)."""
        # os.read, not open(): one read nearly always holds the whole header, and start-up
        # reads this for every queued message before the listener binds.
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.read(fd, _HEADER_READ)
            end = data.find(b"\n", 0, 64)
            if not data.startswith(MAGIC) or end < 0:
                raise ValueError("not a relayd spool file")
            n = int(data[len(MAGIC):end])
            if not 0 < n < MAX_HEADER:
                raise ValueError("bad header length")
            want = end + n + 2
            while len(data) < want and (more := os.read(fd, want - len(data))):
                data += more
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        raw = data[end + 1:want]
        if len(raw) != n + 1 or raw[-1:] != b"\n":
            raise ValueError("truncated header")
        header = json.loads(raw[:-1])
        check_header(header, size - want)
        return header, want, size

    def _read_meta(self, queue_id: str) -> Meta:
        try:  # most messages have no meta file: os.open fails cheaper than open()
            fd = os.open(self._meta_file(queue_id), os.O_RDONLY)
        except FileNotFoundError:
            return Meta()
        try:
            raw = read_fd(fd)
        finally:
            os.close(fd)
        return meta_from_json(json.loads(raw))

    def _locate(self, queue_id: str) -> tuple[State, str]:
        if not valid_id(queue_id):
            raise UnknownMessage(queue_id)
        for state in _STATE_DIRS:
            p = self._file(state, queue_id)
            if os.path.exists(p):
                return state, p
        raise UnknownMessage(queue_id)

    def _entry(self, queue_id: str, state: State, path: str) -> Entry:
        header, offset, size = self._read_header(path)
        return Entry(id=queue_id, state=state, envelope=envelope_from_json(header["envelope"]),
                     size=size - offset, created=float(header["envelope"].get("received_at", 0.0)),
                     meta=self._read_meta(queue_id))

    def get(self, queue_id: str) -> Entry:
        """The entry for ``queue_id`` in whatever state it is; UnknownMessage if none."""
        for _ in range(3):  # the file may move between locate and read; look again
            state, path = self._locate(queue_id)
            try:
                return self._entry(queue_id, state, path)
            except FileNotFoundError:
                continue
        raise UnknownMessage(queue_id)

    def read_content(self, queue_id: str, state: State | None = None) -> bytes:
        """The exact message bytes (without the spool header); ValueError when the file is
        unreadable or its content is not what was accepted (records.check_content)."""
        m = self.recent.pop(queue_id)  # just stored: no disk read (and later ones read the file)
        if m is not None:
            return m.content
        path = self._file(state, queue_id) if state else self._locate(queue_id)[1]
        return parse_file(read_whole(path))[1]

    def ids(self, state: State) -> builtins.list[str]:
        """Queue IDs currently in ``state`` (a directory listing; cheap)."""
        return builtins.list(self._iter_ids(state))

    def _iter_ids(self, state: State) -> Iterator[str]:
        return iter_ids(self._dir(state))

    def list(self, state: State | None = None) -> list[Entry]:
        """Entries in ``state`` (or every state), oldest first; unreadable files are skipped."""
        out: list[Entry] = []
        for st in (_STATE_DIRS if state is None else (state,)):
            for qid in self.ids(st):
                with contextlib.suppress(OSError, ValueError, KeyError):
                    out.append(self._entry(qid, st, self._file(st, qid)))
        out.sort(key=lambda e: (e.created, e.id))
        return out

    def counts(self) -> dict[State, int]:
        return {st: sum(1 for _ in self._iter_ids(st)) for st in _STATE_DIRS}

    def snapshot(self) -> tuple[dict[State, int], float | None]:
        """(counts per state, acceptance time of the oldest queued or active message), in
        one pass over each directory and without a list of IDs (see count_and_oldest)."""
        scans = {st: count_and_oldest(self._dir(st)) for st in _STATE_DIRS}
        times = [scans[st][1] for st in (State.QUEUED, State.ACTIVE)]
        oldest = min((t for t in times if t is not None), default=None)
        return {st: n for st, (n, _) in scans.items()}, None if oldest is None else oldest / 1e6

    # -- transitions (daemon) ------------------------------------------------------------------
    def _move(self, queue_id: str, src: State, dst: State) -> bool:
        try:
            os.rename(self._file(src, queue_id), self._file(dst, queue_id))
        except FileNotFoundError:
            return False
        self._sync_dir(dst.value)
        return True

    def claim(self, queue_id: str) -> Claimed | None:
        """Move a queued message to active for delivery and return it with its content;
        None if it is no longer queued (or was unreadable or altered, and set aside).

        A message this Spool stored recently comes from memory (spool/cache.py) and leaves
        it: later attempts read the file. Otherwise the whole file is read once, since the
        delivery that follows needs the content as well as the envelope."""
        try:
            os.rename(self._file(State.QUEUED, queue_id), self._file(State.ACTIVE, queue_id))
        except FileNotFoundError:
            self.recent.pop(queue_id)
            return None
        try:
            m = self.recent.pop(queue_id)
            if m is not None:  # the file holds exactly this envelope; only meta/ can have changed
                entry = Entry(id=queue_id, state=State.ACTIVE, envelope=m.envelope,
                              size=len(m.content), created=m.envelope.received_at,
                              meta=self._read_meta(queue_id))
                return Claimed(entry, m.content)
            # In the delivery process (relayd/daemon/child.py) nothing is in memory yet. The
            # CRC-32 is checked on this read, the one whose bytes are sent (parse_file).
            header, content = parse_file(read_whole(self._file(State.ACTIVE, queue_id)))
            envelope = envelope_from_json(header["envelope"])
            entry = Entry(id=queue_id, state=State.ACTIVE, envelope=envelope, size=len(content),
                          created=float(header["envelope"].get("received_at", 0.0)),
                          meta=self._read_meta(queue_id))
            return Claimed(entry, content)
        except (OSError, ValueError, KeyError) as exc:
            self._set_aside(State.ACTIVE, queue_id, f"unreadable: {exc}")
            return None

    def write_meta(self, queue_id: str, meta: Meta) -> None:
        """Replace the metadata durably (tmp -> fsync -> rename)."""
        data = json.dumps(meta_to_json(meta), ensure_ascii=False).encode("utf-8")
        tmp = self.path / "tmp" / f"{queue_id}.json.{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                self._own(fd)
                os.write(fd, data)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self._meta_file(queue_id))
            self._sync_dir("meta")
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise SpoolError(f"cannot update {queue_id}: {exc.strerror or exc}") from exc

    def requeue(self, queue_id: str, meta: Meta) -> None:
        """After a deferred attempt: record ``meta`` and move active -> queued.

        The move happens even when the metadata cannot be written (disk full): left in active/
        nothing would deliver the message before the next start. The cost is that it keeps
        the older metadata (recipients delivered since may be sent again: at-least-once)."""
        try:
            self.write_meta(queue_id, meta)
        finally:
            self._move(queue_id, State.ACTIVE, State.QUEUED)

    def fail(self, queue_id: str, meta: Meta, src: State = State.ACTIVE) -> None:
        """Give up: record ``meta`` and move to failed (kept until deleted or retried)."""
        self.write_meta(queue_id, meta)
        self._move(queue_id, src, State.FAILED)

    def complete(self, queue_id: str) -> None:
        """Every recipient is done: remove the message (its file is kept in free/ for the
        next message to overwrite, see spool/free.py)."""
        self.recent.pop(queue_id)
        path = self._file(State.ACTIVE, queue_id)
        with contextlib.suppress(FileNotFoundError):
            if self._free is None:
                os.unlink(path)
            else:
                self._free.give(path, queue_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._meta_file(queue_id))

    def complete_later(self, queue_id: str) -> None:
        """``complete()`` in a background thread; returns at once.

        The queue manager does not need to wait for the unlinks, and under load one thread
        working through a queue of them costs less than a thread-pool round trip each. A
        crash before the unlink leaves the message in active/, so it is delivered again
        after recovery: at least once, never lost (RFC 5321 §6.1 prefers a duplicate).
        ``flush_completions()`` (and ``close()``) wait until every one is done.
        """
        self._reaper.put(queue_id)

    def flush_completions(self) -> None:
        """Wait until every ``complete_later`` has been carried out, then remove the files
        kept in free/ with delivered content (relayd is stopping: see spool/free.py)."""
        self._reaper.flush()
        if self._free is not None:
            self._free.sweep()

    # -- operator commands (any process) -------------------------------------------------------
    def _poke(self, queue_id: str, *, retry: bool = False) -> None:
        # A retry's poke carries its kind in the name: the daemon lifts the pause of the
        # smarthosts for it, as `postqueue -f` does (SPEC "queue retry").
        name = queue_id + RETRY_POKE if retry else queue_id
        with contextlib.suppress(OSError):
            fd = os.open(self.path / "poke" / name, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                self._own(fd)
            finally:
                os.close(fd)

    def take_pokes(self) -> builtins.list[Poke]:
        """Messages changed by `relayd queue` since the last call (the daemon re-reads them)."""
        out: dict[str, bool] = {}
        for name in os.listdir(self.path / "poke"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path / "poke" / name)
                qid = name.removesuffix(RETRY_POKE)
                out[qid] = out.get(qid, False) or qid != name
        return [Poke(qid, retry) for qid, retry in out.items()]

    def hold(self, queue_id: str) -> None:
        state, _ = self._locate(queue_id)
        if state is State.HELD:
            return
        if state is not State.QUEUED or not self._move(queue_id, State.QUEUED, State.HELD):
            now_in = "being delivered" if state in (State.ACTIVE, State.QUEUED) else state.value
            raise SpoolError(f"{queue_id} is {now_in}; only queued messages can be held "
                             "(try again in a moment)")
        self._poke(queue_id)

    def release(self, queue_id: str, now: float | None = None) -> None:
        state, _ = self._locate(queue_id)
        if state is not State.HELD:
            raise SpoolError(f"{queue_id} is {state.value}, not held")
        meta = self._read_meta(queue_id)
        self.write_meta(queue_id, replace(meta, next_attempt=time.time() if now is None else now))
        if not self._move(queue_id, State.HELD, State.QUEUED):
            raise UnknownMessage(queue_id)
        self._poke(queue_id)

    def retry(self, queue_id: str, now: float | None = None) -> None:
        """Make a message due now; failed messages go back to queued with a fresh max_age."""
        now = time.time() if now is None else now
        state, _ = self._locate(queue_id)
        if state is State.FAILED:
            meta = self._read_meta(queue_id)
            pending = tuple(meta.failed_rcpts) or (meta.pending or None)
            self.write_meta(queue_id, replace(meta, next_attempt=now, retried_at=now, pending=pending,
                                              failed_rcpts=()))
            if not self._move(queue_id, State.FAILED, State.QUEUED):
                raise UnknownMessage(queue_id)
        elif state is State.QUEUED:
            # No rename through held/ as a lock: a `relayd queue retry` killed (or interrupted
            # with ^C) between the two renames stranded the message in held/, where nothing
            # delivers it. The metadata write is one atomic rename on its own. If the daemon
            # claims the message meanwhile it is being retried already; its own metadata write
            # after the attempt supersedes this one.
            meta = self._read_meta(queue_id)
            self.write_meta(queue_id, replace(meta, next_attempt=now))
            faults.crash_point("queue-command")
            try:
                self._locate(queue_id)
            except UnknownMessage:  # delivered and removed meanwhile: drop the stray metadata
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._meta_file(queue_id))
        elif state is State.HELD:
            raise SpoolError(f"{queue_id} is held; use 'relayd queue release' first")
        self._poke(queue_id, retry=True)

    def delete(self, queue_id: str) -> None:
        self.recent.pop(queue_id)
        state, path = self._locate(queue_id)
        if state is State.ACTIVE:
            raise SpoolError(f"{queue_id} is being delivered right now; try again in a moment")
        try:
            os.unlink(path)
        except FileNotFoundError as exc:
            raise UnknownMessage(queue_id) from exc
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._meta_file(queue_id))
        self._sync_dir(state.value)
        self._poke(queue_id)

    # -- crash recovery -------------------------------------------------------------------------
    def _set_aside(self, state: State | str, queue_id: str, why: str) -> None:
        dst = self.path / "corrupt" / f"{queue_id}.msg"
        name = state.value if isinstance(state, State) else state  # "tmp" at start-up
        with contextlib.suppress(OSError):
            os.rename(f"{self._root}/{name}/{queue_id}.msg", dst)
        log.error("%s: spool file set aside in %s: %s", queue_id, dst.parent, why)

    def recover(self, now: float | None = None, *,
                check_queued: bool = True) -> builtins.list[str]:
        """Start-up recovery after a crash; returns the IDs moved from active back to queued.

        - tmp/: a complete file (length and CRC-32 as its header says) may have been
          acknowledged, its rename into queued/ lost with the crash: it is moved there (one
          of another format version to corrupt/). The rest were never acknowledged: removed.
        - active/: back to queued; a message that was in flight MAX_RECOVERIES times goes to failed
          with a reason instead of crashing the relay forever (Mailman's MAX_BAK_COUNT).
        - unreadable files anywhere are moved to corrupt/ with a log line and never block others.
          ``check_queued=False`` leaves queued/ to the queue manager, whose first scan reads
          every queued file anyway (``schedule_rows``) and sets the unreadable ones aside.
        """
        now = time.time() if now is None else now
        self.ensure_dirs()
        for name in os.listdir(self.path / "tmp"):
            self._recover_tmp(name)
        if self._free is not None:
            self._free.sweep()
        recovered = self.recover_active(now)
        states = (State.QUEUED, State.HELD, State.FAILED) if check_queued else (State.HELD, State.FAILED)
        for state in states:
            for qid in self._iter_ids(state):  # one at a time: see _iter_ids
                try:
                    self._read_header(self._file(state, qid))
                    self._read_meta(qid)
                except (OSError, ValueError, KeyError) as exc:
                    self._set_aside(state, qid, f"unreadable: {exc}")
        return recovered

    def recover_active(self, now: float | None = None) -> builtins.list[str]:
        """Messages left in active/ by a delivery that was cut short go back to queued/ (see
        ``recover``); returns their IDs. Safe while the listener stores new mail."""
        now = time.time() if now is None else now
        recovered: builtins.list[str] = []
        for qid in self.ids(State.ACTIVE):
            if self._emptied(qid):
                continue
            try:
                meta = self._read_meta(qid)
                self._read_header(self._file(State.ACTIVE, qid))
            except (OSError, ValueError, KeyError) as exc:
                self._set_aside(State.ACTIVE, qid, f"unreadable after a crash: {exc}")
                continue
            meta = replace(meta, recoveries=meta.recoveries + 1)
            if meta.recoveries >= MAX_RECOVERIES:
                self.fail(qid, replace(meta, last_error=f"delivery was interrupted {meta.recoveries} "
                                       "times by a crash of relayd; inspect and retry"))
                log.error("%s: failed after %d interrupted deliveries", qid, meta.recoveries)
                continue
            self.requeue(qid, replace(meta, next_attempt=now))
            recovered.append(qid)
        return recovered

    def _emptied(self, queue_id: str) -> bool:
        """An empty file in active/ is a delivered message whose file was being kept for
        reuse when relayd stopped (spool/free.py): nothing else puts an empty file there.
        It is removed with its metadata; True when that was the case."""
        path = self._file(State.ACTIVE, queue_id)
        try:
            if os.stat(path).st_size != 0:
                return False
            os.unlink(path)
        except FileNotFoundError:
            return True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._meta_file(queue_id))
        log.info("%s: delivered before relayd stopped; removed its emptied spool file", queue_id)
        return True

    def _recover_tmp(self, name: str) -> None:
        path = self.path / "tmp" / name
        qid = name[:-4]
        try:
            if not name.endswith(".msg") or not valid_id(qid):
                raise ValueError("not a message file")
            header, _ = parse_file(read_whole(path))  # checks the length and CRC-32
            if "crc32" not in header:
                raise ValueError("no checksum")
            if header.get("id", qid) != qid:  # a reused file not yet overwritten (spool/free.py)
                raise ValueError("another message's file")
            if os.path.exists(self._file(State.QUEUED, qid)):
                raise ValueError("already queued")
            os.rename(path, self._file(State.QUEUED, qid))
            self._sync_dir(State.QUEUED.value)
            log.warning("%s: recovered a completely written message from tmp/ (the crash came "
                        "before its rename); it will be delivered", qid)
        except UnknownVersion as exc:  # a newer relayd may have acknowledged it: kept, not removed
            self._set_aside("tmp", qid, f"unreadable: {exc}")
        except (OSError, ValueError, KeyError, TypeError):
            with contextlib.suppress(OSError):
                os.unlink(path)

    def scan_queued(self) -> QueuedScan:
        """The IDs in queued/, a batch at a time (see QueuedScan)."""
        return QueuedScan(self._iter_ids(State.QUEUED))

    def schedule_rows(self, queue_ids: Iterable[str]) -> builtins.list[tuple[str, float | None, bool]]:
        """(id, next_attempt, priority) of each queued message in ``queue_ids``, for the
        scheduler; files that are gone are left out, unreadable ones set aside."""
        rows = []
        for qid in queue_ids:
            try:
                entry = self._entry(qid, State.QUEUED, self._file(State.QUEUED, qid))
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError) as exc:
                self._set_aside(State.QUEUED, qid, f"unreadable: {exc}")
                continue
            rows.append((qid, entry.next_attempt, entry.envelope.priority))
        return rows

