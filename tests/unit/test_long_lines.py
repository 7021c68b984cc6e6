"""Lines over 998 octets re-encoded at acceptance (relayd/policy/long_lines.py, T26): what is
converted, that every part decodes to exactly the bytes it had, what is left, and the step's
place before DKIM signing."""

from __future__ import annotations

import base64
import binascii
import time

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.policy import _mime, long_lines
from relayd.policy.long_lines import LIMIT, fold_line, reencode, rewrap_base64
from tests.support.policy_helpers import config, dkim_keypair, message, run
from tests.unit.test_sevenbit import ATTACHMENT, UTF8, leaves, multipart, text_part

HTML = b"<html><body>" + b"<div class=\"row\"><a href=\"https://example.com/x?y=1\">caf\xc3\xa9</a></div>" * 400 + b"</body></html>"
HEAD = (b"From: app@example.com\r\nTo: user@example.net\r\nSubject: report\r\n"
        b"Date: Mon, 7 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n")


def longest(data: bytes) -> int:
    return max(len(line) for line in data.split(b"\r\n"))


def html_part(body: bytes = HTML, cte: bytes | None = b"8bit") -> bytes:
    head = b"Content-Type: text/html; charset=utf-8\r\n"
    if cte is not None:
        head += b"Content-Transfer-Encoding: " + cte + b"\r\n"
    return head + b"\r\n" + body


# -- what is converted --------------------------------------------------------------------------

@pytest.mark.parametrize("cte", [b"8bit", b"7bit", None])
def test_a_long_html_part_becomes_quoted_printable_with_the_same_decoded_bytes(cte: bytes | None) -> None:
    plain = text_part(b"short text\r\n", cte="7bit", charset="us-ascii")
    original = multipart(plain, html_part(HTML, cte), ATTACHMENT, ctype="multipart/alternative")
    assert len(HTML) > 20_000
    done = reencode(original)
    assert longest(done.content) <= 76 < LIMIT
    assert (done.quoted_printable, done.base64, done.folded, done.left) == (1, 0, 0, ())
    assert done.notes() == ["lines longer than 998 octets re-encoded as quoted-printable "
                            "(1 MIME part; RFC 5322 §2.1.1)"]
    assert leaves(done.content) == [("text/plain", "7bit", b"short text\r\n"),
                                    ("text/html", "quoted-printable", HTML),
                                    ("application/pdf", "base64", b"%PDF-1.4\n")]
    # Only that part changed: the other parts and the top header are the same bytes.
    assert plain.removesuffix(b"\r\n") in done.content and ATTACHMENT.removesuffix(b"\r\n") in done.content
    assert done.content.startswith(original[:original.index(b"\r\n\r\n")])


def test_a_message_without_mime_becomes_mime_with_its_charset() -> None:
    for body, charset in ((b"a" * 3000 + b"\r\n", b"us-ascii"), (UTF8 * 100 + b"\r\n", b"utf-8"),
                          (b"\xe9" * 1500 + b"\r\n", b"unknown-8bit")):
        done = reencode(HEAD + b"\r\n" + body)
        header, encoded = _mime.split_message(done.content)
        assert header == HEAD + (b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=" + charset
                                 + b"\r\nContent-Transfer-Encoding: quoted-printable\r\n")
        assert binascii.a2b_qp(encoded) == body and longest(done.content) <= 76


def test_a_base64_part_with_long_lines_is_wrapped_at_76() -> None:
    data = bytes(range(256)) * 40
    one_line = base64.b64encode(data)
    part = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n" + one_line
    done = reencode(multipart(text_part(b"see attached\r\n", cte=None), part))
    assert (done.base64, done.quoted_printable) == (1, 0) and longest(done.content) <= 76
    assert leaves(done.content)[1] == ("application/octet-stream", "base64", data)
    assert done.notes() == ["base64 lines longer than 998 octets wrapped at 76 (1 MIME part; RFC 2045 §6.8)"]
    assert rewrap_base64(one_line + b"\r\n") == _mime.wrap_base64(one_line)
    assert rewrap_base64(b"not base64!" * 200) is None


def test_an_attached_message_is_converted_inside() -> None:
    inner = b"From: other@example.org\r\nSubject: fwd\r\nMIME-Version: 1.0\r\n\r\n" + b"z" * 2000 + b"\r\n"
    attached = b"Content-Type: message/rfc822\r\n\r\n" + inner
    done = reencode(multipart(text_part(b"fwd\r\n", cte=None), attached))
    assert done.quoted_printable == 1 and longest(done.content) <= 998
    assert leaves(done.content)[-1] == ("text/plain", "quoted-printable", b"z" * 2000 + b"\r\n")


def test_long_header_lines_are_folded_before_whitespace_and_unfold_to_the_original() -> None:
    to = ", ".join(f"user{i}@example.net" for i in range(200)).encode()
    subject = b"Subject: " + b"word " * 300 + b"end"
    original = HEAD.replace(b"Subject: report\r\n", subject + b"\r\nX-Recipients: " + to + b"\r\n") + b"\r\nbody\r\n"
    done = reencode(original)
    assert done.folded == 2 and done.quoted_printable == 0 and longest(done.content) <= LIMIT
    # RFC 5322 §2.2.3: unfolding is removing the CRLFs that precede whitespace.
    assert done.content.replace(b"\r\n ", b" ").replace(b"\r\n\t", b"\t") == original
    assert _mime.split_message(done.content)[1] == b"body\r\n"  # the body is untouched, no MIME added
    assert done.notes() == ["header lines longer than 998 octets folded (2 lines; RFC 5322 §2.2.3)"]


@pytest.mark.parametrize("line", [b"X-Data: " + b"a" * 2000, b"X-Data: ab " + b"c" * 1500,
                                  b"X-Data: " + b"x" * 900 + b" " * 1200])
def test_a_header_line_without_whitespace_to_fold_at_is_left(line: bytes) -> None:
    assert fold_line(line) is None
    done = reencode(HEAD + line + b"\r\n\r\nbody\r\n")
    assert done.content == HEAD + line + b"\r\n\r\nbody\r\n"
    assert done.left == ("a header line of the message has no whitespace to fold at",)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"bc", b" ", b"\t", b"word" * 60, b"x" * 700]), min_size=1,
                max_size=60).map(b"".join))
def test_fold_line_breaks_only_before_whitespace(value: bytes) -> None:
    line = b"X-Long: " + value
    folded = fold_line(line)
    if len(line) <= LIMIT:
        assert folded == line
    elif folded is not None:
        lines = folded.split(b"\r\n")
        assert all(len(x) <= LIMIT and x.strip(b" \t") for x in lines)
        assert all(x[:1] in (b" ", b"\t") for x in lines[1:])
        assert folded.replace(b"\r\n", b"") == line


# -- what is left -------------------------------------------------------------------------------

def test_signed_content_is_left_byte_for_byte() -> None:
    signed_part = html_part()
    signature = b"Content-Type: application/pgp-signature\r\n\r\n-----BEGIN PGP SIGNATURE-----\r\n"
    signed = (b"Content-Type: multipart/signed; protocol=\"application/pgp-signature\"; boundary=SIG\r\n\r\n"
              b"--SIG\r\n" + signed_part + b"\r\n--SIG\r\n" + signature + b"\r\n--SIG--\r\n")
    original = multipart(text_part(b"x" * 1200 + b"\r\n", cte=None), signed)
    done = reencode(original)
    assert signed in done.content  # untouched: the signature covers the encoded form
    assert done.quoted_printable == 1
    assert done.left == ("MIME part 2 is multipart/signed, whose signature covers the encoded form (RFC 1847)",)
    # The whole message signed: nothing changes.
    top = HEAD + b"MIME-Version: 1.0\r\n" + signed
    assert reencode(top).content == top


@pytest.mark.parametrize(("part", "reason"), [
    (html_part(cte=b"binary"), "MIME part 2 has Content-Transfer-Encoding binary"),
    (html_part(b"=41" * 500, cte=b"quoted-printable"),
     "MIME part 2 is malformed quoted-printable (RFC 2045 §6.7: lines of at most 76)"),
    (b"Content-Type: message/external-body; access-type=x\r\n\r\n" + b"y" * 1000,
     "MIME part 2 is message/external-body"),
])
def test_what_cannot_be_re_encoded_is_left_and_noted(part: bytes, reason: str) -> None:
    original = multipart(text_part(b"ok\r\n", cte=None), part)
    done = reencode(original)
    assert done.content == original and done.left == (reason,)
    assert done.notes() == [f"lines longer than 998 octets left as they are: {reason}"]


def test_a_long_preamble_is_left_and_noted() -> None:
    original = multipart(text_part(b"ok\r\n", cte=None), preamble=b"p" * 1200 + b"\r\n")
    done = reencode(original)
    assert done.content == original
    assert done.left == ("a line outside the MIME parts (a preamble or epilogue, or a part the "
                         "MIME structure does not reach)",)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_mime_is_converted_or_left_never_an_error(data: st.DataObject) -> None:
    base = multipart(text_part(b"a" * 1500 + b"\r\n"), html_part(),
                     b"Content-Type: message/rfc822\r\n\r\nSubject: x\r\n\r\n" + b"z" * 1100 + b"\r\n",
                     ATTACHMENT.replace(b"JVBERi0xLjQK", b"QUJD" * 400))
    content = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(content) - 1))
        end = data.draw(st.integers(at, min(len(content), at + 300)))
        content[at:end] = data.draw(st.sampled_from([b"", b"\r\n", b"--BB\r\n", b"--BB--", b"\r\n\r\n",
                                                     b"Content-Type: multipart/mixed; boundary=BB\r\n"]))
    done = reencode(bytes(content))
    assert longest(done.content) <= LIMIT or done.left


def test_a_message_without_long_lines_is_the_same_object() -> None:
    original = multipart(text_part(b"x" * 998 + b"\r\n"), ATTACHMENT)
    assert reencode(original).content is original


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                          st.integers(0, 2500)), min_size=1, max_size=6),
       st.sampled_from([b"8bit", b"7bit", None]))
def test_any_body_round_trips_exactly(chunks: list[tuple[bytes, int]], cte: bytes | None) -> None:
    body = b"\r\n".join(text + b"q" * n for text, n in chunks)
    original = multipart(text_part(b"hi\r\n", cte=None), html_part(body, cte))
    done = reencode(original)
    assert longest(done.content) <= LIMIT
    assert leaves(done.content)[1][2] == body
    single = reencode(HEAD + b"\r\n" + body)
    assert longest(single.content) <= LIMIT
    assert binascii.a2b_qp(_mime.split_message(single.content)[1]) == body or single.content == HEAD + b"\r\n" + body


# -- in the pipeline ----------------------------------------------------------------------------

def test_the_step_runs_before_dkim_and_the_signature_verifies() -> None:
    pem, public = dkim_keypair()
    cfg = config("dkim: [{domain: example.com, selector: relayd, private_key_file: k.pem}]")
    original = multipart(text_part(b"hello\r\n", cte=None), html_part())
    result = run(cfg, message(original), keys={"example.com": pem}, now=time.time())
    out = result.outputs[0].content
    assert out.startswith(b"DKIM-Signature:") and longest(out) <= LIMIT
    assert dkim.verify(out, dnsfunc=lambda name, timeout=5: public)
    assert leaves(out)[1] == ("text/html", "quoted-printable", HTML)
    assert [(n.step, n.text) for n in result.steps if n.step == "long_lines"] == [
        ("long_lines", "lines longer than 998 octets re-encoded as quoted-printable (1 MIME part; RFC 5322 §2.1.1)")]


def test_the_step_without_any_policy_configured_and_no_note_for_short_lines() -> None:
    result = run(config(), message(HEAD + b"\r\n" + b"a" * 5000 + b"\r\n"))
    assert longest(result.outputs[0].content) <= 76
    assert [n.logged for n in result.steps if n.step == "long_lines"] == [20]  # logging.INFO
    short = run(config(), message(HEAD + b"\r\nshort\r\n"))
    assert short.outputs[0].content == HEAD + b"\r\nshort\r\n"
    assert not [n for n in short.steps if n.step == "long_lines"]


def test_an_unexpected_error_keeps_the_message_as_received(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(content: bytes) -> long_lines.Reencoded:
        raise RuntimeError("a bug")

    monkeypatch.setattr(long_lines, "reencode", boom)
    original = HEAD + b"\r\n" + b"a" * 5000 + b"\r\n"
    result = run(config(), message(original))
    assert result.outputs[0].content == original
    [note] = [n for n in result.steps if n.step == "long_lines"]
    assert note.text == "not re-encoded, kept as received: RuntimeError: a bug"
    assert note.logged == 30  # logging.WARNING
