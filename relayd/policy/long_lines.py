"""Lines over 998 octets re-encoded at acceptance (RFC 5322 §2.1.1, RFC 5321 §4.5.3.1.6).

Applications send minified HTML and generated text with lines of tens of kilobytes; relayd
accepts them, but strict smarthosts (Exim 4.95 and later by default, some filters) refuse or
break such mail, and Postfix's remedy (a CRLF and a space inserted every 998 octets) changes
the content. Here the MIME parts that have such lines get a transfer encoding whose lines
are short and which decodes to exactly the bytes the application wrote:

- a leaf (or a message that is not multipart) labelled 7bit or 8bit, or not labelled, becomes
  quoted-printable (RFC 2045 §6.7: lines of at most 76), checked by decoding it again;
- a base64 part with long lines is wrapped again at 76 characters (RFC 2045 §6.8), the same
  characters in the same order;
- a message without MIME-Version whose body needs this is first made MIME (RFC 1428 §3,
  as relayd/delivery/smtp/sevenbit.py does);
- a header line over 998 octets is folded before whitespace (RFC 5322 §2.2.3), which
  unfolding undoes.

Left as they are (and said so in a note): signed or encrypted content (multipart/signed,
multipart/encrypted: RFC 1847 signatures cover the encoded form), Content-Transfer-Encoding
binary (RFC 3030), quoted-printable with long lines (malformed: RFC 2045 §6.7 rule 5),
message/* other than rfc822, a header line without whitespace to fold at, and anything
outside the MIME parts (a preamble or epilogue).

It is a pipeline step just before DKIM signing, so relayd's own signature covers the
converted form; it runs in the acceptance worker thread, like every step. The check on every
message is ``bytescan.has_long_line`` (C, memchr): ~0.1 µs for 1 KB, ~8 µs for 100 KB.
"""

from __future__ import annotations

import binascii
import dataclasses
import re

from relayd.bytescan import has_long_line
from relayd.policy import _mime, _reencode
from relayd.policy.records import LONG_LINES, NOT_REENCODED, Copy, Draft, Note, Policy, PolicyContext

LIMIT = 998  # octets, not counting the CRLF (RFC 5322 §2.1.1)
STEP = LONG_LINES
_NON_WSP = re.compile(rb"[^ \t]")


@dataclasses.dataclass(frozen=True, slots=True)
class Reencoded:
    """A message with its long lines re-encoded, what changed, and what was left long."""

    content: bytes
    quoted_printable: int = 0  # parts re-encoded as quoted-printable
    base64: int = 0            # base64 parts wrapped again
    folded: int = 0            # header lines folded
    left: tuple[str, ...] = ()  # why long lines remain, one clause each

    def notes(self) -> list[str]:
        out = []
        if self.quoted_printable:
            out.append(f"lines longer than {LIMIT} octets re-encoded as quoted-printable "
                       f"({_count(self.quoted_printable, 'MIME part')}; RFC 5322 §2.1.1)")
        if self.base64:
            out.append(f"base64 lines longer than {LIMIT} octets wrapped at 76 "
                       f"({_count(self.base64, 'MIME part')}; RFC 2045 §6.8)")
        if self.folded:
            out.append(f"header lines longer than {LIMIT} octets folded "
                       f"({_count(self.folded, 'line')}; RFC 5322 §2.2.3)")
        if self.left:
            out.append(f"lines longer than {LIMIT} octets left as they are: "
                       + "; ".join(self.left))
        return out


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def reencode(content: bytes) -> Reencoded:
    """``content`` (CRLF line ends) with no line over 998 octets where that can be done
    without changing what it decodes to; ``content`` itself when it has no such line."""
    if not has_long_line(content, LIMIT):
        return Reencoded(content)
    rules = _LongLines()
    out = _reencode.convert(content, rules)
    if not rules.left and has_long_line(out, LIMIT):
        rules.left.append("a line outside the MIME parts (a preamble or epilogue, or a part "
                          "the MIME structure does not reach)")
    return Reencoded(out, rules.quoted_printable, rules.base64, rules.folded, tuple(rules.left))


def step(draft: Draft, policy: Policy, ctx: PolicyContext) -> Draft:
    """The pipeline step: every copy re-encoded; notes (for the log and explain) only when a
    message has long lines. It never refuses a message: on an unexpected error the copies
    stay as they were and the note says why (logged as a warning)."""
    if not any(has_long_line(c.content, LIMIT) for c in draft.copies):
        return draft
    try:
        done = [reencode(c.content) for c in draft.copies]
    except Exception as exc:  # a bug here must not cost the message: it is sent as received
        return draft.note(STEP, f"{NOT_REENCODED}: {type(exc).__name__}: {exc}")
    copies = tuple(Copy(c.rcpts, r.content) for c, r in zip(draft.copies, done, strict=True))
    notes = (*draft.notes, *(Note(STEP, text) for text in done[0].notes()))
    return dataclasses.replace(draft, copies=copies, notes=notes)


class _LongLines:
    """The long-line rules (``_reencode.Rules``); counts what it changed and what it left."""

    def __init__(self) -> None:
        self.quoted_printable = self.base64 = self.folded = 0
        self.left: list[str] = []

    def needed(self, data: bytes) -> bool:
        return has_long_line(data, LIMIT)

    def check_header(self, header: bytes, name: str) -> None:
        return None  # any header can be folded, or left

    def too_deep(self, name: str) -> None:
        self.left.append(f"{name} nests messages deeper than {_mime.MAX_DEPTH} levels")

    def container(self, data: bytes, node: _mime.Leaf, header: bytes, name: str) -> bytes | None:
        if node.content_type in ("multipart/signed", "multipart/encrypted") and has_long_line(
                data[node.start + len(header) + 2:node.end], LIMIT):
            self.left.append(f"{name} is {node.content_type}, whose signature covers the "
                                 f"encoded form (RFC 1847)")
        return self._fold(header, name)

    def attached(self, header: bytes, cte: str, name: str) -> bytes | None:
        if cte not in ("7bit", "8bit"):
            self.left.append(f"{name} is message/rfc822 with Content-Transfer-Encoding {cte}")
            return None
        return self._fold(header, name) or header

    def leaf(self, header: bytes, body: bytes, cte: str, ctype: str, name: str) -> bytes | None:
        new_header = self._fold(header, name)
        new_body = None
        if has_long_line(body, LIMIT):
            new_body = self._body(body, cte, ctype, name)
            if new_body is not None and cte != "base64":
                new_header = _reencode.with_cte(new_header or header, "quoted-printable")
        if new_header is None and new_body is None:
            return None
        return _mime.join_message(header if new_header is None else new_header,
                                  body if new_body is None else new_body)

    def _body(self, body: bytes, cte: str, ctype: str, name: str) -> bytes | None:
        if ctype.startswith("message/"):
            self.left.append(f"{name} is {ctype}")
        elif cte in ("7bit", "8bit"):
            encoded = _reencode.quoted_printable(body)
            if encoded is not None:
                self.quoted_printable += 1
                return encoded
            self.left.append(f"{name} has a bare CR or LF")
        elif cte == "base64":
            wrapped = rewrap_base64(body)
            if wrapped is not None:
                self.base64 += 1
                return wrapped
            self.left.append(f"{name} is not valid base64")
        elif cte == "quoted-printable":
            self.left.append(f"{name} is malformed quoted-printable (RFC 2045 §6.7: lines of "
                             f"at most 76)")
        else:
            self.left.append(f"{name} has Content-Transfer-Encoding {cte}")
        return None

    def finish(self, out: bytes, name: str) -> None:
        return None  # what is still long was noted where it was left

    def _fold(self, header: bytes, name: str) -> bytes | None:
        """``header`` with its long lines folded; None when none was (or could be)."""
        if not has_long_line(header, LIMIT):
            return None
        lines = header.split(b"\r\n")
        changed = False
        for i, line in enumerate(lines):
            if len(line) > LIMIT:
                folded = fold_line(line)
                if folded is None:
                    self.left.append(f"a header line of {name} has no whitespace to fold at")
                else:
                    lines[i], changed = folded, True
                    self.folded += 1
        return b"\r\n".join(lines) if changed else None


def fold_line(line: bytes) -> bytes | None:
    """A header line (without its CRLF) with a CRLF inserted before whitespace wherever it
    must be for no line to be over 998 octets (RFC 5322 §2.2.3: unfolding removes exactly
    these CRLFs); None when there is no such whitespace. No line it makes is only whitespace
    (RFC 5322 §3.2.2)."""
    stop = len(line.rstrip(b" \t"))  # a break at or past the last non-blank would leave one
    pieces: list[bytes] = []
    start = 0
    while len(line) - start > LIMIT:
        found = _NON_WSP.search(line, start)
        if found is None:
            return None
        # The break at i: line[start:i] (at most LIMIT octets, not only whitespace) ends a
        # line, and the next starts with the whitespace at i.
        lo, hi = found.start() + 1, min(start + LIMIT, stop - 1) + 1
        i = max(line.rfind(b" ", lo, hi), line.rfind(b"\t", lo, hi))
        if i < 0:
            return None
        pieces.append(line[start:i])
        start = i
    pieces.append(line[start:])
    return b"\r\n".join(pieces)


def rewrap_base64(body: bytes) -> bytes | None:
    """A base64 body in lines of 76 (RFC 2045 §6.8): the same characters in the same order,
    so the same decoded bytes; None when it is not valid base64. Keeps whether the body ended
    with a line end."""
    joined = b"".join(body.split())
    try:
        binascii.a2b_base64(joined, strict_mode=True)
    except binascii.Error:
        return None
    wrapped = _mime.wrap_base64(joined)
    return wrapped if body.endswith(b"\r\n") else wrapped[:-2]
