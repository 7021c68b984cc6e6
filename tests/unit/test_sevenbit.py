"""The 7-bit conversion for a smarthost without 8BITMIME (relayd/delivery/smtp/sevenbit.py):
every 8-bit part becomes quoted-printable and decodes to exactly its old bytes, the rest
stays byte for byte, and what cannot be converted is refused with a reason (RFC 6152 §3)."""

from __future__ import annotations

import binascii
import email
import email.policy
import time
from email.message import EmailMessage

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.delivery.smtp.sevenbit import SLICE, Unconvertible, quoted_printable, to_7bit
from relayd.policy import _mime
from relayd.policy.dkim import load_private_key, public_record
from relayd.policy.records import DkimSigner
from relayd.policy.signing import sign_bytes
from tests.support.policy_helpers import dkim_keypair

UTF8 = "Grüße aus Köln, 5 € — ça va ?".encode()
LATIN1 = "Grüße aus Köln".encode("latin-1")
ATTACHMENT = b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n"


def multipart(*parts: bytes, ctype: str = "multipart/mixed", boundary: str = "BB",
              extra: bytes = b"", preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    # The CRLF before a delimiter belongs to it (RFC 2046 §5.1.1): a part's own final line
    # break is kept as content.
    body = preamble + b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n"
                               for p in parts) + b"--" + boundary.encode() + b"--\r\n" + epilogue
    return (b"From: app@example.com\r\nTo: user@example.net\r\nSubject: report\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: " + ctype.encode() + b"; boundary=" + boundary.encode()
            + b"\r\n" + extra + b"\r\n" + body)


def text_part(body: bytes, cte: str | None = "8bit", charset: str = "utf-8") -> bytes:
    head = b"Content-Type: text/plain; charset=" + charset.encode() + b"\r\n"
    if cte is not None:
        head += b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n"
    return head + b"\r\n" + body


def leaves(data: bytes) -> list[tuple[str, str | None, bytes]]:
    """(type, transfer encoding, decoded bytes) of every leaf, as a mail reader sees them."""
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    found = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        found.append((part.get_content_type(), part.get("Content-Transfer-Encoding"), payload))
    return found


def assert_7bit(data: bytes) -> None:
    assert data.isascii()
    lines = data.split(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"") and b"\r" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in lines) <= 998  # RFC 5322 §2.1.1


# -- what is converted --------------------------------------------------------------------------

def test_a_single_8bit_part_becomes_quoted_printable_and_decodes_to_the_same_bytes() -> None:
    original = (b"From: app@example.com\r\nSubject: report\r\nMIME-Version: 1.0\r\n"
                b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                + UTF8 + b"\r\n" + b"x" * 200 + b" \r\nlast line without a break " + UTF8)
    done = to_7bit(original)
    assert_7bit(done.content)
    assert done.parts == 1 and not done.dkim_signed
    header, body = _mime.split_message(done.content)
    assert header == (b"From: app@example.com\r\nSubject: report\r\nMIME-Version: 1.0\r\n"
                      b"Content-Type: text/plain; charset=utf-8\r\n"
                      b"Content-Transfer-Encoding: quoted-printable\r\n")
    assert binascii.a2b_qp(body) == _mime.split_message(original)[1]
    assert all(len(line) <= 76 for line in body.split(b"\r\n"))  # RFC 2045 §6.7 rule 5


def test_7bit_declared_or_undeclared_8bit_text_is_converted_too() -> None:
    for cte in ("7bit", None):
        original = multipart(text_part(UTF8 + b"\r\n", cte=cte))
        done = to_7bit(original)
        assert_7bit(done.content)
        assert leaves(done.content) == [("text/plain", "quoted-printable", UTF8 + b"\r\n")]


def test_multipart_converts_only_the_8bit_parts_and_relabels_the_container() -> None:
    plain = text_part(b"only ascii here\r\n", cte=None)
    original = multipart(text_part(UTF8 + b"\r\n"), plain, ATTACHMENT,
                         extra=b"Content-Transfer-Encoding: 8bit\r\n",
                         preamble=b"This is a MIME message.\r\n", epilogue=b"the end\r\n")
    done = to_7bit(original)
    assert_7bit(done.content)
    assert done.parts == 1
    # Untouched parts, the preamble and the epilogue are the same bytes.
    assert plain.removesuffix(b"\r\n") in done.content and ATTACHMENT.removesuffix(b"\r\n") in done.content
    assert done.content.startswith(original[:original.index(b"Content-Transfer-Encoding")])
    assert b"\r\n\r\nThis is a MIME message.\r\n--BB\r\n" in done.content
    assert done.content.endswith(b"--BB--\r\nthe end\r\n")
    # RFC 2045 §6.4: a multipart may only say 7bit, 8bit or binary; it is 7bit now.
    assert _mime.Headers.parse(_mime.split_message(done.content)[0]).get_all(
        "Content-Transfer-Encoding") == ["7bit"]
    assert leaves(done.content) == [("text/plain", "quoted-printable", UTF8 + b"\r\n"),
                                    ("text/plain", None, b"only ascii here\r\n"),
                                    ("application/pdf", "base64", b"%PDF-1.4\n")]


def test_nested_alternative_and_an_attached_message_are_converted_inside() -> None:
    html = b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n<p>" + UTF8 + b"</p>\r\n"
    alternative = (b"Content-Type: multipart/alternative; boundary=ALT\r\n\r\n"
                   b"--ALT\r\n" + text_part(UTF8 + b"\r\n") + b"\r\n--ALT\r\n" + html + b"\r\n--ALT--\r\n")
    inner = b"From: other@example.org\r\nSubject: forwarded\r\n\r\n" + LATIN1 + b"\r\n"
    attached = b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + inner
    original = multipart(alternative, attached)
    done = to_7bit(original)
    assert_7bit(done.content)
    assert done.parts == 3
    msg = email.message_from_bytes(done.content, policy=email.policy.compat32)
    parts = list(msg.walk())
    assert [p.get_content_type() for p in parts] == [
        "multipart/mixed", "multipart/alternative", "text/plain", "text/html", "message/rfc822", "text/plain"]
    assert parts[2].get_payload(decode=True) == UTF8 + b"\r\n"
    assert parts[3].get_payload(decode=True) == b"<p>" + UTF8 + b"</p>\r\n"
    assert parts[4]["Content-Transfer-Encoding"] == "7bit"  # RFC 2046 §5.2.1
    # The attached message had no MIME-Version: it became MIME, labelled as RFC 1428 §3 says.
    assert parts[5]["Content-Type"] == "text/plain; charset=unknown-8bit"
    assert parts[5].get_payload(decode=True) == LATIN1 + b"\r\n"
    assert parts[5]["Subject"] == "forwarded"


def test_a_digest_part_without_content_type_is_a_message() -> None:
    inner = b"\r\nFrom: other@example.org\r\nSubject: one\r\n\r\n" + UTF8 + b"\r\n"
    done = to_7bit(multipart(inner, ctype="multipart/digest"))
    assert_7bit(done.content)
    assert b"\r\n--BB\r\n\r\nFrom: other@example.org\r\nSubject: one\r\nMIME-Version: 1.0\r\n" in done.content
    assert leaves(done.content)[-1] == ("text/plain", "quoted-printable", UTF8 + b"\r\n")


@pytest.mark.parametrize(("body", "charset"), [(UTF8, "utf-8"), (LATIN1, "unknown-8bit")])
def test_a_message_without_mime_becomes_mime_with_the_charset_it_can_tell(body: bytes, charset: str) -> None:
    # A cron or PHP mail() message: no MIME headers at all (RFC 1428 §3; unknown-8bit when the
    # bytes are not UTF-8, never RFC 2045's default us-ascii, which would be untrue).
    original = b"From: cron@example.com\r\nSubject: daily\r\n\r\n" + body + b"\r\n"
    done = to_7bit(original)
    assert_7bit(done.content)
    assert done.content.startswith(
        b"From: cron@example.com\r\nSubject: daily\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=" + charset.encode() + b"\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n")
    assert leaves(done.content) == [("text/plain", "quoted-printable", body + b"\r\n")]


def test_a_content_type_without_mime_version_is_kept() -> None:
    original = (b"From: app@example.com\r\nContent-Type: text/html; charset=iso-8859-1\r\n\r\n<p>"
                + LATIN1 + b"</p>\r\n")
    done = to_7bit(original)
    assert _mime.Headers.parse(_mime.split_message(done.content)[0]).get_all("Content-Type") == [
        "text/html; charset=iso-8859-1"]
    assert leaves(done.content) == [("text/html", "quoted-printable", b"<p>" + LATIN1 + b"</p>\r\n")]


def test_a_7bit_message_is_returned_as_it_is() -> None:
    original = multipart(text_part(b"hello\r\n"), ATTACHMENT)
    done = to_7bit(original)
    assert done.content is original and done.parts == 0


def test_a_dkim_signature_is_reported_and_no_longer_verifies() -> None:
    # relayd signs at acceptance (policy), before the spool: the conversion at delivery
    # changes the body the signature's bh= covers. Postfix with OpenDKIM has the same limit.
    pem, _public = dkim_keypair()
    signer = DkimSigner("example.com", "rsa", "rsa-sha256", load_private_key(pem, "rsa-sha256"))
    original = (b"From: app@example.com\r\nTo: user@example.net\r\nSubject: report\r\n"
                b"Date: Mon, 7 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\n" + UTF8 + b"\r\n")
    signed = sign_bytes((signer,), original, time.time())

    def dns(name: bytes, timeout: int = 5) -> bytes:
        return public_record(signer.key).encode()

    def verifies(message: bytes) -> bool:
        try:
            return bool(dkim.DKIM(message).verify(dnsfunc=dns))
        except dkim.DKIMException:
            return False

    assert verifies(signed)
    done = to_7bit(signed)
    assert done.dkim_signed
    assert not verifies(done.content)


# -- what is refused ----------------------------------------------------------------------------

@pytest.mark.parametrize(("message", "reason"), [
    (b"From: app@example.com\r\nSubject: K\xc3\xb6ln\r\n\r\n" + UTF8 + b"\r\n",
     "the message has 8-bit headers"),
    (multipart(text_part(b"hi\r\n"), b"Content-Type: application/pdf\r\nContent-Disposition: attachment; "
               b"filename=\"r\xc3\xa9sum\xc3\xa9.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n"),
     "MIME part 2 has 8-bit headers"),
    (multipart(b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n\x00\xff\r\n"),
     "MIME part 1 has Content-Transfer-Encoding binary"),
    (multipart(text_part(UTF8 + b"\r\n", cte="base64")), "MIME part 1 says it is base64 but has 8-bit bytes"),
    (multipart(text_part(UTF8 + b"\r\n"), b"Content-Type: application/pgp-signature\r\n\r\nsig\r\n",
               ctype='multipart/signed; protocol="application/pgp-signature"'),
     "the message is signed (multipart/signed) and has 8-bit content, which converting would break"),
    (multipart(text_part(b"hi\r\n"), epilogue=UTF8 + b"\r\n"),
     "the message has 8-bit bytes outside its MIME parts (in a preamble or epilogue, or nested deeper "
     "than 32 levels)"),
    (multipart(b"Content-Type: message/rfc822\r\n\r\nFrom: x@example.org\r\nSubject: \xc3\xa9\r\n\r\nhi\r\n"),
     "the message attached as MIME part 1 has 8-bit headers"),
    (multipart(b"Content-Type: message/global\r\nContent-Transfer-Encoding: 8bit\r\n\r\nFrom: \xc3\xa9@x\r\n\r\nhi\r\n"),
     "MIME part 1 is message/global with 8-bit content"),
    (multipart(text_part(b"bare\rCR " + UTF8 + b"\r\n")),
     "MIME part 1 has a bare CR or LF, which quoted-printable cannot keep"),
])
def test_what_cannot_be_converted_is_refused_with_the_reason(message: bytes, reason: str) -> None:
    with pytest.raises(Unconvertible) as caught:
        to_7bit(message)
    assert str(caught.value) == reason


# -- quoted-printable, byte for byte --------------------------------------------------------------

LINE = st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@settings(max_examples=300, deadline=None)
@given(st.lists(LINE, max_size=12), st.booleans())
def test_quoted_printable_decodes_to_exactly_the_original(lines: list[bytes], final_break: bool) -> None:
    body = b"\r\n".join(lines) + (b"\r\n" if final_break and lines else b"")
    encoded = quoted_printable(body)
    assert encoded is not None
    assert binascii.a2b_qp(encoded) == body
    assert encoded.isascii()
    assert all(len(line) <= 76 for line in encoded.split(b"\r\n"))
    assert b"\n" not in encoded.replace(b"\r\n", b"") and b"\r" not in encoded.replace(b"\r\n", b"")


def test_quoted_printable_in_slices_is_what_one_call_gives() -> None:
    line = "Grüße, das ist eine Zeile mit Umlauten äöü und Euro € \t".encode() + b"\r\n"
    body = line * (3 * SLICE // len(line)) + b"x" * 5000  # three slices and a long last line
    encoded = quoted_printable(body)
    assert encoded is not None
    assert encoded[:-5000 * 2] == binascii.b2a_qp(body, istext=True)[:-5000 * 2]
    assert binascii.a2b_qp(encoded) == body
    assert b"=\n" not in encoded.replace(b"=\r\n", b"")  # soft breaks are CRLF even at the end


def test_a_round_trip_through_a_mail_reader_gives_every_part_back() -> None:
    msg = EmailMessage()
    msg["From"] = "app@example.com"
    msg["Subject"] = "report"
    msg.set_content("Grüße " * 40 + "\n", cte="8bit")
    msg.add_alternative("<p>" + "Köln € " * 30 + "</p>\n", subtype="html", cte="8bit")
    msg.add_attachment(bytes(range(256)), maintype="application", subtype="octet-stream")
    original = msg.as_bytes(policy=email.policy.SMTP)
    done = to_7bit(original)
    assert_7bit(done.content)
    assert [(t, p) for t, _, p in leaves(done.content)] == [(t, p) for t, _, p in leaves(original)]
