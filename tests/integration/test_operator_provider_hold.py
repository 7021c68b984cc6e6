"""A provider reply that says "stop sending" (a shipped `pause_smarthost` rule: here
Exchange Online's SendAsDenied) holds the mail instead of failing it, and the operator is
alerted, not only logged at. Once the permission is fixed, `queue retry` delivers it and
the alert resolves.

Black box: `relayd run` with a real config, a scripted smarthost, a webhook receiver, and
the `relayd` commands and the log.
"""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_alerts import Receiver
from tests.support.operator import Operator
from tests.support.relay import upstream_smarthost, wait_until
from tests.support.upstream import FakeUpstream

DENIED = ("554 5.2.252 SendAsDenied; app@example.com not allowed to send as "
          "billing@example.com; STOREDRV.Submission.Exception:SendAsDeniedException")


async def test_send_as_denied_holds_the_mail_alerts_and_queue_retry_delivers(
        tmp_path: Path) -> None:
    async with Receiver() as rx, FakeUpstream(replies={"dot": DENIED}) as up:
        op = Operator(tmp_path, [upstream_smarthost(up)],
                      spool={"retry": {"initial": "1h", "max_interval": "2h"}},
                      alerts={"webhook": f"http://127.0.0.1:{rx.port}/hook"})
        await op.start()
        try:
            qid = await op.send()
            row = await op.wait_entry(qid, "the denied attempt", lambda r: r["attempts"] == 1)
            # Held, not failed: every message would meet the same refusal until an admin
            # grants the permission.
            assert row["state"] != "failed" and "SendAsDenied" in row["last_error"], row
            (line,) = op.delivery_lines(qid)
            assert "status=deferred" in line and "5.2.252" in line, line
            await wait_until(lambda: rx.posts, 15, "the smarthost_down alert")
            (notice,) = rx.posts
            assert (notice["event"], notice["key"], notice["state"]) == \
                ("smarthost_down", "primary", "firing")
            assert "paused for 3600s by reply rule o365-send-as-denied" in notice["message"], notice
            assert "paused for 3600s by a reply rule" in op.log()

            up.replies.clear()   # the Exchange admin granted SendAs
            retry = await op.cli("queue", "retry", qid)
            assert retry.code == 0, retry.err
            await wait_until(lambda: len(up.messages) == 1, 15, "delivery after queue retry")
            await op.wait_logged(qid, timeout=15)
            assert "attempts=2," in op.delivery_lines(qid)[-1]
            await wait_until(lambda: len(rx.posts) == 2, 15, "the recovery notice")
            assert (rx.posts[1]["event"], rx.posts[1]["state"]) == ("smarthost_down", "resolved")
        finally:
            assert await op.stop() == 0
