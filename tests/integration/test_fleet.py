"""Two and three `relayd run` processes sharing one PostgreSQL database (shared_state) and one
fake smarthost, seen as the operator sees them: SMTP replies, `queue list --json`, the log,
/metrics and what the smarthost received. The fleet delivers exactly limits.daily_cap
recipients, a listing on one node stops mail through another within a second, and a database
outage loses, duplicates and overspends nothing."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiosmtplib

from tests.support.operator import Operator
from tests.support.postgres import PASSWORD, Cluster
from tests.support.relay import free_port, upstream_smarthost
from tests.support.upstream import FakeUpstream, Upstreams
from tests.support.waiting import wait_until

WAITING = "waiting for limits.daily_cap to free up"


def _node(tmp_path: Path, name: str, pg: Cluster, up: FakeUpstream, **extra: Any) -> Operator:
    home = tmp_path / name
    home.mkdir()
    (home / "pg.password").write_text(PASSWORD + "\n")
    shared = {"url": pg.url, "password_file": str(home / "pg.password"), "node": name}
    return Operator(home, [upstream_smarthost(up)], shared_state=shared, **extra)


def _message(n: int, to: str) -> bytes:
    return (f"From: app@example.com\r\nTo: {to}\r\nSubject: fleet {n}\r\n"
            f"Message-ID: <fleet-{n}@example.com>\r\n\r\nbody {n}\r\n").encode()


def _subjects(up: FakeUpstream) -> list[str]:
    out = []
    for m in up.messages:
        for line in m.data.decode(errors="replace").splitlines():
            if line.startswith("Subject: "):
                out.append(line.removeprefix("Subject: "))
    return out


async def _fleet(tmp_path: Path, pg: Cluster, up: FakeUpstream, names: list[str],
                 **extra: Any) -> list[Operator]:
    nodes = [_node(tmp_path, n, pg, up, **extra) for n in names]
    assert (await nodes[0].cli("shared-state", "migrate")).code == 0
    await asyncio.gather(*(n.start() for n in nodes))
    return nodes


async def _stop(nodes: list[Operator]) -> None:
    codes = await asyncio.gather(*(n.stop() for n in nodes))
    assert codes == [0] * len(nodes)


async def refuses_at_rcpt(node: Operator, i: int, rcpt: str) -> bool:
    """Whether ``node`` refuses ``rcpt`` at RCPT now (a probe message ``i`` otherwise goes)."""
    try:
        await node.send(_message(i, rcpt), rcpts=(rcpt,))
    except aiosmtplib.SMTPRecipientsRefused:
        return True
    return False


async def _waiting(nodes: list[Operator]) -> int:
    rows = [r for n in nodes for r in await n.queue()]
    return sum(1 for r in rows if r["last_error"] == WAITING)


async def test_three_nodes_deliver_exactly_the_daily_cap_and_the_rest_wait(
        tmp_path: Path, pg: Cluster, upstream: Upstreams) -> None:
    up = await upstream()
    nodes = await _fleet(tmp_path, pg, up, ["relay-a", "relay-b", "relay-c"],
                         limits={"daily_cap": 10})
    try:
        # 30 messages at once, 10 through each node, one recipient each
        await asyncio.gather(*(nodes[i % 3].send(_message(i, f"user{i}@example.net"),
                                                 rcpts=(f"user{i}@example.net",))
                               for i in range(30)))
        await wait_until(lambda: len(up.messages) >= 10, 30, "ten deliveries")
        # the other 20 wait on their nodes, none was bounced or attempted
        await wait_until(lambda: _waiting(nodes), 30, "the rest to wait for the cap",
                         interval=0.2)

        async def all_waiting() -> bool:
            return await _waiting(nodes) == 20
        await wait_until(all_waiting, 30, "all 20 others to wait for the cap", interval=0.2)
        assert len(up.messages) == 10
        assert len(set(_subjects(up))) == 10   # ten different messages, none twice
        # A node writes its counts within half a second of a delivery (relayd/shared/cap.py)
        await wait_until(lambda: pg.psql("SELECT sum(n) FROM relayd_cap_minutes") == "10", 5,
                         "the fleet's count to be exactly 10")
        await wait_until(lambda: pg.psql("SELECT coalesce(sum(n), 0) FROM relayd_cap_in_flight")
                         == "0", 5, "no unit held in flight")
        assert len(up.messages) == 10
    finally:
        await _stop(nodes)


async def test_a_listing_on_one_node_stops_mail_through_another_within_a_second(
        tmp_path: Path, pg: Cluster, upstream: Upstreams) -> None:
    up = await upstream()
    nodes = await _fleet(tmp_path, pg, up, ["relay-a", "relay-b"],
                         do_not_email={"action": "reject"})
    a, b = nodes
    try:
        await b.send(_message(1, "carol@example.net"), rcpts=("carol@example.net",))
        await wait_until(lambda: len(up.messages) == 1, 20, "the first delivery")
        listed = await a.cli("suppress", "add", "carol@example.net")
        assert listed.code == 0, listed.err
        started = time.monotonic()
        await wait_until(lambda: refuses_at_rcpt(b, 2, "carol@example.net"), 1.0,
                         "relay-b to refuse carol at RCPT", interval=0.05)
        assert time.monotonic() - started < 1.0
    finally:
        await _stop(nodes)


async def test_a_listing_on_one_node_stops_delivery_of_mail_already_queued_on_another(
        tmp_path: Path, pg: Cluster, upstream: Upstreams) -> None:
    up = await upstream(replies={"mail": "451 4.3.0 try later"})
    # An hour's backoff: the next attempt is the operator's retry, not one that may come
    # first on its own (and find the message gone by the time the retry runs).
    nodes = await _fleet(tmp_path, pg, up, ["relay-a", "relay-b"],
                         spool={"retry": {"initial": "1h", "max_interval": "2h"}})
    a, b = nodes
    try:
        qid = await b.send(_message(1, "dave@example.net"), rcpts=("dave@example.net",))
        await b.wait_entry(qid, "a deferred attempt", lambda r: r["attempts"] >= 1)
        assert (await a.cli("suppress", "add", "dave@example.net")).code == 0
        up.replies = {}
        started = time.monotonic()
        assert (await b.cli("queue", "retry", qid)).code == 0
        await wait_until(lambda: any("status=suppressed" in line for line in b.delivery_lines(qid)),
                         10, "relay-b to drop dave at delivery")
        assert time.monotonic() - started < 5
        assert up.messages == []
    finally:
        await _stop(nodes)


def _metric(port: int, name: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def test_the_database_stopped_mid_load_loses_duplicates_and_overspends_nothing(
        tmp_path: Path, pg: Cluster, upstream: Upstreams) -> None:
    up = await upstream()
    metrics_a = free_port()
    a = _node(tmp_path, "relay-a", pg, up, limits={"daily_cap": 12},
              metrics={"listen": f"127.0.0.1:{metrics_a}"})
    b = _node(tmp_path, "relay-b", pg, up, limits={"daily_cap": 12})
    nodes = [a, b]
    assert (await a.cli("shared-state", "migrate")).code == 0
    await asyncio.gather(a.start(), b.start())
    try:
        await asyncio.gather(*(nodes[i % 2].send(_message(i, f"u{i}@example.net"),
                                                 rcpts=(f"u{i}@example.net",)) for i in range(6)))
        await wait_until(lambda: len(up.messages) == 6, 20, "six deliveries")
        await asyncio.to_thread(pg.stop)
        # both nodes keep accepting: the spool is local
        await asyncio.gather(*(nodes[i % 2].send(_message(i, f"u{i}@example.net"),
                                                 rcpts=(f"u{i}@example.net",)) for i in range(6, 16)))
        await wait_until(lambda: "alert: shared_state_down shared_state" in a.log(), 30,
                         "the shared_state_down alert")
        await wait_until(lambda: _metric(metrics_a, "relayd_shared_state_up") == 0.0, 30,
                         "relayd_shared_state_up 0", interval=0.2)
        assert len(up.messages) == 6  # nothing needing the cap went while it could not be asked

        async def waiting_for_the_database() -> bool:
            rows = [r for n in nodes for r in await n.queue()]
            return len(rows) == 10 and all("waiting for the shared state" in (r["last_error"] or "")
                                           for r in rows)
        await wait_until(waiting_for_the_database, 30, "all ten to wait for the database",
                         interval=0.2)
        await asyncio.to_thread(pg.start)
        await wait_until(lambda: len(up.messages) == 12, 30, "the cap's other six")
        await wait_until(lambda: _metric(metrics_a, "relayd_shared_state_up") == 1.0, 30,
                         "relayd_shared_state_up 1", interval=0.2)

        async def rest_wait_for_cap() -> bool:
            return await _waiting(nodes) == 4
        await wait_until(rest_wait_for_cap, 30, "the last four to wait for the cap", interval=0.2)
        assert len(up.messages) == 12
        assert sorted(_subjects(up)) == sorted(set(_subjects(up)))   # none twice
        await wait_until(lambda: pg.psql("SELECT sum(n) FROM relayd_cap_minutes") == "12", 5,
                         "the fleet's count to be exactly 12")
        assert PASSWORD not in a.log() + b.log()
    finally:
        if pg.pid() is None:
            await asyncio.to_thread(pg.start)
        await _stop(nodes)


async def hanging_and_fast_nodes(tmp_path: Path, pg: Cluster, upstream: Upstreams, cap: int,
                                 ) -> tuple[Operator, Operator, FakeUpstream, FakeUpstream]:
    """relay-a, whose smarthost hangs in DATA (so its deliveries hold cap units), and relay-b
    with a smarthost that answers; both with ``limits.daily_cap: cap``, the schema migrated,
    neither started."""
    slow = await upstream(hang_at="data")
    fast = await upstream()
    a = _node(tmp_path, "relay-a", pg, slow, limits={"daily_cap": cap})
    a.write(a.config.read_text().replace("timeout: 2s", "timeout: 60s"))
    b = _node(tmp_path, "relay-b", pg, fast, limits={"daily_cap": cap})
    assert (await a.cli("shared-state", "migrate")).code == 0
    return a, b, slow, fast


async def test_a_node_killed_mid_load_delivers_its_spool_after_restart_and_the_cap_holds(
        tmp_path: Path, pg: Cluster, upstream: Upstreams) -> None:
    a, b, slow, fast = await hanging_and_fast_nodes(tmp_path, pg, upstream, 15)
    await asyncio.gather(a.start(), b.start())
    try:
        ids = [await a.send(_message(i, f"a{i}@example.net"), rcpts=(f"a{i}@example.net",))
               for i in range(5)]
        await asyncio.gather(*(b.send(_message(10 + i, f"b{i}@example.net"),
                                      rcpts=(f"b{i}@example.net",)) for i in range(5)))
        await wait_until(lambda: len(fast.messages) == 5, 20, "relay-b's five")
        # relay-a's deliveries hang in DATA, holding their share of the cap
        await wait_until(lambda: pg.psql("SELECT coalesce(sum(n), 0) FROM relayd_cap_in_flight "
                                         "WHERE node = 'relay-a'") not in ("", "0"),
                         20, "relay-a to hold units in flight", interval=0.1)
        await asyncio.to_thread(a.relay.kill9)
        slow.hang_at = None
        await a.start()
        await wait_until(lambda: len(slow.messages) == 5, 30, lambda: f"relay-a's spool after the restart: {a.log()[-3000:]}")
        assert sorted(_subjects(slow)) == [f"fleet {i}" for i in range(5)]

        # The smarthost has the fifth message before relayd reads its 250 and lets the spool
        # file go: wait for relay-a's queue to let go of all five.
        async def none_left() -> bool:
            return {r["id"] for r in await a.queue()} & set(ids) == set()
        await wait_until(none_left, 20, "relay-a's five to leave its queue", interval=0.2)
        # What relay-a held when it died counts as delivered (it may have been): the fleet's
        # count may be above what was really sent, never below, and never above the cap.
        # (relay-a writes its new counts, and gives its units back, within half a second.)
        await wait_until(lambda: pg.psql("SELECT n FROM relayd_cap_in_flight "
                                         "WHERE node = 'relay-a'") == "0", 5,
                         "relay-a to hold nothing")
        counted = int(pg.psql("SELECT sum(n) FROM relayd_cap_minutes"))
        assert len(slow.messages) + len(fast.messages) == 10
        assert 10 < counted <= 15
    finally:
        await _stop([a, b])
