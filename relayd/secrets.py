"""Secret values: a redacted wrapper type and resolution of enc:/file/env/plain forms.

A ``Secret`` never shows its value in ``repr``/``str``/format, so no log line, exception or
``check-config`` output can leak it; code that really needs the value calls ``reveal()``.
Encrypted values (``enc:...``) are Fernet tokens made with the key at ``secrets.key_file``.
The key file holds one key per line: the first encrypts, every line decrypts, so keys can be
rotated without a flag day (docs/secrets.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

# cryptography is imported where a key is used, not here: config/schema.py imports this module in
# every process, and cryptography costs about 7 MB of memory per process that never
# decrypts (no ``enc:`` value and no OAuth token store).
if TYPE_CHECKING:
    from cryptography.fernet import Fernet, MultiFernet

ENC_PREFIX = "enc:"


class Secret:
    """A string whose value is only available through ``reveal()``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the clear-text value; never log or print it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> str:  # pragma: no cover - defensive
        raise TypeError("Secret values cannot be pickled")


def strip_one_newline(text: str) -> str:
    """Secrets read from files or stdin lose exactly one trailing newline (SPEC)."""
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


KeyRing: TypeAlias = "Fernet | MultiFernet"


def load_key(key_file: Path) -> MultiFernet:
    """Load the key ring (one Fernet key per line, the first one encrypts).

    Raises OSError or ValueError with a message naming the file, never the key.
    """
    # lazy: cryptography's native module is about 5 MB per process, needed only where an
    # enc: value or OAuth is configured (test_split_process.py checks it stays out otherwise)
    from cryptography.fernet import Fernet, MultiFernet

    lines = [line.strip() for line in key_file.read_bytes().splitlines()]
    keys = [line for line in lines if line and not line.startswith(b"#")]
    try:
        if not keys:
            raise ValueError("empty")
        return MultiFernet([Fernet(k) for k in keys])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{key_file} is not a valid relayd key (use 'relayd secret keygen')") from exc


def generate_key() -> bytes:
    """A new random Fernet key (url-safe base64, 32 bytes of entropy)."""
    from cryptography.fernet import Fernet  # lazy: see load_key

    return Fernet.generate_key()


def encrypt(fernet: KeyRing, value: str) -> str:
    """Encrypt ``value`` into the ``enc:...`` form accepted by the config."""
    return ENC_PREFIX + fernet.encrypt(value.encode("utf-8")).decode("ascii")


def decrypt(fernet: KeyRing, value: str) -> str:
    """Decrypt an ``enc:...`` value; raises ValueError without echoing the value."""
    from cryptography.fernet import InvalidToken  # lazy: see load_key

    try:
        return fernet.decrypt(value[len(ENC_PREFIX):].encode("ascii")).decode("utf-8")
    except (InvalidToken, UnicodeError) as exc:
        raise ValueError(
            "cannot decrypt: wrong key file or the value was altered "
            "(re-create it with 'relayd secret encrypt')"
        ) from exc


def read_secret_file(path: Path) -> str:
    """Read a ``*_file`` secret; one trailing newline is dropped."""
    return strip_one_newline(path.read_text(encoding="utf-8"))


def read_secret_env(name: str, environ: dict[str, str] | None = None) -> str:
    """Read a ``*_env`` secret; KeyError names only the variable."""
    env = os.environ if environ is None else environ
    if name not in env:
        raise KeyError(f"environment variable {name} is not set")
    return env[name]
