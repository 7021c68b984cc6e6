"""What arrives upstream is what the application sent, byte for byte, through `relayd run`
(two processes, a real config file, a scripted smarthost): the listener's end-of-DATA
search, line-end check and unstuffing, and delivery's stuffing (relayd/bytescan.py, in C
when built) on a 100 KB message, with the operator's view of it.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.operator import Operator
from tests.support.relay import upstream_smarthost, wait_until
from tests.support.smtpclient import RawClient
from tests.support.upstream import FakeUpstream

LINE = b"The quick brown fox jumps over the lazy dog and keeps on running far away.\r\n"
# Lines that start with a dot (sent stuffed), one that is just a dot, a bare LF, and an
# LF "." CRLF that is content, not the end (RFC 5321 §4.1.1.4; SMTP smuggling).
CONTENT = (b"From: app@example.com\r\nTo: user@example.net\r\nSubject: bytes\r\n\r\n"
           + LINE * 600 + b".leading dot\r\n.\r\n..two\r\n" + LINE * 600
           + b"bare LF\nthen\r\nlf\n.\r\nnot the end\r\n" + LINE * 100)


def _stuffed(content: bytes) -> bytes:
    return content[:1].replace(b".", b"..") + content[1:].replace(b"\r\n.", b"\r\n..")


async def _submit(port: int, data: bytes) -> tuple[int, str]:
    c = await RawClient.connect("127.0.0.1", port)
    try:
        assert (await c.reply())[0] == 220
        assert (await c.cmd("EHLO app.example"))[0] == 250
        assert (await c.cmd("MAIL FROM:<app@example.com>"))[0] == 250
        assert (await c.cmd("RCPT TO:<user@example.net>"))[0] == 250
        assert (await c.cmd("DATA"))[0] == 354
        await c.send(data + b".\r\n")  # data ends with CRLF
        reply = await c.reply()
        assert (await c.cmd("QUIT"))[0] == 221
        return reply
    finally:
        await c.close()


async def test_a_100_kb_message_arrives_upstream_as_sent(tmp_path: Path) -> None:
    async with FakeUpstream() as up:
        op = Operator(tmp_path, [upstream_smarthost(up)])
        await op.start()
        try:
            code, text = await _submit(op.port, _stuffed(CONTENT))
            assert code == 250, text
            qid = text.rsplit(" ", 1)[-1]
            await wait_until(lambda: len(up.messages) == 1, 20, "the message upstream")
            got = up.messages[0].data
            # Upstream sees the content unstuffed again, after relayd's Received/Date/
            # Message-ID lines; the bare LF became CRLF, everything else is unchanged.
            expected_body = CONTENT.replace(b"bare LF\nthen", b"bare LF\r\nthen").replace(
                b"lf\n.\r\n", b"lf\r\n.\r\n")
            assert got.endswith(expected_body.split(b"\r\n\r\n", 1)[1])
            assert b"Subject: bytes\r\n" in got
            # The smarthost stores the message before its 250; relayd logs the outcome and
            # lets the spool file go only once it has read that reply, so wait for both.
            await op.wait_logged(qid)
            assert all("to=<user@example.net>" in ln for ln in op.delivery_lines(qid))

            await op.wait_empty()
        finally:
            assert await op.stop() == 0
