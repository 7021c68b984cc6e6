"""Encrypted OAuth state on disk: per-smarthost token cache, refresh token and MSAL cache.

Files live in ``<state_dir>/oauth/`` with mode 0600, each one Fernet-encrypted JSON made with
the key ring at ``secrets.key_file`` (so a backup or a copied state directory does not leak a
token). Writes are atomic (temp file, fsync, rename) and a per-smarthost ``flock`` keeps the
daemon and ``relayd oauth token``/``authorize`` from rotating the same refresh token at once.
Everything here blocks: callers run it in ``asyncio.to_thread``.

In a fleet (``shared_state``) each record also has a copy in the database (``SharedCopies``,
relayd/shared/oauth.py), encrypted the same way, so one node's refresh serves every node
(all of them need the same key file). The fleet's copy is read first and written after the
node's own file; while the database is down the node reads and writes its own files, and
``lock`` is only this node's: mail never waits for the database because of a token.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography.fernet import InvalidToken, MultiFernet

from relayd import secrets as sec
from relayd.errors import OAuthError, StateUnavailable

KINDS = ("token", "refresh", "msal")
T = TypeVar("T")
log = logging.getLogger("relayd.oauth")


class SharedCopies(Protocol):
    """The fleet's copy of the encrypted records (relayd.shared.oauth.SharedOAuth); every
    method raises StateUnavailable when the database cannot be used."""

    def read(self, name: str) -> bytes | None: ...

    def write(self, name: str, blob: bytes) -> None: ...

    def delete(self, name: str) -> None: ...

    def lock(self, name: str) -> contextlib.AbstractContextManager[None]: ...


def _slug(name: str) -> str:
    """A file-name-safe form of a smarthost name (distinct names stay distinct)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "smarthost"
    if safe != name:
        safe += "-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return safe


def fingerprint(parts: tuple[object, ...]) -> str:
    """A stable digest of the settings a cached token depends on (no secret values)."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode("utf-8")).hexdigest()[:32]


class OAuthStore:
    """The encrypted files of one smarthost under ``state_dir/oauth``."""

    def __init__(self, state_dir: Path, smarthost: str, key_file: Path,
                 shared: SharedCopies | None = None) -> None:
        self.directory = state_dir / "oauth"
        self.smarthost = smarthost
        self.key_file = key_file
        self.shared = shared
        self._slug = _slug(smarthost)
        self._ring: MultiFernet | None = None
        self._shared_problem = ""  # said once per outage, not once per record

    def path(self, kind: str) -> Path:
        assert kind in KINDS
        return self.directory / f"{self._slug}.{kind}"

    def keyring(self) -> MultiFernet:
        """The key ring; OAuthError (permanent) if the key file is missing or invalid."""
        if self._ring is None:
            try:
                self._ring = sec.load_key(self.key_file)
            except OSError as exc:
                raise OAuthError(
                    f"cannot read the key file {self.key_file} ({exc.strerror or exc}) needed to "
                    "store OAuth tokens encrypted",
                    hint="run 'relayd secret keygen' (see secrets.key_file)", permanent=True) from exc
            except ValueError as exc:
                raise OAuthError(str(exc), hint="check secrets.key_file", permanent=True) from exc
        return self._ring

    def read(self, kind: str) -> dict[str, Any] | None:
        """The decrypted record, or None if absent or unreadable (wrong key, altered file).

        A record still readable only with an older key of the ring is re-encrypted with the
        current key, so removing the old key after a rotation loses nothing.
        """
        blob = self._shared_read(kind)
        data = None if blob is None else self._decrypt(blob)
        if data is None:
            if blob is not None:
                log.warning("oauth: smarthost %s: the fleet's copy of its %s record cannot be "
                            "decrypted with %s: every node needs the same secrets.key_file",
                            self.smarthost, kind, self.key_file)
            try:
                blob = self.path(kind).read_bytes()
            except FileNotFoundError:
                return None
            data = self._decrypt(blob)
            if data is None:
                return None
        assert blob is not None
        ring = self.keyring()
        primary = ring._fernets[0]  # MultiFernet encrypts with the first key
        try:
            primary.decrypt(blob)
        except InvalidToken:
            self.write(kind, data)
        return data

    def _decrypt(self, blob: bytes) -> dict[str, Any] | None:
        try:
            data = json.loads(self.keyring().decrypt(blob).decode("utf-8"))
        except (InvalidToken, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write(self, kind: str, data: dict[str, Any]) -> None:
        """Atomically replace the record (mode 0600), then the fleet's copy."""
        blob = self.keyring().encrypt(json.dumps(data).encode("utf-8"))
        self._write_file(kind, blob)
        if self.shared is not None:
            self._shared(lambda s: s.write(self._name(kind), blob))

    def _write_file(self, kind: str, blob: bytes) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        final = self.path(kind)
        tmp = final.with_name(final.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def delete(self, kind: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(kind).unlink()
        if self.shared is not None:
            self._shared(lambda s: s.delete(self._name(kind)))

    # -- the fleet's copy ----------------------------------------------------------------------
    def _name(self, kind: str) -> str:
        assert kind in KINDS
        return f"{self._slug}.{kind}"

    def _shared_read(self, kind: str) -> bytes | None:
        if self.shared is None:
            return None
        return self._shared(lambda s: s.read(self._name(kind)))

    def _shared(self, work: Callable[[SharedCopies], T]) -> T | None:
        """``work(shared)``, or None when the database cannot be used (said once)."""
        assert self.shared is not None
        try:
            result = work(self.shared)
        except StateUnavailable as exc:
            if str(exc) != self._shared_problem:
                log.warning("oauth: smarthost %s: the fleet's token cache is not available "
                            "(%s); this node uses and refreshes its own", self.smarthost, exc)
            self._shared_problem = str(exc)
            return None
        self._shared_problem = ""
        return result

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock across processes for one refresh (flock on a lock file).

        Without a writable state directory there is nothing to protect: run unlocked. In a
        fleet it is also the fleet's lock for this smarthost, so that one node refreshes while
        the others wait and then read its token; without the database, this node's only.
        """
        with contextlib.ExitStack() as stack:
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(self.directory / f"{self._slug}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                pass
            else:
                stack.callback(os.close, fd)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if self.shared is not None:
                self._shared(lambda s: stack.enter_context(s.lock(self._name("token"))))
            yield


@dataclass(frozen=True)
class RefreshToken:
    """A refresh token and where it came from (``origin``: digest of the file it was read from)."""

    value: sec.Secret
    origin: str


def _file_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_refresh_token_file(path: Path, store: OAuthStore) -> str:
    """Read ``refresh_token_file``: one token, one trailing newline dropped; ``enc:`` allowed."""
    try:
        text = sec.read_secret_file(path).strip()
    except OSError as exc:
        raise OAuthError(f"cannot read refresh_token_file {path} ({exc.strerror or exc})",
                         hint="check oauth.refresh_token_file", permanent=True) from exc
    if text.startswith(sec.ENC_PREFIX):
        try:
            text = sec.decrypt(store.keyring(), text)
        except ValueError as exc:
            raise OAuthError(f"refresh_token_file {path}: {exc}",
                             hint="re-create it with 'relayd secret encrypt'", permanent=True) from exc
    return text


def current_refresh_token(store: OAuthStore, token_file: Path | None) -> RefreshToken | None:
    """The refresh token to use: the stored one (from ``oauth authorize`` or a rotation),
    unless ``refresh_token_file`` was edited after it was stored, then the file's."""
    file_value: str | None = None
    file_error: OAuthError | None = None
    if token_file is not None:
        try:
            file_value = read_refresh_token_file(token_file, store)
        except OAuthError as exc:
            file_error = exc
    file_origin = _file_digest(file_value) if file_value else ""
    stored = store.read("refresh")
    if stored and isinstance(stored.get("refresh_token"), str) and (
            not file_value or stored.get("origin") == file_origin):
        return RefreshToken(sec.Secret(stored["refresh_token"]), str(stored.get("origin", "")))
    if file_value:
        return RefreshToken(sec.Secret(file_value), file_origin)
    if file_error is not None:
        raise file_error
    return None


def save_refresh_token(store: OAuthStore, value: str, token_file: Path | None) -> None:
    """Store a new (authorized or rotated) refresh token, remembering the file's current state."""
    origin = ""
    if token_file is not None:
        with contextlib.suppress(OAuthError):
            origin = _file_digest(read_refresh_token_file(token_file, store))
    store.write("refresh", {"version": 1, "refresh_token": value, "origin": origin})
