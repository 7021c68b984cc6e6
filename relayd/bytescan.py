"""The whole-message byte scans of the SMTP paths: the end-of-data search, the line-end
check, the line-length check (acceptance re-encodes lines over 998 octets:
relayd/policy/long_lines.py), and dot-stuffing both ways (RFC 5321 §4.5.2; the listener undoes it on what it
receives, delivery does it on what it sends; the spool holds content that is not
dot-stuffed).

Each runs on an event loop for every message, over every byte of it. They come from the
C module ``relayd._scan`` (relayd/_scan.c), which steps from LF to LF with memchr instead
of CPython's multi-byte ``bytes.find``, ``count`` and ``re`` searches, which are byte loops
(docs/performance.md, "Fifth round of the day"). The functions below with
a ``py_`` prefix give the same results in Python; they are used when the C module was not
built (no compiler at install time), and the tests hold both to the same definitions.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from types import ModuleType

_DOT_LINE = re.compile(rb"\r\n\.")
_BARE_CR = re.compile(rb"\r(?!\n)")


def py_find_line(data: bytes | bytearray, rest: bytes, start: int = 0) -> int:
    """The offset of the first LF at or after ``start`` that ``rest`` follows, or -1."""
    return data.find(b"\n" + rest, start)


def py_line_ends_ok(data: bytes) -> bool:
    """Whether every CR is followed by an LF and every LF follows a CR."""
    # No CR without an LF after it means every CR starts a CRLF; then as many LFs as CRs
    # means no LF without a CR before it.
    return _BARE_CR.search(data) is None and data.count(b"\n") == data.count(b"\r")


def py_has_long_line(data: bytes, limit: int) -> bool:
    """Whether a line (the bytes between LFs, without the CR of a CRLF) is longer than
    ``limit`` octets (RFC 5322 §2.1.1)."""
    if limit < 0:
        raise ValueError("has_long_line: limit must not be negative")
    if len(data) <= limit:
        return False
    lines = data.split(b"\n")
    if max(map(len, lines)) <= limit:  # split and len run in C: the common case is quick
        return False
    last = len(lines) - 1
    return any(len(line) - (i < last and line.endswith(b"\r")) > limit
               for i, line in enumerate(lines) if len(line) > limit)


def py_stuff(content: bytes) -> bytes:
    """``content`` as sent after 354, without the terminator: each line that starts with "."
    gets one more (``content`` itself when none does)."""
    if _DOT_LINE.search(content) is not None:
        content = content.replace(b"\r\n.", b"\r\n..")
    return b"." + content if content[:1] == b"." else content


def py_unstuff(data: bytes) -> bytes:
    """Received DATA without its terminator, back to the content: drop the first "." of
    every line (``data`` itself when no line has one)."""
    if _DOT_LINE.search(data) is not None:
        data = data.replace(b"\r\n.", b"\r\n")
    return data[1:] if data[:1] == b"." else data


_C: ModuleType | None
try:
    from relayd import _scan as _C
except ImportError:  # installed without a C compiler: the Python twins, slower
    _C = None
NATIVE = _C is not None
find_line: Callable[[bytes | bytearray, bytes, int], int] = (
    _C.find_line if _C is not None else py_find_line)
line_ends_ok: Callable[[bytes], bool] = _C.line_ends_ok if _C is not None else py_line_ends_ok
has_long_line: Callable[[bytes, int], bool] = (
    _C.has_long_line if _C is not None else py_has_long_line)
stuff: Callable[[bytes], bytes] = _C.stuff if _C is not None else py_stuff
unstuff: Callable[[bytes], bytes] = _C.unstuff if _C is not None else py_unstuff
