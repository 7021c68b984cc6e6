"""An 8-bit message made 7-bit for a smarthost that does not offer 8BITMIME (RFC 6152 §3).

RFC 6152 §3 leaves a client holding 8-bit content for such a server two choices: convert it
to 7 bit, or not deliver it. relayd converts what it can, as Postfix does
(``disable_mime_output_conversion = no``): each MIME leaf whose body has 8-bit bytes and
whose Content-Transfer-Encoding is 8bit, 7bit or absent is re-encoded as quoted-printable
(RFC 2045 §6.7) and labelled so; a multipart or message/rfc822 entity labelled 8bit is
relabelled 7bit (RFC 2045 §6.4 and RFC 2046 §5.2.1 allow no other encoding there), and an
attached message/rfc822 is converted inside. The decoded bytes of every part stay exactly
what they were: each slice is decoded again and compared before anything is sent. A message
without MIME-Version is first made MIME as RFC 1428 §3 describes: MIME-Version, and unless it
has one, ``Content-Type: text/plain`` with ``charset=utf-8`` when the body is valid UTF-8,
else ``charset=unknown-8bit`` (no reliable information about the charset).

What cannot be made 7-bit without changing what the sender wrote raises ``Unconvertible``,
and the caller does not deliver it: 8-bit bytes in any header (unlike Postfix, which sends
them as they are), Content-Transfer-Encoding binary (RFC 3030), 8-bit bytes in a part that
says it is base64 or quoted-printable or in message/* other than rfc822, signed or encrypted
content (multipart/signed, multipart/encrypted: RFC 1847 signatures cover the encoded form),
and 8-bit bytes outside every part (a preamble or epilogue, nesting beyond ``MAX_DEPTH``).

The MIME tree is read by relayd/policy/_mime.py's byte-level walker, so only the parts that
change are rewritten. Only delivery imports this module, and only for an 8-bit message to a
server without 8BITMIME: it needs the email package, which the delivery process otherwise
never loads. It runs in a worker thread (relayd/delivery/smtp/transaction.py).
"""

from __future__ import annotations

import binascii
import codecs
from dataclasses import dataclass

from relayd.bytescan import line_ends_ok
from relayd.policy import _mime

CRLF = b"\r\n"
CTE = "Content-Transfer-Encoding"
# binascii holds the GIL for a whole call: bodies are encoded (and checked) about 256 KiB
# (~3 ms) at a time, so the event loop gets a turn between slices; 25 MB take ~0.4 s in all.
SLICE = 1 << 18

Edit = tuple[int, int, bytes]  # replace data[start:end] with these bytes


class Unconvertible(Exception):
    """The message cannot be made 7-bit without changing it; the text says why, as a clause
    ("the message has 8-bit headers")."""


@dataclass(frozen=True, slots=True)
class Converted:
    """The 7-bit message, how many parts became quoted-printable, and whether it carries a
    DKIM-Signature (which no longer verifies: the body it covers changed)."""

    content: bytes
    parts: int
    dkim_signed: bool


def to_7bit(content: bytes) -> Converted:
    """``content`` (an 8-bit message, CRLF line ends) as a 7-bit message; raises
    ``Unconvertible``."""
    out, parts = _message(content, "", 0)
    signed = any(_mime.field_name(f) == "dkim-signature" for f in _mime.header_fields(content))
    return Converted(out, parts, signed)


def _message(data: bytes, inside: str, depth: int) -> tuple[bytes, int]:
    """A whole message (the top level, or one attached as message/rfc822) made 7-bit, and the
    number of parts re-encoded. ``inside`` names an attached message in the reasons."""
    name = inside or "the message"
    if data.isascii():
        return data, 0
    if depth > _mime.MAX_DEPTH:
        raise Unconvertible(f"{name} nests messages deeper than {_mime.MAX_DEPTH} levels")
    header, body = _mime.split_message(data)
    if not header.isascii():
        raise Unconvertible(f"{name} has 8-bit headers")
    headers = _mime.Headers.parse(header) if header else _mime.Headers(())
    if not headers.has("MIME-Version"):
        data = _mime.join_message(_as_mime(headers, body).to_bytes(), body)
    edits: list[Edit] = []
    parts = 0
    types: dict[str, str] = {}  # container path -> its content type
    for node in _mime.walk(data, containers=True):
        if node.container:
            types[node.path] = node.content_type
            edit = _container(data, node, _name(node, inside))
        else:
            edit, done = _leaf(data, node, types, inside, depth)
            parts += done
        if edit is not None:
            edits.append(edit)
    out = _splice(data, edits)
    if not out.isascii():
        raise Unconvertible(f"{name} has 8-bit bytes outside its MIME parts (in a preamble or "
                            f"epilogue, or nested deeper than {_mime.MAX_DEPTH} levels)")
    return out, parts


def _as_mime(headers: _mime.Headers, body: bytes) -> _mime.Headers:
    """RFC 1428 §3: a message without MIME-Version gets it, and a Content-Type naming the
    charset when it has none (RFC 2045 §5.2's default, us-ascii, would be untrue)."""
    headers = headers.add("MIME-Version", "1.0")
    if headers.has("Content-Type"):
        return headers
    charset = "utf-8" if _is_utf8(body) else "unknown-8bit"
    return headers.add("Content-Type", f"text/plain; charset={charset}")


def _is_utf8(data: bytes) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for i in range(0, len(data), SLICE):
            decoder.decode(data[i:i + SLICE])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _name(node: _mime.Leaf, inside: str) -> str:
    if node.start == 0:
        return inside or "the message"
    return f"MIME part {node.path} of {inside}" if inside else f"MIME part {node.path}"


def _cte(header: bytes) -> str:
    value = _mime.Headers.parse(header).get(CTE) if header else None
    return (value or "").split("(")[0].strip().lower() or "7bit"


def _with_cte(header: bytes, value: str) -> bytes:
    # A part without header lines starts with its blank line: the field is its only line.
    return _mime.replace_field(header, CTE, value) if header else _mime.make_field(CTE, value)


def _container(data: bytes, node: _mime.Leaf, name: str) -> Edit | None:
    """A multipart entity: its own header must be 7-bit, signed or encrypted content must
    be, and an 8bit or binary label becomes 7bit (its parts are converted one by one)."""
    if data.startswith(CRLF, node.start):
        return None  # no header lines
    end = data.find(b"\r\n\r\n", node.start, node.end)
    if end < 0:
        return None  # no body either: nothing to relabel
    header = data[node.start:end + 2]
    if not header.isascii():
        raise Unconvertible(f"{name} has 8-bit headers")
    if node.content_type in ("multipart/signed", "multipart/encrypted"):
        if not data[node.start:node.end].isascii():
            what = "signed" if node.content_type == "multipart/signed" else "encrypted"
            raise Unconvertible(f"{name} is {what} ({node.content_type}) and has 8-bit content, "
                                f"which converting would break")
        return None
    if _cte(header) in ("8bit", "binary"):
        return node.start, end + 2, _with_cte(header, "7bit")
    return None


def _leaf(data: bytes, node: _mime.Leaf, types: dict[str, str], inside: str,
          depth: int) -> tuple[Edit | None, int]:
    """One leaf made 7-bit: (the edit, 1 when it became quoted-printable)."""
    part = data[node.start:node.end]
    if part.isascii():
        return None, 0
    name = _name(node, inside)
    header, body = _mime.split_message(part)
    if not header.isascii():
        raise Unconvertible(f"{name} has 8-bit headers")
    cte = _cte(header)
    ctype = node.content_type
    parent = node.path.rpartition(".")[0] if "." in node.path else ""
    if types.get(parent) == "multipart/digest" and not (
            header and _mime.Headers.parse(header).has("Content-Type")):
        ctype = "message/rfc822"  # RFC 2046 §5.1.5: the default type of a digest's parts
    if ctype == "message/rfc822":
        if cte not in ("7bit", "8bit"):
            raise Unconvertible(f"{name} is message/rfc822 with Content-Transfer-Encoding {cte}")
        inner, done = _message(body, f"the message attached as {name}", depth + 1)
        new_header = _with_cte(header, "7bit") if cte == "8bit" else header
        return (node.start, node.end, _mime.join_message(new_header, inner)), done
    if ctype.startswith("message/"):
        raise Unconvertible(f"{name} is {ctype} with 8-bit content")
    if cte == "binary":
        raise Unconvertible(f"{name} has Content-Transfer-Encoding binary")
    if cte not in ("7bit", "8bit"):
        raise Unconvertible(f"{name} says it is {cte} but has 8-bit bytes")
    encoded = quoted_printable(body)
    if encoded is None:
        raise Unconvertible(f"{name} has a bare CR or LF, which quoted-printable cannot keep")
    new = _mime.join_message(_with_cte(header, "quoted-printable"), encoded)
    return (node.start, node.end, new), 1


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


def _splice(data: bytes, edits: list[Edit]) -> bytes:
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
