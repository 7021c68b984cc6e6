"""A message with some MIME parts re-encoded, every other byte as it was: the walk and the
encoders shared by the two conversions relayd makes for the transport, never for the content.

- relayd/delivery/smtp/sevenbit.py: 8-bit mail for a smarthost without 8BITMIME (RFC 6152 §3);
- relayd/policy/long_lines.py: lines over 998 octets at acceptance (RFC 5322 §2.1.1).

The MIME tree is read by relayd/policy/_mime.py's byte-level walker; a ``Rules`` object says
what each header block, multipart entity and leaf becomes (or raises ``Unconvertible``), and
only the parts that change are spliced back in. It lives in the policy package because
acceptance uses it and delivery already depends on policy, never the other way round.
"""

from __future__ import annotations

import binascii
import codecs
from typing import Protocol

from relayd.bytescan import line_ends_ok
from relayd.policy import _mime

CRLF = b"\r\n"
CTE = "Content-Transfer-Encoding"
# binascii holds the GIL for a whole call: bodies are encoded (and checked) about 256 KiB
# (~3 ms) at a time, so the event loop gets a turn between slices; 25 MB take ~0.4 s in all.
SLICE = 1 << 18

Edit = tuple[int, int, bytes]  # replace data[start:end] with these bytes


class Unconvertible(Exception):
    """The message cannot be converted without changing it; the text says why, as a clause
    ("the message has 8-bit headers")."""


class Rules(Protocol):
    """What one conversion changes. ``name`` is how the reasons name an entity ("MIME part
    1.2", "the message")."""

    def needed(self, data: bytes) -> bool:
        """Whether this message or part has anything to convert (the walk skips it if not)."""

    def check_header(self, header: bytes, name: str) -> None:
        """Raises ``Unconvertible`` when a header block forbids the conversion."""

    def too_deep(self, name: str) -> None:
        """A message nested deeper than ``_mime.MAX_DEPTH``: raise, or leave it as it is."""

    def container(self, data: bytes, node: _mime.Leaf, header: bytes, name: str) -> bytes | None:
        """The new header block of a multipart entity (``data[node.start:node.end]``), or None."""

    def attached(self, header: bytes, cte: str, name: str) -> bytes | None:
        """The header block of a message/rfc822 part whose message is then converted inside,
        or None to leave the whole part as it is."""

    def leaf(self, header: bytes, body: bytes, cte: str, ctype: str, name: str) -> bytes | None:
        """The new bytes of a leaf (header block, empty line, body), or None."""

    def finish(self, out: bytes, name: str) -> None:
        """Checks a converted message (each attached one too); raises ``Unconvertible``."""


def convert(data: bytes, rules: Rules, inside: str = "", depth: int = 0) -> bytes:
    """A whole message (the top level, or one attached as message/rfc822) converted by
    ``rules``. ``inside`` names an attached message in the reasons."""
    name = inside or "the message"
    if not rules.needed(data):
        return data
    if depth > _mime.MAX_DEPTH:
        rules.too_deep(name)
        return data
    header, body = _mime.split_message(data)
    rules.check_header(header, name)
    headers = _mime.Headers.parse(header) if header else _mime.Headers(())
    if not headers.has("MIME-Version") and rules.needed(body):
        data = _mime.join_message(as_mime(headers, body).to_bytes(), body)
    edits: list[Edit] = []
    types: dict[str, str] = {}  # container path -> its content type
    for node in _mime.walk(data, containers=True):
        if node.container:
            types[node.path] = node.content_type
            edit = _container(data, node, rules, part_name(node, inside))
        else:
            edit = _leaf(data, node, rules, types, inside, depth)
        if edit is not None:
            edits.append(edit)
    out = splice(data, edits)
    rules.finish(out, name)
    return out


def _container(data: bytes, node: _mime.Leaf, rules: Rules, name: str) -> Edit | None:
    if data.startswith(CRLF, node.start):
        return None  # no header lines
    end = data.find(b"\r\n\r\n", node.start, node.end)
    if end < 0:
        return None  # no body either: nothing to relabel
    header = data[node.start:end + 2]
    rules.check_header(header, name)
    new = rules.container(data, node, header, name)
    return None if new is None else (node.start, end + 2, new)


def _leaf(data: bytes, node: _mime.Leaf, rules: Rules, types: dict[str, str], inside: str,
          depth: int) -> Edit | None:
    part = data[node.start:node.end]
    if not rules.needed(part):
        return None
    name = part_name(node, inside)
    header, body = _mime.split_message(part)
    rules.check_header(header, name)
    cte = cte_of(header)
    ctype = node.content_type
    parent = node.path.rpartition(".")[0] if "." in node.path else ""
    if types.get(parent) == "multipart/digest" and not (
            header and _mime.Headers.parse(header).has("Content-Type")):
        ctype = "message/rfc822"  # RFC 2046 §5.1.5: the default type of a digest's parts
    if ctype == "message/rfc822":
        new_header = rules.attached(header, cte, name)
        if new_header is None:
            return None
        inner = convert(body, rules, f"the message attached as {name}", depth + 1)
        return node.start, node.end, _mime.join_message(new_header, inner)
    new = rules.leaf(header, body, cte, ctype, name)
    return None if new is None else (node.start, node.end, new)


def as_mime(headers: _mime.Headers, body: bytes) -> _mime.Headers:
    """RFC 1428 §3: a message without MIME-Version gets it, and a Content-Type naming the
    charset when it has none (us-ascii for an ASCII body, RFC 2045 §5.2's default; else utf-8
    when it is valid UTF-8, else unknown-8bit: no reliable information about the charset)."""
    headers = headers.add("MIME-Version", "1.0")
    if headers.has("Content-Type"):
        return headers
    charset = "us-ascii" if body.isascii() else "utf-8" if is_utf8(body) else "unknown-8bit"
    return headers.add("Content-Type", f"text/plain; charset={charset}")


def is_utf8(data: bytes) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for i in range(0, len(data), SLICE):
            decoder.decode(data[i:i + SLICE])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def part_name(node: _mime.Leaf, inside: str) -> str:
    if node.start == 0:
        return inside or "the message"
    return f"MIME part {node.path} of {inside}" if inside else f"MIME part {node.path}"


def cte_of(header: bytes) -> str:
    """The Content-Transfer-Encoding of a header block, lower-case; 7bit when absent
    (RFC 2045 §6.1)."""
    value = _mime.Headers.parse(header).get(CTE) if header else None
    return (value or "").split("(")[0].strip().lower() or "7bit"


def with_cte(header: bytes, value: str) -> bytes:
    # A part without header lines starts with its blank line: the field is its only line.
    return _mime.replace_field(header, CTE, value) if header else _mime.make_field(CTE, value)


def quoted_printable(body: bytes) -> bytes | None:
    """``body`` (CRLF line ends) as quoted-printable (RFC 2045 §6.7) that decodes back to
    exactly ``body``, or None when it cannot (a bare CR or LF). Encoded a slice at a time,
    each ending at a line end, so that the result is what one call would give."""
    if not line_ends_ok(body):
        return None
    out: list[bytes] = []
    start, size = 0, len(body)
    while start < size:
        cut = body.find(CRLF, start + SLICE) if size - start > SLICE else -1
        end = size if cut < 0 else cut + 2
        piece = body[start:end]
        if piece.endswith(CRLF):
            encoded = binascii.b2a_qp(piece, istext=True)
        else:
            # binascii takes its line end from the input's first line: with a CRLF added,
            # soft line breaks are "=" CRLF too (RFC 2045 §6.7 rule 5), never a bare LF.
            encoded = binascii.b2a_qp(piece + CRLF, istext=True)[:-2]
        if binascii.a2b_qp(encoded) != piece:
            return None
        out.append(encoded)
        start = end
    return b"".join(out)


def splice(data: bytes, edits: list[Edit]) -> bytes:
    """``data`` with the (non-overlapping) edits applied, copied once."""
    if not edits:
        return data
    if len(edits) == 1 and edits[0][:2] == (0, len(data)):
        return edits[0][2]  # a single-part message: no second copy
    pieces: list[bytes] = []
    at = 0
    for start, end, new in sorted(edits):
        pieces += (data[at:start], new)
        at = end
    pieces.append(data[at:])
    return b"".join(pieces)
