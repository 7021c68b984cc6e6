"""DKIM signatures made by relayd: canonicalization and the DKIM-Signature field (RFC 6376),
with the private-key operation, rsa-sha256 or ed25519-sha256 (RFC 8463), done by OpenSSL
through ``cryptography``.

Only signing lives here; receivers verify (the tests verify every signature with dkimpy and
with OpenDKIM). relayd signs relaxed/relaxed (§3.4.2, §3.4.4), which survives the whitespace
refolding some smarthosts do. Nothing here does I/O or reads the clock: the PEM bytes and the
signing time come in as arguments.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

    PrivateKey = RSAPrivateKey | Ed25519PrivateKey

RSA_SHA256 = "rsa-sha256"
ED25519_SHA256 = "ed25519-sha256"
CRLF = b"\r\n"
_WSP_RUN = re.compile(rb"[ \t]+")
# Runs of WSP other than a single SP: the only ones relaxed body canonicalization changes.
_WSP_TO_SP = re.compile(rb"[ \t]{2,}|\t")
# What relaxed_body looks for first: the regex engine's literal search is faster than
# bytes.find for these two- and three-byte needles (docs/performance.md, fourth round).
_SPACE_RUN = re.compile(rb"  ")
_SPACE_AT_END = re.compile(rb" \r\n")
_LINE_END = re.compile(rb"\r?\n")
_B64_LINE = 72  # b= folded so that no line of the field exceeds 78 (RFC 5322 §2.1.1)


class DkimKeyError(ValueError):
    """A key file that cannot sign with its entry's algorithm; the text names why, never the key."""


def load_private_key(pem: bytes, algorithm: str) -> PrivateKey:
    """The private key in ``pem`` (PKCS#1 or PKCS#8), checked against ``algorithm``."""
    # lazy: cryptography's native module is ~5 MB per process, needed only where a dkim: entry
    # signs (relayd/secrets.py does the same).
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The library's message is dropped on purpose: it could quote the file.
        raise DkimKeyError("is not a PEM private key without a passphrase") from None
    if algorithm == ED25519_SHA256:
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise DkimKeyError("is not an Ed25519 private key (algorithm: ed25519-sha256); "
                               "make one with `openssl genpkey -algorithm ed25519`")
        return key
    if not isinstance(key, rsa.RSAPrivateKey):
        raise DkimKeyError(f"is not an RSA private key (algorithm: {algorithm}); "
                           "make one with `openssl genrsa 2048`")
    if key.key_size < 1024:
        # RFC 8301 §3.2: verifiers MUST NOT accept RSA keys under 1024 bits.
        raise DkimKeyError(f"is a {key.key_size}-bit RSA key; DKIM needs at least 1024 bits "
                           "(RFC 8301), 2048 is usual")
    return key


def public_record(key: PrivateKey) -> str:
    """The DNS TXT value to publish at ``SELECTOR._domainkey.DOMAIN`` for ``key``."""
    from cryptography.hazmat.primitives import serialization  # lazy: see load_private_key
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pub = key.public_key()
    if isinstance(pub, ed25519.Ed25519PublicKey):
        # RFC 8463 §4.2: p= is the bare 32-byte public key, base64.
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")
    der = pub.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")


# -- canonicalization (RFC 6376 §3.4) ---------------------------------------------------------

def relaxed_header(field: bytes) -> bytes:
    """One raw header field (with its continuation lines) in relaxed form, CRLF-terminated:
    name lower-cased, unfolded, runs of WSP to one SP, WSP around the colon and at the end
    removed (§3.4.2)."""
    name, _, value = field.partition(b":")
    value = value.strip(b" \t\r\n")
    if b"\n" in value or b"\t" in value or b"  " in value:  # folded or runs of WSP
        value = _WSP_RUN.sub(b" ", _LINE_END.sub(b"", value))
    return name.rstrip(b" \t").lower() + b":" + value + CRLF


def relaxed_body(data: bytes, start: int = 0) -> memoryview:
    """The body ``data[start:]`` in relaxed form (§3.4.4), without copying a body that is
    already canonical.

    ``data`` has CRLF line ends, as the listener stores every message (bare CR and LF become
    CRLF there, smtpd/listener.py) and ``relayd explain`` reads files. Typical mail (single
    spaces, no WSP at line ends) then costs three substring scans in C and no regex.
    Trailing spaces (format=flowed text ends most lines with one, RFC 3676) and runs of
    spaces are removed with ``bytes.replace``; only a body with a tab needs the regex, which
    would otherwise match every single space (docs/performance.md, fourth round).
    """
    tabs = data.find(b"\t", start) >= 0  # one byte: memchr
    runs = _SPACE_RUN.search(data, start) is not None
    if (tabs or runs or _SPACE_AT_END.search(data, start) is not None
            or (len(data) > start and not data.endswith(CRLF))):
        body = data[start:]
        if not body.endswith(CRLF):
            body += CRLF  # §3.4.3/§3.4.4: a non-empty body ends with CRLF
        if tabs:  # §3.4.4 b: every run of WSP to one SP (after this, no tab and no run)
            body = _WSP_TO_SP.sub(b" ", body)
        elif runs:  # the same for runs of spaces only: each pass halves every run
            while b"  " in body:
                body = body.replace(b"  ", b" ")
        # §3.4.4 a: WSP at line ends is ignored; after the above at most one SP is there.
        data, start = body.replace(b" \r\n", CRLF), 0
    end = len(data)
    while end - start >= 4 and data.endswith(b"\r\n\r\n", start, end):
        end -= 2  # empty lines at the end are ignored
    if end - start == 2 and data.startswith(CRLF, start):
        end = start  # a body of only empty lines hashes as empty (RFC 6376 errata 3192)
    return memoryview(data)[start:end]


def body_hash(data: bytes, start: int = 0) -> str:
    """``bh=`` of the body ``data[start:]``: base64 of SHA-256 over its relaxed form (§3.7)."""
    with relaxed_body(data, start) as view:
        return base64.b64encode(hashlib.sha256(view).digest()).decode("ascii")


def select_fields(fields: Sequence[bytes], names: Iterable[str]) -> list[bytes]:
    """The fields named in h=, each occurrence of a name taking the next instance from the
    bottom of the header block (§5.4.2); a name with no instance left selects nothing."""
    lowered = [f.split(b":", 1)[0].strip().lower() for f in fields]
    out: list[bytes] = []
    last: dict[bytes, int] = {}
    for name in names:
        key = name.lower().encode("ascii")
        i = last.get(key, len(fields))
        while i > 0:
            i -= 1
            if lowered[i] == key:
                out.append(fields[i])
                break
        last[key] = i
    return out


# -- the DKIM-Signature field (§3.5, §5) ----------------------------------------------------

def signature_field(key: PrivateKey, algorithm: str, domain: str, selector: str,
                    fields: Sequence[bytes], content: bytes, body_at: int,
                    names: Sequence[str], timestamp: int) -> bytes:
    """A complete ``DKIM-Signature`` field (CRLF-terminated) for ``content``, whose header
    block is ``fields`` (raw, as ``_mime.parse_fields`` gives them) and whose body starts at
    ``body_at``, signing the fields in ``names`` (h=, in that order)."""
    head = (f"DKIM-Signature: v=1; a={algorithm}; c=relaxed/relaxed; d={domain};\r\n"
            f" s={selector}; t={timestamp};\r\n"
            f" h={':'.join(n.lower() for n in names)};\r\n"
            f" bh={body_hash(content, body_at)};\r\n"
            " b=").encode("ascii")
    # §3.7: the signed data is the selected fields, then this field with an empty b= and no
    # final CRLF, all in the header canonicalization.
    data = b"".join(relaxed_header(f) for f in select_fields(fields, names))
    data += relaxed_header(head)[:-2]
    b64 = base64.b64encode(_sign(key, algorithm, data))
    lines = [b64[i:i + _B64_LINE] for i in range(0, len(b64), _B64_LINE)]
    return head + b"\r\n ".join(lines) + CRLF


def _sign(key: PrivateKey, algorithm: str, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes  # lazy: see load_private_key
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding

    if algorithm == ED25519_SHA256:
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        # RFC 8463 §3: PureEdDSA over the SHA-256 hash of the data, not over the data.
        return key.sign(hashlib.sha256(data).digest())
    assert not isinstance(key, ed25519.Ed25519PrivateKey)
    # RFC 6376 §3.3.1: RSASSA-PKCS1-v1_5 with SHA-256. OpenSSL does the RSA operation with
    # the GIL released, so the event loop runs on the other core meanwhile.
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
