"""Lines over 998 octets through `relayd run` (T26; relayd/policy/long_lines.py): a message with
a 20 KB single-line HTML part arrives upstream with no line over 998 octets and decodes to
exactly what was sent, with one log line; with a dkim key the signature made over the
converted form verifies; a message without long lines arrives byte for byte."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest

from relayd.policy.dkim import load_private_key, public_record
from tests.support.operator import Operator
from tests.support.policy_helpers import dkim_keypair
from tests.support.relay import upstream_smarthost
from tests.support.upstream import FakeUpstream
from tests.support.waiting import wait_until

HEAD = (b"From: App <app@example.com>\r\nTo: user@example.net\r\nSubject: Your report\r\n"
        b"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMessage-ID: <report-1@example.com>\r\n")
# Minified HTML as applications send it: one line of about 20 KB, with 8-bit UTF-8 text.
HTML = (b"<!doctype html><html><head><style>td{padding:0}</style></head><body><table>"
        + b"".join(b"<tr><td>Row %d</td><td>caf\xc3\xa9 = 3.50 \xe2\x82\xac</td></tr>" % i
                   for i in range(420))
        + b"</table></body></html>")
LONG = (HEAD + b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n"
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nYour report is below.\r\n"
        b"--b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + HTML + b"\r\n--b1--\r\n")
NORMAL = (HEAD + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
          + b"".join(b"Line %d of a report with a line of exactly 998 octets below.\r\n" % i for i in range(50))
          + b"x" * 998 + b"\r\nThe end.\r\n")
LOGGED = "lines longer than 998 octets re-encoded as quoted-printable (1 MIME part; RFC 5322 §2.1.1)"


def _html_of(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    [html] = [p for p in msg.walk() if p.get_content_type() == "text/html"]
    assert isinstance(html, EmailMessage)
    return html


def _longest(data: bytes) -> int:
    return max(len(line) for line in data.split(b"\r\n"))


async def _through_relayd(tmp_path: Path, data: bytes, logged: str) -> tuple[str, bytes, str]:
    """Send ``data`` through `relayd run` to a fake smarthost; (queue ID, what arrived, the
    log) once it arrived and the log has a line of that ID with ``logged``."""
    async with FakeUpstream() as up:
        op = Operator(tmp_path, [upstream_smarthost(up, tls="none")])
        await op.start()
        try:
            qid = await op.send(data)
            await wait_until(lambda: len(up.messages) == 1, 20, "the message upstream")
            await wait_until(lambda: any(qid in ln and logged in ln for ln in op.log().splitlines()),
                             10, f"the log line with {logged!r}")
        finally:
            assert await op.stop() == 0
        return qid, up.messages[0].data, op.log()


async def test_a_20_kb_html_line_arrives_re_encoded_and_decodes_to_what_was_sent(tmp_path: Path) -> None:
    assert len(HTML) > 20_000 and b"\n" not in HTML
    qid, got, log = await _through_relayd(tmp_path, LONG, LOGGED)
    assert _longest(got) <= 998
    html = _html_of(got)
    assert html["Content-Transfer-Encoding"] == "quoted-printable"
    assert html.get_payload(decode=True) == HTML
    # Everything before the HTML part is as sent (after relayd's Received field).
    assert LONG[:LONG.index(b"Content-Transfer-Encoding: 8bit")] in got
    assert re.search(rf"^.*{qid}: {re.escape(LOGGED)}$", log, re.MULTILINE)


async def test_the_dkim_signature_covers_the_re_encoded_form_and_verifies(tmp_path: Path) -> None:
    pem = dkim_keypair()[0]
    (tmp_path / "rsa.pem").write_bytes(pem)
    record = public_record(load_private_key(pem, "rsa-sha256"))
    async with FakeUpstream() as up:
        op = Operator(tmp_path, [upstream_smarthost(up, tls="none")],
                      dkim=[{"domain": "example.com", "selector": "rsa",
                             "private_key_file": str(tmp_path / "rsa.pem")}])
        await op.start()
        try:
            await op.send(LONG)
            await wait_until(lambda: len(up.messages) == 1, 20, "the message upstream")
        finally:
            assert await op.stop() == 0
    got = up.messages[0].data
    assert got.startswith(b"DKIM-Signature:") and _longest(got) <= 998

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name.decode().rstrip(".") == "rsa._domainkey.example.com"
        return record.encode()

    assert dkim.DKIM(got).verify(dnsfunc=dnsfunc)
    assert _html_of(got).get_payload(decode=True) == HTML
    tampered = got.replace(b"Row 7<", b"Row 8<")
    assert tampered != got
    with pytest.raises(dkim.ValidationError, match="body hash mismatch"):
        dkim.DKIM(tampered).verify(dnsfunc=dnsfunc)


async def test_a_message_without_long_lines_arrives_byte_for_byte(tmp_path: Path) -> None:
    _qid, got, log = await _through_relayd(tmp_path, NORMAL, ": client=")
    # relayd's Received field (RFC 5321 §4.4), then exactly what the application sent.
    received, _, rest = got.partition(b"\r\n" + HEAD[:5])
    assert received.startswith(b"Received: ") and b"\r\n\r\n" not in received
    assert HEAD[:5] + rest == NORMAL
    assert "998 octets" not in log
