"""Parsing of the small value types used in the config: durations, sizes, rates, addresses.

Each parser raises ``ValueError`` with a sysadmin-readable message; the config loader adds
the key path in front of it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024,
               "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
               "g": 1024**3, "gb": 1024**3, "gib": 1024**3}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$")
_RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
               "h": 3600, "hour": 3600, "d": 86400, "day": 86400}
# RFC 5321 §4.1.2 Mailbox, kept practical: no spaces, brackets, quotes or control characters.
# Non-ASCII is allowed (RFC 6531 SMTPUTF8).
_LOCAL = r"[^\s@<>()\[\],;:\"\\\x00-\x1f\x7f]+"
_LABEL = r"[^\s@<>()\[\],;:\"\\\x00-\x1f\x7f.]+"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])"
_ADDRESS = re.compile(rf"^{_LOCAL}@{_DOMAIN}$")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 §2.2: printable ASCII except colon


def parse_duration(value: object) -> float:
    """``30s``, ``5m``, ``1h``, ``4d`` (or a number of seconds) -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"must be a duration like 30s, 5m, 1h or 4d (got {value!r})")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"must not be negative (got {value})")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    raise ValueError(f"must be a duration like 30s, 5m, 1h or 4d (got {value!r})")


def parse_size(value: object) -> int:
    """``25MB``, ``512KB``, ``1MiB`` or a byte count -> bytes (K/KB/KiB = 1024, SPEC)."""
    if isinstance(value, bool):
        raise ValueError(f"must be a size like 25MB, 512KB or a byte count (got {value!r})")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative (got {value})")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])
    raise ValueError(f"must be a size like 25MB, 512KB or a byte count (got {value!r})")


@dataclass(frozen=True, slots=True)
class Rate:
    """A sending rate: ``per_second`` messages/s with a burst of one second's worth (SPEC)."""

    count: float
    period: float

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        return f"{self.count:g}/{self.period:g}s"


def parse_rate(value: object) -> Rate:
    """``14/s``, ``600/m``, ``10000/h`` -> Rate."""
    if isinstance(value, str):
        m = _RATE.match(value)
        if m and float(m.group(1)) > 0:
            return Rate(float(m.group(1)), float(_RATE_UNITS[m.group(2)]))
    raise ValueError(f"must be a rate like 14/s, 600/m or 10000/h (got {value!r})")


def check_address(value: str) -> str:
    """Validate a bare mailbox ``local@domain``; returns it unchanged."""
    if any(c in value for c in "\r\n\x00"):
        raise ValueError("must not contain CR, LF or NUL")
    if len(value) > 254:
        raise ValueError(f"is too long ({len(value)} characters, at most 254)")
    if not _ADDRESS.match(value):
        raise ValueError(f"is not a valid email address (got {value!r})")
    local = value.rsplit("@", 1)[0]
    if len(local.encode("utf-8")) > 64:
        raise ValueError("local part is longer than 64 octets (RFC 5321 §4.5.3.1.1)")
    return value


def is_address(value: str) -> bool:
    """True when ``value`` is a valid bare mailbox."""
    try:
        check_address(value)
    except ValueError:
        return False
    return True


def check_header_value(value: str) -> str:
    """Refuse CR, LF and NUL: they would let a config value inject headers (RFC 5322 §2.2)."""
    if any(c in value for c in "\r\n\x00"):
        raise ValueError("must not contain CR, LF or NUL (header injection)")
    return value


def check_header_name(value: str) -> str:
    """An RFC 5322 field name: printable ASCII without colon or space."""
    if not _HEADER_NAME.match(value):
        raise ValueError(f"is not a valid header name (got {value!r})")
    return value


@dataclass(frozen=True, slots=True)
class HostPort:
    """A listen or connect address; ``host`` is unbracketed (``::1``)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_hostport(value: object, default_port: int | None = None, *, allow_zero: bool = False) -> HostPort:
    """``127.0.0.1:25``, ``[::1]:25``, ``localhost:2525`` -> HostPort."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be an address like 127.0.0.1:25 or [::1]:25 (got {value!r})")
    text = value.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"has an unclosed '[' (got {value!r})")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"must be [ipv6]:port (got {value!r})")
        port_text = rest[1:]
        ipaddress.IPv6Address(host)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ValueError(f"IPv6 addresses need brackets: [{text}]:25")
    if not port_text:
        if default_port is None:
            raise ValueError(f"needs a port, like {host}:25 (got {value!r})")
        return HostPort(host, default_port)
    if not port_text.isdigit() or not (0 if allow_zero else 1) <= int(port_text) <= 65535:
        raise ValueError(f"port must be between 1 and 65535 (got {port_text!r})")
    if not host:
        raise ValueError(f"needs a host (got {value!r}); use 127.0.0.1 for loopback")
    return HostPort(host, int(port_text))
