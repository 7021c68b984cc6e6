"""A smarthost that answers RCPT TO with 552, as the operator meets it (T70).

RFC 5321 §4.5.3.1.10: servers have used 552 for "too many recipients", and a client SHOULD
treat it as a temporary 452. relayd does, so the recipient is sent in another transaction
or at a later attempt, never failed; a 552 that says the message is too big (5.3.4) stays
permanent. Black box: `relayd run` (two processes), a real config file, a scripted
smarthost, and only the `relayd` commands and the log to look at.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.operator import Operator
from tests.support.relay import upstream_smarthost, wait_until
from tests.support.upstream import FakeUpstream

HOUR = {"retry": {"initial": "1h", "max_interval": "2h"}}
FULL = "552 5.5.3 Too many recipients"
READ = "452 4.5.3 Too many recipients (552 treated as 452, RFC 5321 section 4.5.3.1.10)"


async def test_recipients_refused_with_552_go_in_a_second_transaction(tmp_path: Path) -> None:
    async with FakeUpstream(pipelining=False, replies={"rcpt": {"b@example.net": [FULL]}}) as up:
        op = Operator(tmp_path, [upstream_smarthost(up)])
        await op.start()
        try:
            qid = await op.send(rcpts=("a@example.net", "b@example.net", "c@example.net"))
            await wait_until(lambda: len(up.messages) == 2, 20, "two transactions upstream")
            assert [m.rcpt_tos for m in up.messages] == [["a@example.net"],
                                                         ["b@example.net", "c@example.net"]]

            def sent() -> list[str]:
                return [ln for ln in op.delivery_lines(qid) if "status=sent" in ln]
            await wait_until(lambda: len(sent()) == 3, 20, "three status=sent lines")
            assert all("attempts=1," in ln for ln in sent())
            assert not [ln for ln in op.delivery_lines(qid) if "status=sent" not in ln]

            await op.wait_empty()
        finally:
            assert await op.stop() == 0


async def test_a_lone_recipient_refused_with_552_waits_and_queue_retry_delivers_it(tmp_path: Path) -> None:
    async with FakeUpstream(replies={"rcpt": {"b@example.net": [FULL]}}) as up:
        op = Operator(tmp_path, [upstream_smarthost(up)], spool=HOUR)
        await op.start()
        try:
            qid = await op.send(rcpts=("b@example.net",))
            row = await op.wait_entry(qid, "the deferred attempt", lambda r: r["attempts"] == 1)
            # Temporary: queued for its backoff, never failed, and the operator reads why.
            assert row["state"] == "queued" and row["next_attempt"] is not None
            assert row["last_error"] == READ
            assert row["recipients"] == ["b@example.net"]
            [line] = op.delivery_lines(qid)
            assert "to=<b@example.net>" in line and "dsn=4.5.3, status=deferred" in line
            assert READ in line
            assert up.messages == []

            # `queue retry` makes it due now; the smarthost takes the recipient this time.
            assert (await op.cli("queue", "retry", qid)).code == 0
            await wait_until(lambda: len(up.messages) == 1, 20, "delivery after queue retry")
            assert up.messages[0].rcpt_tos == ["b@example.net"]
            await op.wait_logged(qid)
            assert "attempts=2," in op.delivery_lines(qid)[-1]

            await op.wait_empty()
            assert len(up.messages) == 1
        finally:
            assert await op.stop() == 0


async def test_a_552_saying_the_message_is_too_big_fails_the_recipient(tmp_path: Path) -> None:
    too_big = "552 5.3.4 Message too big for this recipient"
    async with FakeUpstream(replies={"rcpt": {"b@example.net": too_big}}) as up:
        op = Operator(tmp_path, [upstream_smarthost(up)], spool=HOUR)
        await op.start()
        try:
            qid = await op.send(rcpts=("b@example.net",))
            row = await op.wait_entry(qid, "the failed message", lambda r: r["state"] == "failed")
            assert row["last_error"] == too_big and row["attempts"] == 1
            [line] = op.delivery_lines(qid)
            assert "dsn=5.3.4, status=failed" in line
            assert up.messages == []
        finally:
            assert await op.stop() == 0
