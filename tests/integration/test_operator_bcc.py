"""Blind recipients stay blind through `relayd run`: a Bcc or Resent-Bcc header an app
leaves in its message (over SMTP, or through `relayd sendmail` without -t) never reaches
the smarthost, while every envelope recipient still gets the message. Postfix's cleanup(8)
drops these fields the same way.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.operator import Operator
from tests.support.relay import upstream_smarthost, wait_until
from tests.support.upstream import FakeUpstream

MESSAGE = (b"From: app@example.com\r\nTo: user@example.net\r\n"
           b"Bcc: boss@example.net,\r\n auditor@example.net\r\nSubject: invoice\r\n\r\n"
           b"Bcc: this body line is content and stays\r\n")


async def test_bcc_header_is_removed_and_every_recipient_still_delivered(tmp_path: Path) -> None:
    async with FakeUpstream() as up:
        op = Operator(tmp_path, [upstream_smarthost(up)])
        await op.start()
        try:
            rcpts = ("user@example.net", "boss@example.net", "auditor@example.net")
            qid = await op.send(MESSAGE, rcpts=rcpts)
            await wait_until(lambda: len(up.messages) == 1, 20, "the message upstream")
            (got,) = up.messages
            assert sorted(got.rcpt_tos) == sorted(rcpts)
            assert b"boss@" not in got.data and b"auditor@" not in got.data
            assert got.data.endswith(b"From: app@example.com\r\nTo: user@example.net\r\n"
                                     b"Subject: invoice\r\n\r\n"
                                     b"Bcc: this body line is content and stays\r\n")
            await wait_until(lambda: len([ln for ln in op.delivery_lines(qid)
                                          if "status=sent" in ln]) == 3, 20, "three sent lines")

            # The sendmail command without -t passes the message as written: the field goes.
            r = await op.cli("sendmail", "-i", "user@example.net", "boss@example.net",
                             stdin="To: user@example.net\nResent-Bcc: boss@example.net\n"
                                   "Subject: cron\n\nout\n")
            assert r.code == 0, r.err
            await wait_until(lambda: len(up.messages) == 2, 20, "the sendmail message upstream")
            assert b"Resent-Bcc" not in up.messages[1].data
            assert b"\r\nSubject: cron\r\n" in up.messages[1].data
            assert up.messages[1].data.endswith(b"\r\n\r\nout\r\n")
            assert sorted(up.messages[1].rcpt_tos) == ["boss@example.net", "user@example.net"]
        finally:
            assert await op.stop() == 0
