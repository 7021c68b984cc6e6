"""Typed accessors over parsed YAML that record every problem with its key path.

Each accessor returns a value (or None) and never raises for bad input: it appends a
``Problem`` so ``check-config`` can list all mistakes at once.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from relayd import secrets as sec
from relayd.errors import Problem
from relayd.units import (
    HostPort,
    Rate,
    check_address,
    check_header_value,
    parse_duration,
    parse_hostport,
    parse_rate,
    parse_size,
)

E = TypeVar("E")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?$")
MAX_CREDENTIAL = 255


class Reader:
    """Collects problems and warnings while reading config values."""

    def __init__(self, base_dir: Path, environ: Mapping[str, str] | None = None, *,
                 file_label: str = "") -> None:
        self.base_dir = base_dir
        # What a problem with the document itself (not a mapping) is reported under.
        self.file_label = file_label
        self.environ = environ
        self.problems: list[Problem] = []
        self.warnings: list[str] = []
        self._key_file: Path | None = None
        self._fernet: sec.KeyRing | None = None
        self._key_error: str | None = None

    # -- bookkeeping -------------------------------------------------------------------------
    def fail(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")

    def unknown_keys(self, path: str, data: Mapping[str, Any], known: set[str]) -> None:
        for key in data:
            if key not in known:
                where = f"{path}.{key}" if path else str(key)
                hint = _closest(str(key), known)
                self.fail(where, "unknown key" + (f" (did you mean {hint!r}?)" if hint else ""))

    # -- structure -----------------------------------------------------------------------------
    def mapping(self, path: str, value: Any) -> dict[str, Any] | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path or self.file_label, f"must be a mapping of keys (got {_kind(value)})")
            return None
        bad = [k for k in value if not isinstance(k, str)]
        for k in bad:
            self.fail(f"{path}.{k}" if path else str(k), "keys must be strings")
        return {k: v for k, v in value.items() if isinstance(k, str)}

    def section(self, path: str, value: Any, known: set[str]) -> dict[str, Any] | None:
        m = self.mapping(path, value)
        if m is not None:
            self.unknown_keys(path, m, known)
        return m

    def sequence(self, path: str, value: Any) -> list[Any] | None:
        if value is None:
            return []
        if isinstance(value, str) or not isinstance(value, list):
            self.fail(path, f"must be a list (got {_kind(value)})")
            return None
        return value

    # -- scalars -------------------------------------------------------------------------------
    def string(self, path: str, value: Any, *, max_len: int | None = None,
               header: bool = False) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.fail(path, f"must be a string (got {_kind(value)})")
            return None
        text = str(value)
        if max_len is not None and len(text) > max_len:
            self.fail(path, f"is too long ({len(text)} characters, at most {max_len})")
            return None
        if header or any(c in text for c in "\r\n\x00"):
            try:
                check_header_value(text)
            except ValueError as exc:
                self.fail(path, str(exc))
                return None
        return text

    def boolean(self, path: str, value: Any, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false (got {value!r})")
            return default
        return value

    def integer(self, path: str, value: Any, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"must be a whole number (got {value!r})")
            return lo
        if not lo <= value <= hi:
            self.fail(path, f"must be between {lo} and {hi} (got {value})")
            return lo
        return value

    def port(self, path: str, value: Any) -> int:
        return self.integer(path, value, 1, 65535)

    def duration(self, path: str, value: Any, default: float) -> float:
        if value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(path, str(exc))
            return default

    def size(self, path: str, value: Any) -> int:
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(path, str(exc))
            return 0

    def rate(self, path: str, value: Any) -> Rate | None:
        if value is None:
            return None
        try:
            return parse_rate(value)
        except ValueError as exc:
            self.fail(path, str(exc))
            return None

    def choice(self, path: str, value: Any, enum_type: type[E], default: E) -> E:
        if value is None:
            return default
        try:
            return enum_type(value)  # type: ignore[call-arg]
        except ValueError:
            words = " | ".join(str(m.value) for m in enum_type)  # type: ignore[attr-defined]
            self.fail(path, f"must be one of {words} (got {value!r})")
            return default

    def address(self, path: str, value: Any) -> str | None:
        text = self.string(path, value)
        if text is None:
            return None
        try:
            return check_address(text)
        except ValueError as exc:
            self.fail(path, str(exc))
            return None

    def hostname(self, path: str, value: Any) -> str | None:
        text = self.string(path, value)
        if text is None:
            return None
        if not _HOSTNAME.match(text):
            self.fail(path, f"is not a valid host name (got {text!r})")
            return None
        return text

    def hostport(self, path: str, value: Any, default_port: int | None = None, *,
                 allow_zero: bool = False) -> HostPort | None:
        try:
            return parse_hostport(value, default_port, allow_zero=allow_zero)
        except ValueError as exc:
            self.fail(path, str(exc))
            return None

    def network(self, path: str, value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        try:
            return ipaddress.ip_network(str(value), strict=False)
        except ValueError:
            self.fail(path, f"must be an IP address or network like 127.0.0.0/8 (got {value!r})")
            return None

    def path(self, path: str, value: Any) -> Path:
        text = self.string(path, value)
        if not text:
            self.fail(path, "must be a file system path")
            return Path(".")
        try:
            p = Path(text).expanduser()
        except RuntimeError:  # "~nosuchuser/x": no home directory to expand to
            self.fail(path, f"cannot expand {text!r}: no such user's home directory")
            return Path(".")
        return p if p.is_absolute() else (self.base_dir / p)

    def optional_path(self, path: str, value: Any) -> Path | None:
        return None if value is None else self.path(path, value)

    # -- secrets -------------------------------------------------------------------------------
    def set_key_file(self, key_file: Path) -> None:
        self._key_file = key_file

    def _fernet_for(self, path: str) -> sec.KeyRing | None:
        if self._fernet is None and self._key_error is None:
            assert self._key_file is not None
            try:
                self._fernet = sec.load_key(self._key_file)
            except OSError as exc:
                self._key_error = (f"is encrypted but the key file {self._key_file} cannot be "
                                   f"read ({exc.strerror or exc}); see secrets.key_file")
            except ValueError as exc:
                self._key_error = f"is encrypted but {exc}"
        if self._key_error is not None:
            self.fail(path, self._key_error)
        return self._fernet

    def secret(self, parent: str, data: Mapping[str, Any], key: str, *,
               max_len: int | None = None) -> sec.Secret | None:
        """Read ``key`` / ``key_file`` / ``key_env`` of ``data`` (one at most) as a Secret."""
        where = f"{parent}.{key}" if parent else key
        forms = [k for k in (key, f"{key}_file", f"{key}_env") if data.get(k) is not None]
        if len(forms) > 1:
            self.fail(where, f"give only one of {', '.join(forms)}")
            return None
        if not forms:
            return None
        form = forms[0]
        raw = data[form]
        if not isinstance(raw, str):
            self.fail(f"{parent}.{form}" if parent else form, f"must be a string (got {_kind(raw)})")
            return None
        try:
            if form.endswith("_file"):
                value = sec.read_secret_file(self.path(f"{parent}.{form}", raw))
            elif form.endswith("_env"):
                value = sec.read_secret_env(raw, dict(self.environ) if self.environ else None)
            elif raw.startswith(sec.ENC_PREFIX):
                fernet = self._fernet_for(where)
                if fernet is None:
                    return None
                value = sec.decrypt(fernet, raw)
            else:
                value = raw
                self.warn(where, "is stored in plain text; encrypt it with "
                          "'relayd secret encrypt' or use "
                          f"{key}_file / {key}_env")
        except OSError as exc:
            self.fail(f"{parent}.{form}", f"cannot read the file: {exc.strerror or exc}")
            return None
        except (KeyError, ValueError) as exc:
            self.fail(f"{parent}.{form}" if form != key else where, str(exc).strip("'\""))
            return None
        if max_len is not None and len(value) > max_len:
            self.fail(where, f"is too long ({len(value)} characters, at most {max_len})")
            return None
        if any(c in value for c in "\r\n\x00"):
            self.fail(where, "must not contain CR, LF or NUL")
            return None
        return sec.Secret(value)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int | float):
        return f"the number {value}"
    return repr(value)


def _closest(word: str, known: set[str]) -> str | None:
    # lazy: only a misspelt key needs difflib (about 170 KB and 1 ms), not every process
    # that reads the config, nor each sendmail run
    import difflib

    matches = difflib.get_close_matches(word, sorted(known), n=1, cutoff=0.75)
    return matches[0] if matches else None
