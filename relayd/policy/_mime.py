"""Byte-level MIME and header surgery for the policy steps (no decisions live here).

The policy must never re-serialise what it did not change (DKIM signatures of upstream
systems, S/MIME, attachments), so this module works on the raw bytes: a header block is a list
of raw fields, a multipart body is located by byte offsets of its boundary lines (RFC 2046
§5.1.1) and only the parts that get a footer are spliced back in. Everything in and out is
bytes with CRLF line endings (RFC 5322 §2.1).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import quopri
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email import quoprimime
from email.errors import MessageError
from email.header import decode_header, make_header
from email.headerregistry import Address
from email.message import Message as EmailMessage
from email.parser import BytesHeaderParser
from email.policy import SMTP as _SMTP
from email.utils import formataddr, getaddresses

CRLF = b"\r\n"
_UNSAFE = re.compile(r"[\r\n\x00]+")
_MAX_LINE = 78  # RFC 5322 §2.1.1 SHOULD; 998 is the hard limit


# -- header blocks ---------------------------------------------------------------------------

def split_message(data: bytes) -> tuple[bytes, bytes]:
    """Split into (header block incl. its final CRLF, body) at the first empty line."""
    if data.startswith(CRLF):
        return b"", data[2:]
    idx = data.find(b"\r\n\r\n")
    if idx < 0:
        return (data if data.endswith(CRLF) or not data else data + CRLF), b""
    return data[:idx + 2], data[idx + 4:]


def join_message(header: bytes, body: bytes) -> bytes:
    return header + CRLF + body


def parse_fields(header: bytes) -> list[bytes]:
    """The raw fields of a header block, each with its continuation lines and final CRLF."""
    fields: list[bytes] = []
    for line in header.split(CRLF)[:-1] if header.endswith(CRLF) else header.split(CRLF):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + CRLF  # RFC 5322 §2.2.3 folding
        else:
            fields.append(line + CRLF)
    return fields


def field_name(field: bytes) -> str:
    """The lower-cased name of a raw field."""
    # Each policy step looks the names of the same fields up again (~40 calls a message): a
    # cache of short fields (at most 1024 x 256 bytes held) costs a hash and a lookup.
    return _short_field_name(field) if len(field) <= 256 else _field_name(field)


def _field_name(field: bytes) -> str:
    return field.partition(b":")[0].strip().decode("ascii", "replace").lower()


_short_field_name = functools.lru_cache(maxsize=1024)(_field_name)


def field_value(field: bytes) -> str:
    """The unfolded value of a raw field (undecoded; 8-bit bytes read as UTF-8)."""
    _, _, raw = field.partition(b":")
    text = raw.decode("utf-8", "replace")
    if "\r\n" not in text[:-2]:  # not folded: nothing to unfold
        return text.strip()
    return re.sub(r"\r\n(?=[ \t])", "", text).strip()


def body_offset(data: bytes) -> int:
    """Where ``split_message(data)[1]`` begins in ``data``, found without copying."""
    if data.startswith(CRLF):
        return 2
    idx = data.find(b"\r\n\r\n")
    return len(data) if idx < 0 else idx + 4


def header_fields(data: bytes) -> list[bytes]:
    """The raw header fields of a message, without copying its body."""
    if data.startswith(CRLF):
        return []
    end = data.find(b"\r\n\r\n")
    return parse_fields(data if end < 0 else data[:end + 2])


def edit_header(data: bytes, edit: Callable[[Headers], Headers]) -> bytes:
    """``data`` with its header block replaced by ``edit(header)``. The body is copied once,
    into the result, and not at all when the edit changes nothing: a 100 KB body used to be
    sliced out and joined back in by every step."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or data.startswith(CRLF):  # no header or no body: the general path
        header, body = split_message(data)
        return join_message(edit(Headers.parse(header)).to_bytes(), body)
    before = Headers.parse(data[:end + 2])
    after = edit(before)
    if after.fields == before.fields:
        return data  # parse_fields + to_bytes is the identity on an unchanged block
    return b"".join((after.to_bytes(), CRLF, memoryview(data)[end + 4:]))


@dataclass(frozen=True)
class Headers:
    """An immutable header block; edits return a new one."""

    fields: tuple[bytes, ...]

    @classmethod
    def parse(cls, header: bytes) -> Headers:
        return cls(tuple(parse_fields(header)))

    def to_bytes(self) -> bytes:
        return b"".join(self.fields)

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [field_value(f) for f in self.fields if field_name(f) == key]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def has(self, name: str) -> bool:
        key = name.lower()
        return any(field_name(f) == key for f in self.fields)

    def remove(self, *names: str) -> Headers:
        keys = {n.lower() for n in names}
        return Headers(tuple(f for f in self.fields if field_name(f) not in keys))

    def add(self, name: str, value: str) -> Headers:
        """Append ``name: value`` (CR/LF/NUL from the value are flattened: no injection)."""
        return Headers((*self.fields, make_field(name, value)))

    def prepend(self, raw_field: bytes) -> Headers:
        return Headers((raw_field, *self.fields))

    def items(self) -> list[tuple[str, str]]:
        return [(f.split(b":", 1)[0].strip().decode("ascii", "replace"), field_value(f))
                for f in self.fields]


def clean(value: str) -> str:
    """Flatten CR, LF and NUL to one space: a header value can never start a new field."""
    return _UNSAFE.sub(" ", value).strip()


def make_field(name: str, value: str) -> bytes:
    """``Name: value`` + CRLF, folded at ``, `` / spaces when longer than 78 (RFC 5322 §2.2.3)."""
    name = re.sub(r"[^!-9;-~]", "", name) or "X-Invalid"
    text = f"{name}: {clean(value)}"
    if len(text) <= _MAX_LINE:
        return text.encode("utf-8") + CRLF
    out, line = [], ""
    head, _, rest = text.partition(" ")
    for token in [head + " " + t if i == 0 else t
                  for i, t in enumerate(re.split(r"(?<=,) |(?<=[^,]) (?=\S)", rest))]:
        if line and len(line) + 1 + len(token) > _MAX_LINE:
            out.append(line)
            line = " " + token
        else:
            line = f"{line} {token}" if line else token
    out.append(line)
    return "\r\n".join(out).encode("utf-8") + CRLF


def format_address(address: str, name: str | None) -> str:
    """``Name <addr>``: quoted when the name has specials, RFC 2047 encoded when non-ASCII."""
    address = clean(address)
    if not name:
        return address
    name = clean(name)
    if not name.isascii():
        # RFC 2047 §5(3) encoded words in the phrase; the stdlib's SMTP policy picks which
        # words to encode so that the whitespace between them survives decoding.
        header = _SMTP.header_factory("From", Address(display_name=name, addr_spec=address))
        return _unfold(_SMTP.fold("From", header))
    return formataddr((name, address))


def encode_unstructured(value: str) -> str:
    """An unstructured header value, RFC 2047 encoded when it is not ASCII."""
    value = clean(value)
    if value.isascii():
        return value
    return _unfold(_SMTP.fold("X-Value", _SMTP.header_factory("X-Value", value)))


def _unfold(folded: str) -> str:
    # "Name: v1\r\n v2\r\n" -> "v1 v2": unfolding removes only the CRLF (RFC 5322 §2.2.3);
    # make_field folds again where it needs to.
    return folded.split(":", 1)[1].replace("\r\n", "").strip()


def first_address(value: str | None) -> str | None:
    """The bare address of the first mailbox in an address header value."""
    if not value:
        return None
    # An application sends from a few From values, and email.utils parses one in ~15 us:
    # short ones are cached (at most 256 x 512 characters held; a header can be megabytes).
    return _short_first_address(value) if len(value) <= 512 else _first_address(value)


def _first_address(value: str) -> str | None:
    pairs = getaddresses([value])
    for _, addr in pairs:
        if addr and "@" in addr:
            return addr
    return None


_short_first_address = functools.lru_cache(maxsize=256)(_first_address)


def all_addresses(values: Iterable[str]) -> list[str]:
    return [addr for _, addr in getaddresses(list(values)) if addr and "@" in addr]


_SIMPLE_ADDRESS = re.compile(r"[^\s\"\\()<>\[\],;:@]+@[A-Za-z0-9.-]+")


def domain_of(address: str) -> str:
    if _SIMPLE_ADDRESS.fullmatch(address):
        # The common case, without the full RFC 5322 parser (a third of the DKIM step's
        # Python time before this).
        return address.rpartition("@")[2].lower()
    try:
        return Address(addr_spec=address).domain.lower()
    except (ValueError, IndexError, TypeError):
        return address.rpartition("@")[2].lower()


def decoded_header(value: str) -> str:
    """Decode RFC 2047 encoded words for matching (e.g. a priority rule on Subject)."""
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError, MessageError):  # CharsetError: "\xe9so-8859-1"
        return value


# -- the MIME tree ---------------------------------------------------------------------------

def _content_info(header: bytes) -> EmailMessage:
    return BytesHeaderParser().parsebytes(header + CRLF)


@dataclass(frozen=True)
class Leaf:
    """A non-multipart part: where it sits in the message (byte offsets) and its type; with
    ``container``, a multipart entity as a whole (``walk(..., containers=True)``)."""

    start: int  # offset of the part's first header byte in the whole message
    end: int
    content_type: str
    disposition: str
    path: str  # e.g. "1.2" for explain output ("" for a multipart message itself)
    container: bool = False


def _boundary_spans(body: bytes, boundary: bytes) -> list[tuple[int, int]] | None:
    """Byte spans of each body part between delimiter lines (RFC 2046 §5.1.1).

    The CRLF before a delimiter belongs to the delimiter, so a span ends before it. Searching
    with ``bytes.find`` keeps this fast for large base64 attachments.
    """
    dash = b"--" + boundary
    spans: list[tuple[int, int]] = []
    start: int | None = None
    pos = 0 if body.startswith(dash) else body.find(b"\r\n" + dash)
    while pos >= 0:
        head = pos if pos == 0 and body.startswith(dash) else pos + 2
        line_end = body.find(b"\r\n", head)
        line_end = len(body) if line_end < 0 else line_end
        rest = body[head + len(dash):line_end].rstrip(b" \t")
        if rest in (b"", b"--"):  # a delimiter, not a line that merely starts like one
            if start is not None:
                spans.append((start, max(start, pos)))
            if rest == b"--":
                return spans if start is not None else None
            start = min(len(body), line_end + 2)
        pos = body.find(b"\r\n" + dash, line_end)
    if start is None:
        return None
    spans.append((start, len(body)))  # no close delimiter: the last part runs to the end
    return spans


MAX_DEPTH = 32  # real mail nests a few levels; deeper trees are left alone (no RecursionError)


def walk(data: bytes, offset: int = 0, path: str = "", *, containers: bool = False) -> Iterable[Leaf]:
    """Yield the leaves of the MIME tree that may be decorated; multipart/signed and
    multipart/encrypted (RFC 1847) and message/* are opaque and yield nothing, and so is
    anything nested deeper than MAX_DEPTH. With ``containers``, each multipart entity is
    yielded too (``container=True``), before its parts; a signed or encrypted one as well,
    without its parts (the 7-bit conversion at delivery needs their headers)."""
    if path.count(".") >= MAX_DEPTH:
        return
    header, body = split_message(data)
    info = _content_info(header)
    ctype = info.get_content_type()
    body_offset = offset + len(header) + (2 if header or data.startswith(CRLF) else 0)
    if ctype.startswith("multipart/"):
        if containers:
            yield Leaf(offset, offset + len(data), ctype, "inline", path, container=True)
        if ctype in ("multipart/signed", "multipart/encrypted"):
            return
        boundary = info.get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            return
        spans = _boundary_spans(body, boundary.encode("utf-8", "replace"))
        for i, (s, e) in enumerate(spans or []):
            yield from walk(body[s:e], body_offset + s, f"{path}.{i + 1}" if path else str(i + 1),
                            containers=containers)
        return
    disposition = (info.get_content_disposition() or "inline").lower()
    yield Leaf(offset, offset + len(data), ctype, disposition, path or "1")


def is_opaque(data: bytes) -> str | None:
    """The top-level type when the message must never be modified (signed or encrypted)."""
    ctype = _content_info(split_message(data)[0]).get_content_type()
    return ctype if ctype in ("multipart/signed", "multipart/encrypted") else None


def content_type(data: bytes) -> str:
    return _content_info(split_message(data)[0]).get_content_type()


# -- decorating one text part ----------------------------------------------------------------

@dataclass(frozen=True)
class PartEdit:
    """The result of trying to decorate one leaf."""

    new_bytes: bytes | None
    note: str


def _decode_body(body: bytes, cte: str) -> bytes:
    if cte == "base64":
        return base64.b64decode(b"".join(body.split()), validate=False)
    if cte == "quoted-printable":
        return quopri.decodestring(body)
    return body


def _encode_body(raw: bytes, cte: str) -> bytes:
    if cte == "base64":
        return wrap_base64(base64.b64encode(raw))
    if cte == "quoted-printable":
        return quoprimime.body_encode(raw.decode("latin-1"), maxlinelen=76,
                                      eol="\r\n").encode("latin-1")
    return raw


def wrap_base64(encoded: bytes) -> bytes:
    """Base64 characters in lines of 76, each ending with CRLF (RFC 2045 §6.8)."""
    return CRLF.join([encoded[i:i + 76] for i in range(0, len(encoded), 76)]) + CRLF


def _charset_ok(name: str) -> bool:
    try:
        codecs.lookup(name)
    except (LookupError, ValueError):  # ValueError: a NUL in the charset parameter
        return False
    return True


def decorate_part(part: bytes, text_footer: str | None, html_footer: str | None) -> PartEdit:
    """Add the footer to one text/plain or text/html leaf, in its own charset and CTE.

    The decoded original text is kept exactly; only this part's bytes change. When the footer
    cannot be written in the part's charset the part becomes UTF-8, and a 7bit part that now
    needs 8-bit bytes becomes quoted-printable (both header edits stay within this part).
    """
    header, body = split_message(part)
    info = _content_info(header)
    ctype = info.get_content_type()
    footer = text_footer if ctype == "text/plain" else html_footer if ctype == "text/html" else None
    if footer is None:
        return PartEdit(None, f"{ctype}: no footer configured for this type")
    cte = str(info.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if cte not in ("7bit", "8bit", "binary", "base64", "quoted-printable"):
        return PartEdit(None, f"{ctype}: unknown transfer encoding {cte!r}")
    charset = str(info.get_content_charset("us-ascii")).lower()
    if not _charset_ok(charset):
        return PartEdit(None, f"{ctype}: unknown charset {charset!r}")
    try:
        raw = _decode_body(body, cte)
    except (binascii.Error, ValueError):
        return PartEdit(None, f"{ctype}: body does not decode as {cte}; left as is")

    try:
        text = raw.decode(charset)
    except UnicodeDecodeError:
        if charset != "us-ascii":
            return PartEdit(None, f"{ctype}: body does not decode as {charset}; left as is")
        # Undeclared 8-bit text (PHP mail() and cron send it): read it as UTF-8 and keep the
        # label as received, so the original bytes stay exactly as they were.
        try:
            text, charset = raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            return PartEdit(None, f"{ctype}: undeclared 8-bit body that is not UTF-8; left as is")
    eol = "\r\n" if "\r\n" in text or cte not in ("base64",) else "\n"
    footer = footer.replace("\r\n", "\n").replace("\n", eol)
    if ctype == "text/html":
        ends = list(re.finditer(r"</body\s*>", text, re.IGNORECASE))
        m = ends[-1] if ends else None
        new_text = text[:m.start()] + footer + eol + text[m.start():] if m else text + eol + footer + eol
    else:
        sep = "" if text.endswith(eol) or not text else eol
        new_text = f"{text}{sep}{eol}-- {eol}{footer}{eol}"
    new_header = header
    try:
        new_raw = new_text.encode(charset)
    except UnicodeEncodeError:
        # The footer does not fit the part's charset: the part becomes UTF-8 (RFC 2045 §5.1).
        charset = "utf-8"
        new_raw = new_text.encode(charset)
        new_header = _set_param(new_header, "Content-Type", "charset", charset)
    if cte == "7bit" and raw.isascii() and not new_raw.isascii():
        cte = "quoted-printable"
        new_header = replace_field(new_header, "Content-Transfer-Encoding", "quoted-printable")
    if cte in ("7bit", "8bit", "binary") and new_raw.startswith(raw):
        new_body = body + new_raw[len(raw):]  # original bytes untouched, footer appended
    else:
        new_body = _encode_body(new_raw, cte)
    return PartEdit(join_message(new_header, new_body), f"{ctype}: footer added ({charset}, {cte})")


def replace_field(header: bytes, name: str, value: str) -> bytes:
    """``header`` with one ``name: value`` field where its ``name`` fields were (appended
    when it has none)."""
    h = Headers.parse(header)
    if h.has(name):
        fields = [make_field(name, value) if field_name(f) == name.lower() else f for f in h.fields]
        # keep one occurrence only
        seen, out = False, []
        for f in fields:
            if field_name(f) == name.lower():
                if seen:
                    continue
                seen = True
            out.append(f)
        return b"".join(out)
    return h.add(name, value).to_bytes()


def _set_param(header: bytes, name: str, param: str, value: str) -> bytes:
    info = _content_info(header)
    info.set_param(param, value, header=name)
    return replace_field(header, name, str(info[name]))


def decorate(data: bytes, text_footer: str | None, html_footer: str | None,
             skip: Callable[[Leaf], str | None]) -> tuple[bytes, tuple[str, ...]]:
    """Decorate every eligible leaf of ``data``; returns the new bytes and one note per leaf.

    ``skip(leaf)`` returns a reason to leave a leaf alone (attachment, calendar ...) or None.
    Leaves are spliced from the end so earlier offsets stay valid.
    """
    notes: list[str] = []
    edits: list[tuple[Leaf, bytes]] = []
    for leaf in walk(data):
        reason = skip(leaf)
        if reason:
            notes.append(f"part {leaf.path} {leaf.content_type}: skipped ({reason})")
            continue
        edit = decorate_part(data[leaf.start:leaf.end], text_footer, html_footer)
        notes.append(f"part {leaf.path} {edit.note}")
        if edit.new_bytes is not None:
            edits.append((leaf, edit.new_bytes))
    out = data
    for leaf, new in sorted(edits, key=lambda e: e[0].start, reverse=True):
        out = out[:leaf.start] + new + out[leaf.end:]
    return out, tuple(notes)
