"""The unsubscribe footer over the real-world-shaped .eml corpus in tests/data/."""

from __future__ import annotations

import pytest

from relayd.policy import _mime
from tests.support.policy_helpers import config, corpus, decoded, eml, message, parse, run, text_parts

FOOTER_CFG = """
unsubscribe:
  url: "https://example.com/u?token={token}"
  secret: s3cret
  footer_text: "UNSUB-TEXT {url}"
  footer_html: '<p class="unsub"><a href="{url}">UNSUB-HTML</a></p>'
"""

# file -> number of parts that must carry the footer (text/plain + text/html, not attachments)
CASES = {
    "plain.eml": 1,
    "html_only.eml": 1,
    "alternative.eml": 2,
    "mixed_pdf.eml": 2,
    "related_image.eml": 2,
    "calendar.eml": 2,
    "base64_utf8.eml": 1,
    "qp_latin1.eml": 1,
    "latin1_8bit.eml": 1,
    "php_mail.eml": 1,
    "signed.eml": 0,
    "text_attachment.eml": 1,
}


def test_corpus_is_complete() -> None:
    assert sorted(CASES) == corpus()


def _decorated(name: str) -> tuple[bytes, bytes]:
    original = eml(name)
    result = run(config(FOOTER_CFG), message(original))
    assert len(result.outputs) == 1
    return original, result.outputs[0].content


@pytest.mark.parametrize("name", sorted(CASES))
def test_footer_once_per_text_part_and_original_text_intact(name: str) -> None:
    original, out = _decorated(name)
    before, after = text_parts(parse(original)), text_parts(parse(out))
    assert len(before) == len(after)
    decorated = 0
    for old, new in zip(before, after, strict=True):
        old_text, new_text = decoded(old), decoded(new)
        marker = "UNSUB-TEXT" if new.get_content_type() == "text/plain" else "UNSUB-HTML"
        count = new_text.count(marker)
        assert count in (0, 1), f"footer appears {count} times in a {new.get_content_type()} part"
        if count:
            decorated += 1
            if new.get_content_type() == "text/plain":
                assert new_text.startswith(old_text)
            else:
                start = new_text.index('<p class="unsub">')
                end = new_text.index("</p>", start) + len("</p>")
                eol = "\r\n" if "\r\n" in new_text[end:end + 2] else "\n"
                assert new_text[:start] + new_text[end + len(eol):] == old_text
                if "</body>" in old_text.lower():
                    assert new_text.lower().index("unsub-html") < new_text.lower().rindex("</body>")
        else:
            assert new_text == old_text
    assert decorated == CASES[name]


@pytest.mark.parametrize("name", sorted(CASES))
def test_untouched_parts_are_byte_identical(name: str) -> None:
    original, out = _decorated(name)
    leaves = list(_mime.walk(original))
    for leaf in leaves:
        raw = original[leaf.start:leaf.end]
        if leaf.content_type not in ("text/plain", "text/html") or leaf.disposition == "attachment":
            assert raw in out, f"part {leaf.path} ({leaf.content_type}) changed"


@pytest.mark.parametrize("name", ["mixed_pdf.eml", "related_image.eml", "calendar.eml"])
def test_attachments_decode_to_the_same_bytes(name: str) -> None:
    original, out = _decorated(name)

    def payloads(content: bytes) -> list[bytes]:
        return [p.get_payload(decode=True) for p in parse(content).walk()  # type: ignore[misc]
                if not p.is_multipart() and p.get_content_type() not in ("text/plain", "text/html")]

    assert payloads(original) == payloads(out)
    assert payloads(original)


def test_signed_message_body_is_never_modified() -> None:
    original, out = _decorated("signed.eml")
    assert _mime.split_message(original)[1] == _mime.split_message(out)[1]
    assert b"List-Unsubscribe:" in _mime.split_message(out)[0]


def test_charset_and_encoding_are_kept() -> None:
    _, out = _decorated("qp_latin1.eml")
    part = parse(out)
    assert part.get_content_charset() == "iso-8859-1"
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert "viele Grüße aus München" in decoded(part)
    _, out = _decorated("base64_utf8.eml")
    part = parse(out)
    assert part["Content-Transfer-Encoding"] == "base64"
    assert "Grüße, Ihr Server ☃" in decoded(part)
    assert all(len(line) <= 78 for line in _mime.split_message(out)[1].split(b"\r\n"))


def test_non_latin1_footer_switches_the_part_to_utf8() -> None:
    cfg = config("""
unsubscribe: {mailto: u@example.com, footer_text: "Abmelden → {url}"}
""")
    out = run(cfg, message(eml("latin1_8bit.eml"))).outputs[0].content
    part = parse(out)
    assert part.get_content_charset() == "utf-8"
    text = decoded(part)
    assert text.startswith("Betrag: 12,50 EUR für Käse.")
    assert "Abmelden → mailto:u@example.com?subject=unsubscribe" in text


def test_undeclared_8bit_php_body_keeps_its_bytes() -> None:
    original, out = _decorated("php_mail.eml")
    body_before, body_after = _mime.split_message(original)[1], _mime.split_message(out)[1]
    assert body_after.startswith(body_before)
    assert b"UNSUB-TEXT https://example.com/u?token=" in body_after


def test_7bit_part_gets_quoted_printable_for_a_non_ascii_footer() -> None:
    cfg = config("unsubscribe: {mailto: u@example.com, footer_text: 'Désabonner: {url}'}")
    out = run(cfg, message(eml("plain.eml"))).outputs[0].content
    part = parse(out)
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_content_charset() == "utf-8"
    assert "Désabonner: mailto:u@example.com" in decoded(part)
    assert decoded(part).startswith("Hello Alice,\r\n\r\nyour weekly report is ready.")
