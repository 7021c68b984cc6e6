"""The users file: submission users and their scrypt password hashes, read, checked and written.

The file is YAML (``users: [{name, password_hash, allowed_from, ...}]``), written by ``relayd
user`` with mode 0640 and refused when other users may read it. Passwords are stored only as
``$scrypt$ln=14,r=8,p=1$SALT$HASH`` (RFC 7914 scrypt from hashlib, 16 random bytes of salt,
32 bytes of output, base64 without padding): never a hand-made scheme, never the password.

``UsersFile`` keeps the parsed file and re-reads it when its mtime, size or inode changes
(checked at every AUTH and every gated delivery, and on SIGHUP), so `relayd user add` takes
effect without a reload. Verification does the same scrypt work for an unknown user, a
disabled one and a wrong password, and compares in constant time (hmac.compare_digest): the
time of a 535 says nothing about which names exist. Callers on an event loop run
``verify`` in a worker thread: one scrypt costs tens of milliseconds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from relayd.config.reader import Reader
from relayd.errors import ConfigError, Problem
from relayd.units import Rate

# scrypt cost: N = 2**14, r = 8, p = 1 uses 16 MiB and about 50 ms per hash on one core,
# the interactive-login parameters of RFC 7914 §2 / the Python docs.
SCRYPT_LOG2_N = 14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
_MAXMEM = 64 * 1024 * 1024
_HASH = re.compile(r"^\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$")
MAX_PASSWORD = 1024
_MODE = 0o640


@dataclass(frozen=True)
class User:
    """One submission user as the users file describes it (the hash stays inside this room)."""

    name: str
    password_hash: str
    allowed_from: tuple[str, ...] = ()
    daily_cap: int | None = None
    rate: Rate | None = None
    priority: bool = False
    disabled: bool = False

    def public(self) -> dict[str, Any]:
        """What `relayd user list --json` prints: everything but the hash."""
        return {"name": self.name, "allowed_from": list(self.allowed_from),
                "daily_cap": self.daily_cap, "rate": None if self.rate is None else _rate_text(self.rate),
                "priority": self.priority, "disabled": self.disabled}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    """A new scrypt hash of ``password`` with a random salt."""
    salt = os.urandom(SALT_BYTES)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2 ** SCRYPT_LOG2_N, r=SCRYPT_R,
                            p=SCRYPT_P, maxmem=_MAXMEM, dklen=HASH_BYTES)
    return f"$scrypt$ln={SCRYPT_LOG2_N},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def hash_ok(text: str) -> bool:
    """True when ``text`` is a hash this module can verify (and not absurdly costly)."""
    m = _HASH.match(text)
    return m is not None and 10 <= int(m.group(1)) <= 20 and 1 <= int(m.group(2)) <= 32 \
        and 1 <= int(m.group(3)) <= 16


# Verified against when the user is unknown or disabled, so that every failure costs the same.
_DUMMY = hash_password(secrets.token_urlsafe(16))


def check_password(password: bytes, encoded: str) -> bool:
    """Constant-time check of ``password`` against one stored hash."""
    m = _HASH.match(encoded) if hash_ok(encoded) else None
    if m is None:
        m = _HASH.match(_DUMMY)
        assert m is not None
        encoded_ok = False
    else:
        encoded_ok = True
    ln, r, p, salt, want = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4), m.group(5)
    digest = hashlib.scrypt(password, salt=_unb64(salt), n=2 ** ln, r=r, p=p, maxmem=_MAXMEM,
                            dklen=len(_unb64(want)))
    return hmac.compare_digest(digest, _unb64(want)) and encoded_ok


def _rate_text(rate: Rate) -> str:
    units = {1.0: "s", 60.0: "m", 3600.0: "h", 86400.0: "d"}
    unit = units.get(rate.period)
    return f"{rate.count:g}/{unit}" if unit else f"{rate.count / rate.period:g}/s"


def parse_users(text: str, label: str = "users_file") -> dict[str, User]:
    """The users of a users file's text; ConfigError naming ``users_file: users[0].key``."""
    reader = Reader(base_dir=Path("."), file_label=label)
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(label, f"invalid YAML: {getattr(exc, 'problem', exc)}")]) from exc
    root = reader.section("", data or {}, {"users"})
    out: dict[str, User] = {}
    for i, item in enumerate(reader.sequence("users", (root or {}).get("users", [])) or []):
        user = _user(reader, f"users[{i}]", item)
        if user is None:
            continue
        if user.name in out:
            reader.fail(f"users[{i}].name", f"{user.name!r} is listed twice")
        out[user.name] = user
    if reader.problems:
        raise ConfigError([Problem(f"{label}: {p.path}" if p.path else label, p.message)
                           for p in reader.problems])
    return out


def _user(r: Reader, p: str, value: Any) -> User | None:
    m = r.section(p, value, {"name", "password_hash", "allowed_from", "daily_cap", "rate",
                             "priority", "disabled"})
    if m is None:
        return None
    name = str(m.get("name") or "")
    if not NAME.match(name):
        r.fail(f"{p}.name", "must be 1-64 letters, digits, '_', '.', '@', '+', '-' (got "
               f"{name!r})")
        return None
    encoded = str(m.get("password_hash") or "")
    if not hash_ok(encoded):
        r.fail(f"{p}.password_hash", "is not a $scrypt$ hash written by `relayd user` "
               "(set it with `relayd user passwd`)")
    allowed: list[str] = []
    for j, pattern in enumerate(r.sequence(f"{p}.allowed_from", m.get("allowed_from", [])) or []):
        try:
            allowed.append(check_pattern(str(pattern)))
        except ValueError as exc:
            r.fail(f"{p}.allowed_from[{j}]", str(exc))
    return User(name=name, password_hash=encoded, allowed_from=tuple(allowed),
                daily_cap=(r.integer(f"{p}.daily_cap", m["daily_cap"], 1, 10 ** 9)
                           if m.get("daily_cap") is not None else None),
                rate=r.rate(f"{p}.rate", m.get("rate")),
                priority=r.boolean(f"{p}.priority", m.get("priority"), False),
                disabled=r.boolean(f"{p}.disabled", m.get("disabled"), False))


def check_pattern(pattern: str) -> str:
    """An ``allowed_from`` entry: ``*``, ``@domain`` or ``local@domain`` (lower-cased)."""
    text = pattern.strip().lower()
    if text == "*":
        return text
    local, at, domain = text.rpartition("@")
    if not at or not domain or ("." not in domain and domain != "localhost") \
            or any(c.isspace() or c in "<>,;\x00" for c in text):
        raise ValueError(f"must be an address, @domain or * (got {pattern!r})")
    return text if local else "@" + domain


def dump_users(users: dict[str, User]) -> str:
    items = []
    for u in sorted(users.values(), key=lambda u: u.name):
        item: dict[str, Any] = {"name": u.name, "password_hash": u.password_hash,
                                "allowed_from": list(u.allowed_from)}
        if u.daily_cap is not None:
            item["daily_cap"] = u.daily_cap
        if u.rate is not None:
            item["rate"] = _rate_text(u.rate)
        if u.priority:
            item["priority"] = True
        if u.disabled:
            item["disabled"] = True
        items.append(item)
    head = "# relayd submission users: managed with `relayd user …` (only hashes, never passwords)\n"
    return head + yaml.safe_dump({"users": items}, sort_keys=False)


def check_mode(path: Path) -> str | None:
    """Why ``path`` may not be used (readable by every user), or None."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if st.st_mode & stat.S_IROTH or st.st_mode & stat.S_IWOTH:
        return (f"is readable by every user (mode {stat.S_IMODE(st.st_mode):04o}): "
                f"chmod 0640 {path}")
    return None


def read_users(path: Path) -> dict[str, User]:
    """The users of the file at ``path`` (none when it does not exist yet)."""
    label = "users_file"
    problem = check_mode(path)
    if problem is not None:
        raise ConfigError([Problem(label, problem)])
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError([Problem(label, f"cannot read {path}: {exc.strerror or exc}")]) from exc
    return parse_users(text, label)


def write_users(path: Path, users: dict[str, User]) -> None:
    """Replace the file atomically, mode 0640 (group relayd when it exists, as Postfix's
    sasl files are root:postfix), keeping an existing file's owner and group."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".users.", dir=path.parent)
    try:
        os.fchmod(fd, _MODE)
        try:
            st = path.stat()
            os.fchown(fd, st.st_uid, st.st_gid)
        except FileNotFoundError:
            _chgrp_relayd(fd)
        except PermissionError:
            pass
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dump_users(users))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _chgrp_relayd(fd: int) -> None:
    try:
        import grp  # lazy: only when a new users file is created

        os.fchown(fd, -1, grp.getgrnam("relayd").gr_gid)
    except (KeyError, PermissionError, ImportError):
        pass  # no relayd group here (a test, a dev machine): the file stays the creator's


class UsersFile:
    """The users file as the daemon sees it: re-read when it changes on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, User] = {}
        self.refresh(strict=True)

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def refresh(self, *, strict: bool = False) -> bool:
        """Re-read the file if it changed (blocking: a stat, and a read when it changed); True
        when it was re-read. A bad file raises ConfigError once (the caller logs it) and the
        users read before stay in force; ``strict`` re-reads and raises every time."""
        stamp = self._current_stamp()
        with self._lock:
            if stamp == self._stamp and not strict:
                return False
            try:
                users = read_users(self.path)
            except ConfigError:
                if strict:
                    raise
                self._stamp = stamp  # reported once, not at every AUTH
                raise
            self._users, self._stamp = users, stamp
            return True

    def get(self, name: str) -> User | None:
        return self._users.get(name)

    def names(self) -> list[str]:
        return sorted(self._users)

    def verify(self, login: bytes, password: bytes) -> User | None:
        """The user when ``login`` / ``password`` are right and the user is enabled, else
        None, after the same scrypt work either way. Blocking: run in a worker thread."""
        try:
            name = login.decode("utf-8")
        except UnicodeDecodeError:
            name = ""
        user = self._users.get(name)
        encoded = user.password_hash if user is not None else _DUMMY
        ok = check_password(password[:MAX_PASSWORD], encoded)
        if user is None or user.disabled or not ok:
            return None
        return user
