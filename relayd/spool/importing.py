"""``relayd queue import DIR``: another spool's messages moved into this one, each exactly once.

For a fleet node that died with mail on its disk (docs/fleet.md): the messages of its spool
directory (queued/, held/, failed/, active/ and the complete files of tmp/, as its own
start-up recovery would find them) become this spool's, each with its envelope, history and
attempts, under its own queue ID unless that ID is taken here; queued ones are due at once.
The daemon may run meanwhile: each imported message is announced with a poke file, as
`relayd queue retry` does.

Never lost and never twice, whatever moment a crash (or ^C) interrupts it, because of the
order of the steps for each message, in this spool's ``import/`` directory, which nothing
else touches (the daemon's recovery does not know it):

1. ``import/X.msg`` and ``import/X.json`` (content, metadata) are written and flushed;
2. ``import/X.from`` (which source file it is) is written and flushed: from here on the
   message is this spool's, and the next run finishes the steps below instead of importing
   the source file again (files of step 1 without it are removed: the source still has them);
3. the metadata and then the file are renamed into ``meta/`` and ``queued/`` (held/, failed/);
4. the source file and its metadata are removed (only now: the copy is durable here);
5. ``import/X.from`` is removed.

The source spool's lock is taken for the whole run, so a relayd still running on it (or
started on it meanwhile) and an import never both use its files. Blocking; a command.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from relayd.errors import SpoolError
from relayd.model import State
from relayd.spool.records import (
    MAGIC,
    Meta,
    meta_from_json,
    meta_to_json,
    new_queue_id,
    parse_file,
    valid_id,
)
from relayd.spool.store import MAX_RECOVERIES, Spool

IMPORT_DIR = "import"
# Where each source directory's messages go here (tmp/ and active/ as start-up recovery would).
_SOURCES = (("queued", State.QUEUED), ("active", State.QUEUED), ("tmp", State.QUEUED),
            ("held", State.HELD), ("failed", State.FAILED))


@dataclass
class Imported:
    """What one run did: (source ID, ID here, state) per message, and what it left alone."""

    messages: list[tuple[str, str, State]] = field(default_factory=list)
    finished: int = 0                                               # interrupted runs' messages
    skipped: list[tuple[str, str]] = field(default_factory=list)    # (source file, why)


class _Durable:
    """Writes that are on disk when they return (like the spool's own), owned like the spool."""

    def __init__(self, root: Path, fsync: bool) -> None:
        self.root = root
        self.fsync = fsync
        st = os.stat(root)
        # Run as root (sudo), files get the spool's owner so the daemon's user can rename them.
        self.owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 and (st.st_uid or st.st_gid) else None

    def write(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if self.owner is not None:
                os.fchown(fd, *self.owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def sync_dir(self, path: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _locked(path: Path, busy: str) -> Iterator[None]:
    """An exclusive flock on ``path`` without waiting; SpoolError(``busy``) if taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SpoolError(busy) from None
            raise
        yield
    finally:
        os.close(fd)


def import_spool(dest: Path, source: Path, *, now: float, fsync: bool = True) -> Imported:
    """Move every message of the spool at ``source`` into the spool at ``dest``."""
    dest, source = dest.resolve(), source.resolve()
    if dest == source:
        raise SpoolError(f"{source} is this node's own spool")
    if not any((source / d).is_dir() for d, _ in _SOURCES):
        raise SpoolError(f"{source} is not a relayd spool (no queued/, active/, held/, failed/)")
    Spool(dest).ensure_dirs()  # a missing meta/ or queued/ must fail a rename, not skip it
    jdir = dest / IMPORT_DIR
    jdir.mkdir(mode=0o700, exist_ok=True)
    io = _Durable(dest, fsync)
    done = Imported()
    with _locked(jdir / ".lock", f"another 'relayd queue import' is running into {dest}"), \
            _locked(source / "lock", f"a relayd is running on {source}: stop it first (the "
                    "import is for the spool of a node that is down)"):
        done.finished = _finish_interrupted(dest, io)
        for sub, state in _SOURCES:
            folder = source / sub
            if not folder.is_dir():
                continue
            for name in sorted(os.listdir(folder)):
                qid = name.removesuffix(".msg")
                if name.endswith(".msg") and valid_id(qid):
                    _import_one(dest, source, io, sub, qid, state, now, done)
    return done


def _finish_interrupted(dest: Path, io: _Durable) -> int:
    """Steps 3-5 for every message an interrupted run had made this spool's (step 2);
    the files of a step 1 it never committed are removed (their source is intact)."""
    jdir = dest / IMPORT_DIR
    names = os.listdir(jdir)
    finished = 0
    for name in list(names):
        if name.endswith(".from"):
            try:
                record = json.loads((jdir / name).read_text(encoding="utf-8"))
            except ValueError:
                # Torn by a crash before it was flushed: never committed, so the source still
                # has the message and none of it was renamed here. Its files go below.
                (jdir / name).unlink()
                names.remove(name)
                continue
            _finish(dest, io, name.removesuffix(".from"), record)
            finished += 1
    for name in names:
        if name.endswith((".msg", ".json")) and f"{name.rsplit('.', 1)[0]}.from" not in names:
            with contextlib.suppress(FileNotFoundError):
                (jdir / name).unlink()
    return finished


def _taken(dest: Path, qid: str) -> bool:
    return any(os.path.exists(dest / d / f"{qid}.msg") for d in ("queued", "active", "held", "failed")) \
        or os.path.exists(dest / IMPORT_DIR / f"{qid}.msg") or os.path.exists(dest / "meta" / f"{qid}.json")


def _import_one(dest: Path, source: Path, io: _Durable, sub: str, qid: str, state: State,
                now: float, done: Imported) -> None:
    src = source / sub / f"{qid}.msg"
    src_meta = source / "meta" / f"{qid}.json"
    try:
        data = src.read_bytes()
    except FileNotFoundError:
        return
    if not data and sub == "active":
        return  # a delivered message's file kept for reuse (spool/free.py): nothing to send
    try:
        header, content = parse_file(data)  # also refuses altered content, other versions
        if sub == "tmp" and "crc32" not in header:
            raise ValueError("an incomplete write, never acknowledged")
        if header.get("id", qid) != qid:
            raise ValueError("another message's reused file")
        meta = meta_from_json(json.loads(src_meta.read_bytes())) if src_meta.exists() else Meta()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        done.skipped.append((str(src), str(exc)))
        return
    if state is State.QUEUED:
        # Due now: the mail has waited for the node's death to be noticed long enough.
        meta = replace(meta, next_attempt=now)
    if sub == "active":  # its delivery was cut short when the node died, as after a crash
        meta = replace(meta, recoveries=meta.recoveries + 1)
        if meta.recoveries >= MAX_RECOVERIES:
            state = State.FAILED
            meta = replace(meta, last_error=f"delivery was interrupted {meta.recoveries} times "
                           "by a crash of relayd; inspect and retry")
    new = qid
    while _taken(dest, new):
        new = new_queue_id(now)
    jdir = dest / IMPORT_DIR
    head = json.dumps({**header, "id": new}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    io.write(jdir / f"{new}.msg", b"".join((MAGIC, str(len(head)).encode(), b"\n", head, b"\n", content)))
    io.write(jdir / f"{new}.json", json.dumps(meta_to_json(meta), ensure_ascii=False).encode("utf-8"))
    record = {"source": str(src), "source_meta": str(src_meta), "state": state.value, "id": qid}
    io.write(jdir / f"{new}.from", json.dumps(record).encode("utf-8"))
    io.sync_dir(jdir)  # the commit point: from here on the message is this spool's
    _finish(dest, io, new, record)
    done.messages.append((qid, new, state))


def _finish(dest: Path, io: _Durable, new: str, record: dict[str, str]) -> None:
    """Steps 3-5 for the committed message ``new`` (each one safe to repeat)."""
    jdir = dest / IMPORT_DIR
    state = record["state"]
    # Only a file already moved (by the interrupted run) is skipped: any other failure
    # raises before the source is touched.
    if os.path.exists(jdir / f"{new}.json"):
        os.rename(jdir / f"{new}.json", dest / "meta" / f"{new}.json")
        io.sync_dir(dest / "meta")
    if os.path.exists(jdir / f"{new}.msg"):
        os.rename(jdir / f"{new}.msg", dest / state / f"{new}.msg")
        io.sync_dir(dest / state)
    for path in (Path(record["source"]), Path(record["source_meta"])):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            io.sync_dir(path.parent)
    (jdir / f"{new}.from").unlink()
    io.sync_dir(jdir)
    # The running daemon looks at poked IDs within a second (as after `relayd queue retry`).
    with contextlib.suppress(OSError):
        io.write(dest / "poke" / new, b"")
