"""8-bit mail and a smarthost that does not offer 8BITMIME, as the operator meets it (T81).

RFC 6152 §3: the client converts the message to 7 bit or does not deliver it. relayd
converts 8-bit MIME parts to quoted-printable, as Postfix does, and says so in the log;
what it cannot convert (8-bit headers here) fails with 5.6.3 and a reason, is never sent as
it is, and, like every permanent failure, is not offered to the fallback smarthost. Black
box: `relayd run` (two processes), a real config file, scripted smarthosts, and only the
`relayd` commands and the log to look at.
"""

from __future__ import annotations

import email
import email.policy
import signal
from email import base64mime
from pathlib import Path

import yaml

from tests.support.operator import Operator
from tests.support.relay import upstream_smarthost, wait_until
from tests.support.upstream import FakeUpstream

TEXT = "Grüße aus Köln: 5 € — ça va ?\r\n".encode()
PDF = bytes(range(256))
MESSAGE = (b"From: app@example.com\r\nTo: user@example.net\r\nSubject: report\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=BB\r\n\r\n--BB\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + TEXT
           + b"\r\n--BB\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + base64mime.body_encode(PDF).encode() + b"\r\n--BB--\r\n")


def leaves(data: bytes) -> list[tuple[str, bytes]]:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    found = []
    for part in msg.walk():
        if not part.is_multipart():
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            found.append((part.get_content_type(), payload))
    return found


async def test_8bit_mime_reaches_a_7bit_smarthost_as_quoted_printable(tmp_path: Path) -> None:
    async with FakeUpstream(eightbitmime=False) as up:
        op = Operator(tmp_path, [upstream_smarthost(up)])
        await op.start()
        try:
            qid = await op.send(MESSAGE)
            await wait_until(lambda: len(up.messages) == 1, 20, "the message upstream")
            got = up.messages[0]
            # 7-bit on the wire, no BODY=8BITMIME, and every part decodes to what was sent.
            assert got.data.isascii() and "BODY=8BITMIME" not in got.mail_options
            assert b"Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe aus K=C3=B6ln" in got.data
            assert leaves(got.data) == [("text/plain", TEXT), ("application/pdf", PDF)]

            await op.wait_logged(qid)
            [line] = op.delivery_lines(qid)
            assert "to=<user@example.net>, relay=primary[" in line and "dsn=2.0.0, status=sent" in line
            assert (f"{qid}: smarthost primary does not offer 8BITMIME: the 8-bit body was converted "
                    f"to quoted-printable (1 MIME part; RFC 6152)") in op.log()

            await op.wait_empty()
        finally:
            assert await op.stop() == 0


async def test_8bit_headers_fail_5_6_3_and_queue_retry_delivers_once_a_smarthost_can_take_them(
        tmp_path: Path) -> None:
    headers_8bit = MESSAGE.replace(b"Subject: report", "Subject: Bericht für Köln".encode())
    async with FakeUpstream(eightbitmime=False) as seven, FakeUpstream() as eight:
        op = Operator(tmp_path, [upstream_smarthost(seven, "primary"), upstream_smarthost(eight, "backup")])
        await op.start()
        try:
            qid = await op.send(headers_8bit)
            row = await op.wait_entry(qid, "the failed message", lambda r: r["state"] == "failed")
            reason = ("554 5.6.3 smarthost primary does not offer 8BITMIME and the message has "
                      "8-bit headers (RFC 6152)")
            assert row["last_error"] == reason and row["attempts"] == 1
            assert row["recipients"] == ["user@example.net"]
            [line] = op.delivery_lines(qid)
            assert "relay=primary[" in line and f"dsn=5.6.3, status=failed ({reason})" in line
            # Nothing was sent in any form, and a permanent failure does not go to the fallback.
            assert not any(c.startswith("MAIL") for c in seven.commands)
            assert seven.messages == [] and eight.messages == []

            # The operator's fix: the smarthost that offers 8BITMIME first, reload, retry.
            data = yaml.safe_load(op.config.read_text())
            data["smarthosts"].reverse()
            op.write(yaml.safe_dump(data))
            op.relay.signal(signal.SIGHUP)
            await wait_until(lambda: op.log().count("configuration reloaded") >= 2, 20,
                             "the reload in both processes")
            assert (await op.cli("queue", "retry", qid)).code == 0
            await wait_until(lambda: len(eight.messages) == 1, 20, "delivery through backup")
            assert "BODY=8BITMIME" in eight.messages[0].mail_options
            assert "Subject: Bericht für Köln".encode() in eight.messages[0].data
            await op.wait_logged(qid)
            assert "relay=backup[" in op.delivery_lines(qid)[-1]

            await op.wait_empty()
            assert seven.messages == []
        finally:
            assert await op.stop() == 0
