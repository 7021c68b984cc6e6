"""A dead node's spool moved to another node with `relayd queue import DIR` while that node
runs: two `relayd run` processes sharing one PostgreSQL database, one killed with SIGKILL
with mail queued, the other delivers every message of both exactly once within the fleet's
daily cap. Seen as the operator sees it: exit codes, command output, `queue list --json`,
`queue show` and what the smarthost received."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support.operator import Operator
from tests.support.postgres import PASSWORD, Cluster
from tests.support.relay import upstream_smarthost
from tests.support.upstream import FakeUpstream, Upstreams
from tests.support.waiting import wait_until

CAP = 6
WAITING = "waiting for limits.daily_cap to free up"


def _node(tmp_path: Path, name: str, pg: Cluster, up: FakeUpstream) -> Operator:
    home = tmp_path / name
    home.mkdir()
    (home / "pg.password").write_text(PASSWORD + "\n")
    shared = {"url": pg.url, "password_file": str(home / "pg.password"), "node": name}
    return Operator(home, [upstream_smarthost(up)], shared_state=shared,
                    limits={"daily_cap": CAP})


def _message(n: int) -> bytes:
    return (f"From: app@example.com\r\nTo: user{n}@example.net\r\nSubject: moved {n}\r\n"
            f"Message-ID: <moved-{n}@example.com>\r\n\r\nbody {n}\r\n").encode()


def _subjects(up: FakeUpstream) -> list[str]:
    return [line.removeprefix("Subject: ") for m in up.messages
            for line in m.data.decode(errors="replace").splitlines() if line.startswith("Subject: ")]


async def test_a_killed_nodes_spool_imported_on_another_is_delivered_once_within_the_cap(
        tmp_path: Path, pg: Cluster, upstream: Upstreams) -> None:
    down = await upstream(replies={"mail": "451 4.3.0 try later"})   # relay-a's, deferring
    up = await upstream()                                             # relay-b's
    a = _node(tmp_path, "relay-a", pg, down)
    b = _node(tmp_path, "relay-b", pg, up)
    assert (await a.cli("shared-state", "migrate")).code == 0
    await asyncio.gather(a.start(), b.start())
    a_spool = str(tmp_path / "relay-a" / "spool")
    try:
        ids = [await a.send(_message(n), rcpts=(f"user{n}@example.net",)) for n in range(5)]
        for qid in ids:
            await a.wait_entry(qid, "a deferred attempt on relay-a", lambda r: r["attempts"] >= 1)
        # Refused while relay-a runs: its spool is still in use.
        busy = await b.cli("queue", "import", a_spool)
        assert busy.code == 1
        assert f"a relayd is running on {a_spool}: stop it first" in busy.err
        await asyncio.to_thread(a.relay.kill9)

        await b.send(_message(10), rcpts=("user10@example.net",))
        await wait_until(lambda: len(up.messages) == 1, 20, "relay-b's own delivery")
        moved = await b.cli("queue", "import", a_spool)
        assert moved.code == 0, moved.err
        assert moved.out.splitlines()[-1] == (f"-- 5 message(s) imported from {a_spool} into "
                                              f"{tmp_path / 'relay-b' / 'spool'}")
        for qid in ids:
            assert f"{qid}: imported" in moved.out

        # The fleet's cap is 6: relay-b's own one and five of relay-a's are 6, exactly. A unit
        # relay-a held for an attempt under way when it was killed stays held (docs/fleet.md),
        # and the message it was for then waits for the cap on relay-b.
        held = int(pg.psql("SELECT coalesce(sum(n), 0) FROM relayd_cap_in_flight "
                           "WHERE node = 'relay-a'"))
        await wait_until(lambda: len(up.messages) == CAP - held, 20, "relay-a's mail through relay-b")
        subjects = _subjects(up)
        assert len(set(subjects)) == len(subjects) == CAP - held          # none twice
        assert set(subjects) <= {"moved 10", *(f"moved {n}" for n in range(5))}
        # relay-b writes its counts within half a second of a delivery (relayd/shared/cap.py)
        await wait_until(lambda: pg.psql("SELECT sum(n) FROM relayd_cap_minutes") == str(CAP - held),
                         5, f"the fleet's count to be exactly {CAP - held}")

        async def the_rest_wait() -> bool:
            rows = await b.queue()
            return len(rows) == held and all(r["last_error"] == WAITING for r in rows)
        await wait_until(the_rest_wait, 20, "any message beyond the cap to wait", interval=0.2)
        # Running it again (or after a crash) imports nothing twice.
        again = await b.cli("queue", "import", a_spool)
        assert again.code == 0 and again.out.splitlines()[-1].startswith("-- 0 message(s) imported")

        # One more message: the cap is spent, it waits on relay-b.
        late = await b.send(_message(11), rcpts=("user11@example.net",))
        await b.wait_entry(late, "the cap wait", lambda r: r["last_error"] == WAITING)
        assert len(up.messages) == CAP - held
    finally:
        await b.stop()


async def test_imported_mail_keeps_its_history_and_attempts(
        tmp_path: Path, pg: Cluster, upstream: Upstreams) -> None:
    down = await upstream(replies={"mail": "451 4.3.0 try later"})
    a = _node(tmp_path, "relay-a", pg, down)
    b = _node(tmp_path, "relay-b", pg, down)   # relay-b's smarthost defers too: the mail stays
    assert (await a.cli("shared-state", "migrate")).code == 0
    await asyncio.gather(a.start(), b.start())
    try:
        qid = await a.send(_message(1), rcpts=("user1@example.net",))
        before = await a.wait_entry(qid, "two attempts on relay-a", lambda r: r["attempts"] >= 2)
        await asyncio.to_thread(a.relay.kill9)
        shown_a = (await a.cli("queue", "show", qid)).out
        moved = await b.cli("queue", "import", str(tmp_path / "relay-a" / "spool"))
        assert moved.code == 0, moved.err
        row = await b.wait_entry(qid, "the imported message on relay-b", lambda r: True)
        assert (row["sender"], row["recipients"], row["created"]) == (
            before["sender"], before["recipients"], before["created"])
        assert row["attempts"] >= before["attempts"]
        shown_b = (await b.cli("queue", "show", qid)).out
        history_a = shown_a[shown_a.index("history:"):shown_a.index("headers:")].splitlines()[1:]
        assert history_a and all(line in shown_b for line in history_a)
        assert (await a.queue()) == []             # nothing left on the dead node's disk
    finally:
        await b.stop()
