"""After an outage, as the operator meets it: a message refused again and again never pauses
the smarthost for everybody (the breaker needs several different messages), `queue retry
--all` delivers a large backlog at once even from a long pause, and a refused reload changes
nothing, also across a restart of the delivery process (SPEC "queue retry", "SIGHUP").

Black box: `relayd run` as a process, a real config file, a scripted smarthost, and only the
`relayd` commands and the log to look at.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiosmtplib
import yaml

from tests.support.operator import Operator
from tests.support.relay import free_port, upstream_smarthost, wait_until
from tests.support.upstream import FakeUpstream, Upstreams

HOUR = {"retry": {"initial": "1h", "max_interval": "2h"}}
LATER = "451 4.3.0 Try again later"


def paused_lines(op: Operator) -> list[str]:
    return [line for line in op.log().splitlines() if "paused for" in line]


async def test_queue_retry_during_an_attempt_is_not_lost(tmp_path: Path) -> None:
    # The smarthost hangs after MAIL until relayd's 5 s timeout; `queue retry` arrives while
    # that attempt is in flight. It must not be dropped: the message is tried again as soon
    # as the attempt ends, not an hour later (the retry interval).
    async with FakeUpstream(hang_at="mail") as up:
        op = Operator(tmp_path, [upstream_smarthost(up, timeout="5s")], spool=HOUR)
        await op.start()
        try:
            qid = await op.send()
            await wait_until(lambda: any(c.startswith("MAIL") for c in up.commands), 20,
                             "the attempt in flight (MAIL sent, no reply)")
            retry = await op.cli("queue", "retry", qid)
            assert retry.code == 0 and f"{qid}: scheduled for delivery now" in retry.out, retry
            up.hang_at = None   # the fault clears
            line = await op.wait_logged(qid)
            assert "attempts=2," in line, line
            (deferred,) = [ln for ln in op.delivery_lines(qid) if "status=deferred" in ln]
            assert "attempts=1," in deferred and "timed out" in deferred, deferred
            assert len(up.messages) == 1
            await op.wait_empty()
        finally:
            assert await op.stop() == 0


async def test_one_message_deferred_again_and_again_never_pauses_the_smarthost(tmp_path: Path) -> None:
    async with FakeUpstream(replies={"dot": {"stuck@example.net": LATER}}) as up:
        op = Operator(tmp_path, [upstream_smarthost(up)], spool=HOUR)
        await op.start()
        try:
            stuck = await op.send(rcpts=("stuck@example.net",))
            for n in range(1, 8):
                await op.wait_entry(stuck, f"attempt {n}", lambda r, n=n: r["attempts"] == n)
                # Mail for others still goes at once: the smarthost is not paused.
                await op.send(rcpts=(f"ok{n}@example.net",))
                await wait_until(lambda n=n: len(up.messages) == n, what=f"message {n} delivered")
                assert (await op.cli("queue", "retry", stuck)).code == 0
            row = await op.wait_entry(stuck, "attempt 8", lambda r: r["attempts"] == 8)
            assert row["last_error"] == LATER and row["state"] == "queued"
            assert paused_lines(op) == []
            lines = op.delivery_lines(stuck)
            assert [line.split("attempts=")[1].split(",")[0] for line in lines] == [str(n) for n in range(1, 9)]
            assert all("status=deferred" in line and LATER in line for line in lines)
        finally:
            await op.stop()


async def test_several_different_messages_deferred_in_a_row_pause_it_until_queue_retry(tmp_path: Path) -> None:
    stuck = [f"stuck{n}@example.net" for n in range(5)]
    async with FakeUpstream(replies={"dot": {rcpt: LATER for rcpt in stuck}}) as up:
        op = Operator(tmp_path, [upstream_smarthost(up)], spool=HOUR)
        await op.start()
        try:
            for rcpt in stuck:
                qid = await op.send(rcpts=(rcpt,))
                await op.wait_entry(qid, f"the attempt for {rcpt}", lambda r: r["attempts"] == 1)
            await wait_until(lambda: bool(paused_lines(op)), what="the breaker to pause the smarthost")
            assert "5 different messages in a row deferred" in paused_lines(op)[0]
            # Mail behind the paused smarthost waits without being tried: its count stays 0.
            waiting = await op.send(rcpts=("ok@example.net",))
            row = await op.wait_entry(waiting, "the waiting message", lambda r: r["state"] == "queued")
            assert row["attempts"] == 0 and up.messages == []
            assert (await op.cli("queue", "retry", waiting)).code == 0
            await wait_until(lambda: len(up.messages) == 1, what="delivery after queue retry")
            assert up.messages[0].rcpt_tos == ["ok@example.net"]
            assert "pause lifted by 'relayd queue retry'" in op.log()
        finally:
            await op.stop()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def test_queue_retry_all_delivers_a_thousand_messages_from_a_long_pause(
        tmp_path: Path, upstream: Upstreams) -> None:
    """1,000 messages queued while the smarthost is down, `retry: {initial: 1h}`: once it is
    back, `queue retry --all` delivers them all within a minute, in bounded memory."""
    up = await upstream(listening=False, port=free_port())  # connection refused until started
    op = Operator(tmp_path, [upstream_smarthost(up, max_connections=4)], spool=HOUR)
    await op.start()
    try:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=op.port, start_tls=False, timeout=30)
        await client.connect()
        for n in range(1000):
            await client.sendmail("app@example.com", [f"user{n}@example.net"],
                                  b"Subject: backlog %d\r\n\r\nbody\r\n" % n)
        await client.quit()

        async def all_queued() -> bool:
            rows = await op.queue()
            return len(rows) == 1000 and any(r["attempts"] >= 1 for r in rows)
        await wait_until(all_queued, 30, "1,000 queued messages and a first attempt")
        assert len(paused_lines(op)) == 1, paused_lines(op)  # one outage, one pause
        await up.start()
        retry = await op.cli("queue", "retry", "--all")
        # Delivery starts while the command still works through the list: a message already
        # delivered by its turn is said so, and is no error.
        assert retry.code == 0, retry.err
        assert retry.out.count("scheduled for delivery now") + retry.out.count(
            "no longer in the queue (delivered or deleted meanwhile)") == 1000, retry.out
        loop = asyncio.get_running_loop()
        started = loop.time()
        peak = 0
        pids = [op.relay.proc.pid, op.delivery_process()]  # type: ignore[union-attr]

        def delivered() -> bool:
            nonlocal peak
            peak = max(peak, sum(rss_kib(pid) for pid in pids))
            return len(up.messages) == 1000
        await wait_until(delivered, timeout=60, what="1,000 deliveries after queue retry --all")
        took = loop.time() - started
        assert took < 60
        assert {m.rcpt_tos[0] for m in up.messages} == {f"user{n}@example.net" for n in range(1000)}
        # Both processes together; about 60 MB in the benchmark (docs/performance.md).
        assert peak < 200 * 1024, f"{peak} KiB"

        await op.wait_empty(30)
    finally:
        await op.stop()


async def test_a_refused_reload_changes_nothing_across_retries_and_a_restart(tmp_path: Path) -> None:
    async with FakeUpstream(replies={"rcpt": {"slow@example.net": ["450 4.2.1 busy"] * 2}}) as up, \
            FakeUpstream() as other:
        op = Operator(tmp_path, [upstream_smarthost(up)],
                      spool={"retry": {"initial": "300ms", "max_interval": "600ms"}})
        await op.start()
        try:
            good = op.config.read_text()
            data = yaml.safe_load(good)
            data["smarthosts"][0]["port"] = 70000
            op.write(yaml.safe_dump(data))
            op.relay.signal(signal.SIGHUP)
            await wait_until(lambda: "smarthosts[0].port: must be between 1 and 65535 (got 70000)" in op.log(),
                             what="the refusal with its path: message line")
            assert "reload refused, keeping the running configuration" in op.log()

            # Deferred twice, then delivered: two retry cycles on the old settings.
            slow = await op.send(rcpts=("slow@example.net",))
            await wait_until(lambda: any(m.rcpt_tos == ["slow@example.net"] for m in up.messages),
                             timeout=20, what="delivery after two retry cycles")
            # The smarthost has the message before relayd logs its 250: wait for the line.
            await wait_until(lambda: len(op.delivery_lines(slow)) == 3, what="the third line")
            assert [line.split("attempts=")[1].split(",")[0] for line in op.delivery_lines(slow)] == ["1", "2", "3"]

            # The delivery process dies while the file on disk is invalid: its successor runs
            # the settings relayd accepted, and does not exit over the file again and again.
            first = op.delivery_process()
            os.kill(first, signal.SIGKILL)
            await wait_until(lambda: op.delivery_process() != first, what="a new delivery process")
            await op.send(rcpts=("after-restart@example.net",))
            await wait_until(lambda: any(m.rcpt_tos == ["after-restart@example.net"] for m in up.messages),
                             timeout=20, what="delivery by the restarted delivery process")
            assert op.log().count("delivery process started") == 2
            assert op.log().count("exited unexpectedly") == 1

            # A valid file is applied by both processes: mail goes to the new smarthost.
            data["smarthosts"][0]["port"] = other.port
            op.write(yaml.safe_dump(data))
            op.relay.signal(signal.SIGHUP)
            # relayd run logs its line once it has handed the delivery process the new text,
            # which applies it after parsing it in a thread (a queue ID sent meanwhile is
            # scheduled at once): wait for the delivery process's line too.
            await wait_until(lambda: op.log().count("configuration reloaded") >= 2,
                             what="the reload in both processes")
            await op.send(rcpts=("new@example.net",))
            await wait_until(lambda: len(other.messages) == 1, timeout=20, what="delivery with the new settings")
            assert op.relay.proc is not None and op.relay.proc.poll() is None
        finally:
            assert await op.stop() == 0


async def test_the_daily_cap_count_survives_kill_9_and_the_next_message_waits(
        tmp_path: Path, upstream: Upstreams) -> None:
    """limits.daily_cap: 2. Two messages go; relayd is killed with SIGKILL and started again:
    it still knows of both, so a third waits in the queue, saying why, and is not sent."""
    up = await upstream()
    op = Operator(tmp_path, [upstream_smarthost(up)], limits={"daily_cap": 2})
    await op.start()
    try:
        for i in range(2):
            await op.send(sender=f"app{i}@example.com")
        await wait_until(lambda: len(up.messages) == 2, 20, "two deliveries")
        # The count is written just after the delivery line: wait until `relayd explain`,
        # which reads it from state_dir, shows both (SIGKILL between the two is the window
        # docs/policy.md names).
        async def both_counted() -> bool:
            explained = await op.cli("explain", "--from", "app@example.com", "--to",
                                     "user@example.net")
            return "daily cap: 2 of 2 used in the last 24 h, 0 remaining" in explained.out
        await wait_until(both_counted, 20, "relayd explain to show both counted", interval=0.1)
        await asyncio.to_thread(op.relay.kill9)
        await op.start()
        qid = await op.send(sender="app2@example.com")
        row = await op.wait_entry(qid, "the third to wait for the cap",
                                  lambda r: r["last_error"] == "waiting for limits.daily_cap to free up")
        assert row["attempts"] == 0
        assert len(up.messages) == 2
    finally:
        await op.stop()


async def test_a_reload_whose_new_cap_cannot_be_opened_keeps_the_old_one_and_delivers(
        tmp_path: Path, upstream: Upstreams) -> None:
    """limits.daily_cap 2 -> 3 by SIGHUP while the cap's file cannot be opened: relayd says so,
    keeps counting against 2 and keeps delivering; once the file is back, the next reload
    applies 3 and `queue retry` sends what waited."""
    up = await upstream()
    op = Operator(tmp_path, [upstream_smarthost(up)], limits={"daily_cap": 2})
    await op.start()
    try:
        await op.send(sender="first@example.com")
        await wait_until(lambda: len(up.messages) == 1, 20, "the first delivery")
        data = yaml.safe_load(op.config.read_text())
        db = Path(data["state_dir"]) / "daily_cap.sqlite3"
        # The running cap keeps its open file; a new one finds a directory in its place.
        db.rename(db.with_name("moved.sqlite3"))
        db.mkdir()
        data["limits"]["daily_cap"] = 3
        op.write(yaml.safe_dump(data))
        op.relay.signal(signal.SIGHUP)
        await wait_until(lambda: "the daily cap or the users' limits could not be opened" in op.log(),
                         what="the reload's error line")
        assert "the previous ones stay in force" in op.log()
        # The line names the key and the file, as a sysadmin needs to find it.
        assert f"(limits.daily_cap: {db}: unable to open database file)" in op.log()
        await op.send(sender="second@example.com")
        await wait_until(lambda: len(up.messages) == 2, 20, "the second delivery (cap 2)")
        third = await op.send(sender="third@example.com")
        row = await op.wait_entry(third, "the third to wait for the old cap of 2",
                                  lambda r: r["last_error"] == "waiting for limits.daily_cap to free up")
        assert row["attempts"] == 0 and len(up.messages) == 2

        # The fault cleared: the next reload opens the cap of 3, and `queue retry` sends it.
        db.rmdir()
        db.with_name("moved.sqlite3").rename(db)
        op.relay.signal(signal.SIGHUP)
        await wait_until(lambda: op.log().count("configuration reloaded") >= 4,
                         what="the second reload in both processes")
        retried = await op.cli("queue", "retry", third)
        assert retried.code == 0, retried.err
        await wait_until(lambda: len(up.messages) == 3, 20, "the third delivery (cap 3)")
        assert op.log().count("could not be opened") == 1
        assert op.relay.proc is not None and op.relay.proc.poll() is None
    finally:
        assert await op.stop() == 0
