"""relayd's DKIM signer (relayd/policy/dkim.py) against dkimpy: the same canonical header and
body hashes on the corpus and on generated messages, and signatures that verify, rsa-sha256
and ed25519-sha256, alone and side by side. OpenDKIM checks the same signatures in
tests/integration/test_dkim_e2e.py."""

from __future__ import annotations

import base64
import re
import subprocess
import time
from functools import cache

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.policy import _mime
from relayd.policy.dkim import (
    DkimKeyError,
    body_hash,
    load_private_key,
    public_record,
    relaxed_header,
    select_fields,
)
from relayd.policy.records import DkimSigner
from relayd.policy.signing import covered, sign_bytes
from tests.support.policy_helpers import corpus, dkim_keypair, eml


@cache
def ed25519_pem() -> bytes:
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@cache
def signers() -> dict[str, DkimSigner]:
    return {
        "rsa-sha256": DkimSigner("example.com", "rsa", "rsa-sha256",
                                 load_private_key(dkim_keypair()[0], "rsa-sha256")),
        "ed25519-sha256": DkimSigner("example.com", "ed", "ed25519-sha256",
                                     load_private_key(ed25519_pem(), "ed25519-sha256")),
    }


def dns(name: bytes, timeout: int = 5) -> bytes:
    selector = name.split(b".", 1)[0].decode()
    by_selector = {s.selector: s for s in signers().values()}
    return public_record(by_selector[selector].key).encode()


def verifies(message: bytes, index: int = 0) -> bool:
    try:
        return bool(dkim.DKIM(message).verify(idx=index, dnsfunc=dns))
    except dkim.DKIMException:  # a body hash mismatch raises rather than returning False
        return False


def tag(message: bytes, name: str, index: int = 0) -> str:
    sig = _mime.Headers.parse(_mime.split_message(message)[0]).get_all("DKIM-Signature")[index]
    m = re.search(rf"(?:^|;)\s*{name}=([^;]*)", sig)
    assert m is not None
    return re.sub(r"\s+", "", m.group(1))


def dkimpy_bh(content: bytes, names: tuple[str, ...]) -> str:
    sig = dkim.sign(content, b"rsa", b"example.com", dkim_keypair()[0],
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=[n.encode() for n in names])
    return tag(sig + content, "bh")


@pytest.mark.parametrize("name", corpus())
@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_corpus_signatures_match_dkimpy_and_verify(name: str, algorithm: str) -> None:
    content = eml(name)
    out = sign_bytes((signers()[algorithm],), content, time.time())
    names = covered(_mime.parse_fields(_mime.split_message(content)[0]))
    assert tag(out, "bh") == dkimpy_bh(content, names)
    assert tag(out, "a") == algorithm and tag(out, "c") == "relaxed/relaxed"
    assert verifies(out)
    assert not verifies(out.replace(b"\r\n\r\n", b"\r\n\r\nX", 1))


def test_canonical_header_hash_is_dkimpys() -> None:
    # dkimpy recomputes the header hash from our h= and our field; RSASSA-PKCS1-v1_5 is
    # deterministic, so re-signing the data dkimpy hashed gives our b= byte for byte.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    content = eml("plain.eml")
    out = sign_bytes((signers()["rsa-sha256"],), content, time.time())
    fields = _mime.parse_fields(_mime.split_message(out)[0])
    sig_field = fields[0]
    name, _, value = sig_field.partition(b":")
    hashed = dkim.RE_BTAG.sub(b"\\1", value)
    selected = dkim.select_headers([(f.partition(b":")[0], f.partition(b":")[2]) for f in fields[1:]],
                                   [n.encode() for n in tag(out, "h").split(":")])
    data = b"".join(n + b":" + v for n, v in Relaxed.canonicalize_headers(selected))
    ((n, v),) = Relaxed.canonicalize_headers([(name, hashed)])
    data += n + b":" + v.rstrip()
    key = signers()["rsa-sha256"].key
    assert not isinstance(key, ed25519.Ed25519PrivateKey)
    again = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    assert base64.b64encode(again).decode() == tag(out, "b")


def test_dual_signing_adds_two_fields_that_each_verify() -> None:
    content = eml("alternative.eml")
    out = sign_bytes((signers()["rsa-sha256"], signers()["ed25519-sha256"]), content, time.time())
    assert out.count(b"DKIM-Signature:") == 2
    assert [tag(out, "a", 0), tag(out, "a", 1)] == ["rsa-sha256", "ed25519-sha256"]
    assert verifies(out, 0) and verifies(out, 1)
    assert tag(out, "bh", 0) == tag(out, "bh", 1)


def test_header_selection_takes_the_last_instance_first() -> None:
    fields = [b"From: a\r\n", b"To: x\r\n", b"From: b\r\n"]
    assert select_fields(fields, ["from", "from", "from", "to"]) == [
        b"From: b\r\n", b"From: a\r\n", b"To: x\r\n"]


# -- generated messages ----------------------------------------------------------------------

_WSP = st.sampled_from([" ", "\t", "  ", " \t "])
_WORD = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126,
                                        exclude_characters=":"), min_size=1, max_size=8)
_VALUE = st.lists(st.tuples(_WORD, _WSP, st.booleans()), min_size=1, max_size=6).map(
    # word, whitespace, and sometimes a fold (CRLF before the whitespace, RFC 5322 §2.2.3)
    lambda parts: "".join(w + ("\r\n" if fold else "") + s for w, s, fold in parts))
_LINE = st.lists(st.one_of(_WORD, _WSP), max_size=8).map("".join)
_BODY = st.lists(_LINE, max_size=12).map(lambda lines: "".join(f"{ln}\r\n" for ln in lines))


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    extra = draw(st.lists(st.tuples(st.sampled_from(["Subject", "To", "X-Tag", "Date"]), _VALUE),
                          max_size=5))
    fields = [("From", "App <app@example.com>"), *extra]
    head = "".join(f"{n}:{draw(st.sampled_from(['', ' ', '  ', chr(9)]))}{v}\r\n"
                   for n, v in fields)
    trailing = draw(st.sampled_from(["", "\r\n", "\r\n\r\n", " \r\n\t\r\n"]))
    return (head + "\r\n" + draw(_BODY) + trailing).encode()


@settings(max_examples=150, deadline=None)
@given(messages())
def test_generated_messages_hash_as_dkimpy_hashes_them(content: bytes) -> None:
    header, body = _mime.split_message(content)
    fields = _mime.parse_fields(header)
    assert body_hash(body) == dkimpy_bh(content, covered(fields) or ("from",))
    for f in fields:
        name, _, value = f.partition(b":")
        ((n, v),) = Relaxed.canonicalize_headers([(name, value)])
        assert relaxed_header(f) == n + b":" + v


@settings(max_examples=40, deadline=None)
@given(messages(), st.sampled_from(["rsa-sha256", "ed25519-sha256"]))
def test_generated_messages_verify(content: bytes, algorithm: str) -> None:
    out = sign_bytes((signers()[algorithm],), content, time.time())
    assert verifies(out)


# Bodies arrive with CRLF line ends (the listener turns bare CR and LF into CRLF).
@pytest.mark.parametrize("body", [b"", b"\r\n", b"\r\n\r\n", b"a\r\n", b"a", b"a \t \r\n\r\n",
                                  b"x  y\t\tz\r\n \r\n", b"\r\n\r\nx\r\n\r\n"])
def test_edge_bodies_hash_as_dkimpy_hashes_them(body: bytes) -> None:
    content = b"From: a@example.com\r\n\r\n" + body
    assert body_hash(body) == dkimpy_bh(content, ("from",))
    assert body_hash(content, len(content) - len(body)) == body_hash(body)


# Without a tab, runs of spaces and spaces at line ends take bytes.replace, not the regex
# (relayd/policy/dkim.py); these bodies exercise that path only.
_SPACE_LINE = st.lists(st.sampled_from(["w", "x.", " ", "  ", "   "]), max_size=10).map("".join)
_SPACE_BODY = st.lists(_SPACE_LINE, max_size=15).map(lambda ls: "".join(f"{ln}\r\n" for ln in ls))


@settings(max_examples=150, deadline=None)
@given(_SPACE_BODY)
def test_bodies_with_spaces_but_no_tab_hash_as_dkimpy_hashes_them(body: str) -> None:
    raw = body.encode()
    assert body_hash(raw) == dkimpy_bh(b"From: a@example.com\r\n\r\n" + raw, ("from",))


def test_a_flowed_body_signs_and_verifies() -> None:
    # format=flowed (RFC 3676) ends most lines with a space: the common case of line-end WSP.
    body = b"".join(b"line %d of a flowed paragraph, soft-broken here \r\n" % i
                    for i in range(2000)) + b"the last line\r\n"
    content = b"From: App <app@example.com>\r\nSubject: flowed\r\n\r\n" + body
    assert body_hash(body) == dkimpy_bh(content, ("from", "subject"))
    for algorithm in ("rsa-sha256", "ed25519-sha256"):
        assert verifies(sign_bytes((signers()[algorithm],), content, time.time()))


def test_whitespace_at_the_end_of_an_unterminated_last_line_is_ignored() -> None:
    # RFC 6376 §3.4.4 ignores WSP at the end of every line; dkimpy keeps one SP when the last
    # line has no CRLF (it adds the CRLF after stripping). SMTP content always ends in CRLF.
    assert body_hash(b"a  ") == body_hash(b"a\r\n") == body_hash(b"a \t\r\n")


# -- keys --------------------------------------------------------------------------------------

def test_a_key_of_the_wrong_kind_is_refused_without_quoting_it() -> None:
    with pytest.raises(DkimKeyError, match="not an Ed25519 private key") as info:
        load_private_key(dkim_keypair()[0], "ed25519-sha256")
    assert "PRIVATE KEY" not in str(info.value)
    with pytest.raises(DkimKeyError, match="not an RSA private key"):
        load_private_key(ed25519_pem(), "rsa-sha256")
    with pytest.raises(DkimKeyError, match="not a PEM private key"):
        load_private_key(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n",
                         "rsa-sha256")
    # cryptography refuses to make a key this small; OpenSSL's command line still does.
    pem = subprocess.run(["openssl", "genrsa", "512"], capture_output=True, check=True).stdout
    with pytest.raises(DkimKeyError, match="512-bit"):
        load_private_key(pem, "rsa-sha256")


def test_signer_record_never_shows_the_key() -> None:
    assert "key" not in repr(signers()["rsa-sha256"]).replace("DkimSigner", "")
