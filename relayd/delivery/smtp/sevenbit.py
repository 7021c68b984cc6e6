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

The MIME walk, the encoder and the splicing are relayd/policy/_reencode.py's, shared with the
long-line conversion at acceptance; this module holds the 7-bit rules. Only the parts that
change are rewritten. Only delivery imports this module, and only for an 8-bit message to a
server without 8BITMIME: it needs the email package, which the delivery process otherwise
never loads. It runs in a worker thread (relayd/delivery/smtp/transaction.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from relayd.policy import _mime, _reencode
from relayd.policy._reencode import SLICE, Unconvertible, quoted_printable

__all__ = ["SLICE", "Converted", "Unconvertible", "quoted_printable", "to_7bit"]


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
    rules = _SevenBit()
    out = _reencode.convert(content, rules)
    signed = any(_mime.field_name(f) == "dkim-signature" for f in _mime.header_fields(content))
    return Converted(out, rules.parts, signed)


class _SevenBit:
    """The 7-bit rules (``_reencode.Rules``): what has 8-bit bytes becomes quoted-printable or
    is relabelled 7bit, and anything else with 8-bit bytes raises ``Unconvertible``."""

    def __init__(self) -> None:
        self.parts = 0  # leaves re-encoded as quoted-printable

    def needed(self, data: bytes) -> bool:
        return not data.isascii()

    def check_header(self, header: bytes, name: str) -> None:
        if not header.isascii():
            raise Unconvertible(f"{name} has 8-bit headers")

    def too_deep(self, name: str) -> None:
        raise Unconvertible(f"{name} nests messages deeper than {_mime.MAX_DEPTH} levels")

    def container(self, data: bytes, node: _mime.Leaf, header: bytes, name: str) -> bytes | None:
        """Signed or encrypted content must be 7-bit already, and an 8bit or binary label
        becomes 7bit (the parts are converted one by one)."""
        if node.content_type in ("multipart/signed", "multipart/encrypted"):
            if not data[node.start:node.end].isascii():
                what = "signed" if node.content_type == "multipart/signed" else "encrypted"
                raise Unconvertible(f"{name} is {what} ({node.content_type}) and has 8-bit "
                                    f"content, which converting would break")
            return None
        if _reencode.cte_of(header) in ("8bit", "binary"):
            return _reencode.with_cte(header, "7bit")
        return None

    def attached(self, header: bytes, cte: str, name: str) -> bytes | None:
        if cte not in ("7bit", "8bit"):
            raise Unconvertible(f"{name} is message/rfc822 with Content-Transfer-Encoding {cte}")
        return _reencode.with_cte(header, "7bit") if cte == "8bit" else header

    def leaf(self, header: bytes, body: bytes, cte: str, ctype: str, name: str) -> bytes | None:
        if ctype.startswith("message/"):
            raise Unconvertible(f"{name} is {ctype} with 8-bit content")
        if cte == "binary":
            raise Unconvertible(f"{name} has Content-Transfer-Encoding binary")
        if cte not in ("7bit", "8bit"):
            raise Unconvertible(f"{name} says it is {cte} but has 8-bit bytes")
        encoded = quoted_printable(body)
        if encoded is None:
            raise Unconvertible(f"{name} has a bare CR or LF, which quoted-printable cannot keep")
        self.parts += 1
        return _mime.join_message(_reencode.with_cte(header, "quoted-printable"), encoded)

    def finish(self, out: bytes, name: str) -> None:
        if not out.isascii():
            raise Unconvertible(f"{name} has 8-bit bytes outside its MIME parts (in a preamble "
                                f"or epilogue, or nested deeper than {_mime.MAX_DEPTH} levels)")
