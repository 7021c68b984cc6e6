"""The fleet's limits.daily_cap in PostgreSQL (relayd/shared/cap.py) against one real database:
two nodes' caps hammered from many threads never let more than the cap go and count exactly
what went; reservations come in batches (far fewer transactions than messages) but one at a
time near the cap; an idle lease goes back to the fleet; and schema version 4 keeps the
counts of version 3 when it moves them into minutes."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.config.schema import SharedStateConfig, SslMode
from relayd.secrets import Secret
from relayd.shared import schema
from relayd.shared.cap import BATCH_MAX, STALE_ENV, SharedDailyCap
from relayd.shared.db import Conn, SharedDB, connect
from tests.integration.test_fleet import WAITING, _message, _node, hanging_and_fast_nodes
from tests.support.postgres import PASSWORD, Cluster
from tests.support.upstream import Upstreams
from tests.support.waiting import wait_until, wait_until_sync

DAY = 86400.0


class Counting(SharedDB):
    """A node's connection that counts its transactions."""

    transactions = 0

    def run(self, work):  # type: ignore[no-untyped-def]
        self.transactions += 1
        return super().run(work)


def _cfg(pg: Cluster, node: str) -> SharedStateConfig:
    return SharedStateConfig(url=pg.url, password=Secret(PASSWORD), sslmode=SslMode.DISABLE,
                             node=node)


@pytest.fixture
def nodes(pg: Cluster) -> Iterator[tuple[Counting, Counting]]:
    conn: Conn = connect(_cfg(pg, "setup"))
    schema.migrate(conn)
    conn.close()
    a, b = Counting(_cfg(pg, "relay-a")), Counting(_cfg(pg, "relay-b"))
    yield a, b
    a.close()
    b.close()


def _int(pg: Cluster, sql: str) -> int:
    return int(pg.psql(sql) or 0)


def _delivered(pg: Cluster) -> int:
    return _int(pg, "SELECT coalesce(sum(n), 0) FROM relayd_cap_minutes")


def _held(pg: Cluster, node: str | None = None) -> int:
    where = f" WHERE node = '{node}'" if node else ""
    return _int(pg, f"SELECT coalesce(sum(n), 0) FROM relayd_cap_in_flight{where}")


def test_many_threads_on_two_nodes_never_exceed_the_cap_and_count_exactly(
        nodes: tuple[Counting, Counting], pg: Cluster) -> None:
    cap = 400
    caps = [SharedDailyCap(db, cap, window=DAY) for db in nodes]
    lock = threading.Lock()
    outstanding = delivered = 0
    worst = 0          # the most ever delivered or under way at one moment
    errors: list[BaseException] = []

    def worker(node: SharedDailyCap, seed: int) -> None:
        nonlocal outstanding, delivered, worst
        rnd = random.Random(seed)
        try:
            for _ in range(150):
                want = rnd.randint(1, 3)
                granted = node.acquire(want, time.time())
                with lock:
                    outstanding += granted
                    worst = max(worst, delivered + outstanding)
                if granted < want:           # the gate gives a short grant back and waits
                    with lock:
                        outstanding -= granted
                    node.settle(granted, 0, time.time())
                    continue
                sent = 0 if rnd.random() < 0.2 else rnd.randint(1, granted)   # failures
                with lock:
                    outstanding -= granted
                    delivered += sent
                node.settle(granted, sent, time.time())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(caps[i % 2], i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert worst <= cap                      # never more than the cap, at any moment
    assert delivered > cap // 2              # the demand (about 1900) did use the cap
    for c in caps:
        c.close()
    assert _delivered(pg) == delivered       # exactly what went, not one more or less
    assert _held(pg) == 0                    # every unit came back at close
    # What is left is exactly the rest of the cap: a new node gets all of it and no more.
    fresh = SharedDailyCap(nodes[0], cap, window=DAY)
    assert fresh.acquire(cap, time.time()) == cap - delivered
    fresh.settle(cap - delivered, 0, time.time())
    fresh.close()


def test_reservations_come_in_batches_far_fewer_than_messages(
        nodes: tuple[Counting, Counting], pg: Cluster) -> None:
    a, _ = nodes
    cap = SharedDailyCap(a, 1_000_000, window=DAY)
    for _ in range(1000):
        assert cap.acquire(1, time.time()) == 1
        cap.settle(1, 1, time.time())
    # 1000 messages: about 1000 / BATCH_MAX reservations and a few flushes, not 2000
    assert a.transactions <= 1000 // BATCH_MAX + 20, a.transactions
    cap.close()
    assert _delivered(pg) == 1000
    assert _held(pg) == 0


def test_near_the_cap_reservations_are_one_at_a_time(
        nodes: tuple[Counting, Counting], pg: Cluster) -> None:
    a, b = nodes
    cap_a, cap_b = SharedDailyCap(a, 10, window=DAY), SharedDailyCap(b, 10, window=DAY)
    assert cap_a.acquire(1, time.time()) == 1
    assert _held(pg, "relay-a") == 1         # 10 free: no extra units leased
    assert cap_b.acquire(9, time.time()) == 9
    assert cap_a.acquire(1, time.time()) == 0  # the last unit went to relay-b
    cap_b.settle(9, 9, time.time())
    cap_a.settle(1, 1, time.time())
    cap_a.close()
    cap_b.close()
    assert _delivered(pg) == 10 and _held(pg) == 0


def test_an_idle_lease_goes_back_to_the_fleet(
        nodes: tuple[Counting, Counting], pg: Cluster) -> None:
    a, b = nodes
    cap_a = SharedDailyCap(a, 1000, window=DAY)
    assert cap_a.acquire(1, time.time()) == 1
    leased = _held(pg, "relay-a")
    assert leased == 1 + min(BATCH_MAX, 999 // 16)     # the message's unit and its lease
    cap_a.settle(1, 1, time.time())
    # relay-a does nothing more: its flusher writes the count and gives the lease back
    wait_until_sync(lambda: _held(pg, "relay-a") == 0 and _delivered(pg) == 1, 5,
                    "relay-a's lease to go back")
    cap_b = SharedDailyCap(b, 1000, window=DAY)
    assert cap_b.acquire(999, time.time()) == 999      # all the rest, nothing kept by relay-a
    cap_b.settle(999, 0, time.time())
    cap_b.close()
    cap_a.close()


def test_a_failed_delivery_gives_its_unit_back_to_the_lease(
        nodes: tuple[Counting, Counting], pg: Cluster) -> None:
    a, _ = nodes
    cap = SharedDailyCap(a, 1000, window=DAY)
    assert cap.acquire(1, time.time()) == 1
    before = a.transactions
    cap.settle(1, 0, time.time())
    assert cap.acquire(1, time.time()) == 1          # from the lease: no transaction
    assert a.transactions == before
    cap.settle(1, 1, time.time())
    cap.close()
    assert _delivered(pg) == 1 and _held(pg) == 0


def test_a_node_restarted_counts_what_it_held_as_delivered(
        nodes: tuple[Counting, Counting], pg: Cluster) -> None:
    a, _ = nodes
    cap = SharedDailyCap(a, 100, window=DAY)
    assert cap.acquire(2, time.time()) == 2
    held = _held(pg, "relay-a")          # the two units and the lease
    # the process dies here: nothing is closed; a new process of the same node starts
    again = Counting(_cfg(pg, "relay-a"))
    try:
        later = SharedDailyCap(again, 100, window=DAY)
        assert later.acquire(1, time.time()) == 1
        assert _delivered(pg) == held
        later.settle(1, 1, time.time())
        later.close()
        assert _delivered(pg) == held + 1 and _held(pg) == 0
    finally:
        again.close()


def test_a_node_not_seen_for_a_while_has_its_units_counted_over_never_under(
        nodes: tuple[Counting, Counting], pg: Cluster) -> None:
    a, b = nodes
    cap_a = SharedDailyCap(a, 10, window=DAY)
    cap_b = SharedDailyCap(b, 10, window=DAY, stale_after=1.0)
    assert cap_a.acquire(2, time.time()) == 2
    assert _held(pg, "relay-a") == 2
    assert cap_b.acquire(1, time.time()) == 1   # relay-b holds one: its refreshes say it lives
    # relay-a writes nothing more (partitioned): a refresh of relay-b's, a second after
    # relay-a's last word, counts the units relay-a held as delivered
    def counted() -> bool:
        cap_b.refresh(time.time())
        return _held(pg, "relay-a") == 0
    wait_until_sync(counted, 10, "relay-b to count relay-a's units")
    assert _delivered(pg) == 2
    assert cap_b.acquire(10, time.time()) == 7
    cap_b.settle(7, 0, time.time())
    cap_b.settle(1, 0, time.time())
    # relay-a comes back and delivers both: counted again (4 for 2 sent), never fewer
    cap_a.settle(2, 2, time.time())
    cap_a.close()
    cap_b.close()
    assert _delivered(pg) == 4 and _held(pg) == 0


def test_a_silence_of_the_whole_fleet_makes_no_node_dead(
        nodes: tuple[Counting, Counting], pg: Cluster) -> None:
    a, b = nodes
    cap_a = SharedDailyCap(a, 10, window=DAY)
    cap_b = SharedDailyCap(b, 10, window=DAY, stale_after=1.0)
    assert cap_a.acquire(2, time.time()) == 2
    assert cap_b.acquire(1, time.time()) == 1
    # Neither node writes for longer than stale_after, as during an outage of the database
    wait_until_sync(lambda: _int(pg, "SELECT count(*) FROM relayd_cap_in_flight WHERE "
                                     "seen < extract(epoch FROM now()) - 1.5") == 2, 10,
                    "both nodes to be silent for 1.5 s")
    cap_b.refresh(time.time())   # relay-b's first word after the silence
    assert _held(pg, "relay-a") == 2 and _delivered(pg) == 0
    cap_a.settle(2, 2, time.time())
    cap_b.settle(1, 1, time.time())
    cap_a.close()
    cap_b.close()
    assert _delivered(pg) == 3 and _held(pg) == 0


async def test_a_killed_node_that_never_returns_has_its_units_counted_by_another(
        tmp_path: Path, pg: Cluster, upstream: Upstreams) -> None:
    a, b, slow, fast = await hanging_and_fast_nodes(tmp_path, pg, upstream, 6)
    # A live node refreshes every 5 s: 8 s without a word means dead (300 s outside tests)
    b.relay.env = {**b.relay.env, STALE_ENV: "8"}
    await asyncio.gather(a.start(), b.start())
    try:
        for i in range(3):
            await a.send(_message(i, f"a{i}@example.net"), rcpts=(f"a{i}@example.net",))
        # relay-a's deliveries hang in DATA, holding three units; then it dies for good
        await wait_until(lambda: pg.psql("SELECT n FROM relayd_cap_in_flight "
                                         "WHERE node = 'relay-a'") == "3", 20,
                         "relay-a to hold three units", interval=0.1)
        await asyncio.to_thread(a.relay.kill9)
        for i in range(4):
            await b.send(_message(10 + i, f"b{i}@example.net"), rcpts=(f"b{i}@example.net",))
        await wait_until(lambda: len(fast.messages) == 3, 20, "relay-b's three")
        # No SQL by hand: relay-b counts relay-a's three as delivered (they may have been)
        await wait_until(lambda: pg.psql("SELECT n FROM relayd_cap_in_flight "
                                         "WHERE node = 'relay-a'") == "0", 40,
                         lambda: f"relay-b to count relay-a's units: {b.log()[-2000:]}", interval=0.2)
        # relay-b logs what it counted once its transaction has committed, a moment after
        # the database shows it: wait for the line.
        await wait_until(lambda: "node relay-a was not seen" in b.log(), 5, "relay-b's line")
        assert ("node relay-a was not seen for 8s: the 3 unit(s) of the daily cap it held now "
                "count as delivered") in b.log()
        await wait_until(lambda: pg.psql("SELECT node, sum(n) FROM relayd_cap_minutes GROUP BY 1 "
                                         "ORDER BY 1") == "relay-a|3\nrelay-b|3", 5,
                         "three counted for each node")

        async def fourth_waits() -> bool:
            rows = await b.queue()
            return len(rows) == 1 and rows[0]["last_error"] == WAITING
        await wait_until(fourth_waits, 20, "relay-b's fourth to wait for the cap", interval=0.2)
        assert len(fast.messages) == 3
        # relay-a comes back after all: nothing it held is counted twice, its mail waits
        slow.hang_at = None
        await a.start()

        async def a_waits() -> bool:
            rows = await a.queue()
            return len(rows) == 3 and all(r["last_error"] == WAITING for r in rows)
        await wait_until(a_waits, 30, "relay-a's three to wait for the cap", interval=0.2)
        assert pg.psql("SELECT sum(n) FROM relayd_cap_minutes") == "6"
        assert len(slow.messages) + len(fast.messages) == 3
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_a_reload_that_changes_the_cap_gives_the_old_lease_back(
        tmp_path: Path, pg: Cluster, upstream: Upstreams) -> None:
    """SIGHUP with a new limits.daily_cap: the old cap writes its count and gives its lease
    back (in a worker thread, not on the event loop); the node goes on under the new cap."""
    up = await upstream()
    a = _node(tmp_path, "relay-a", pg, up, limits={"daily_cap": 1000})
    assert (await a.cli("shared-state", "migrate")).code == 0
    await a.start()
    try:
        await a.send(_message(1, "a1@example.net"), rcpts=("a1@example.net",))
        await wait_until(lambda: len(up.messages) == 1, 20, "the first delivery")
        await wait_until(lambda: _int(pg, "SELECT coalesce(sum(n), 0) FROM relayd_cap_minutes") == 1,
                         5, "the first count")
        a.write(a.config.read_text().replace("daily_cap: 1000", "daily_cap: 500"))
        assert "daily_cap: 500" in a.config.read_text()
        a.relay.signal(signal.SIGHUP)
        # Whether the old lease was still held or already idle, after the reload nothing is
        # held and the count is kept.
        await wait_until(lambda: _int(pg, "SELECT coalesce(sum(n), 0) FROM relayd_cap_in_flight") == 0,
                         10, "the old cap's lease to go back", interval=0.1)
        await a.send(_message(2, "a2@example.net"), rcpts=("a2@example.net",))
        await wait_until(lambda: len(up.messages) == 2, 20, "a delivery under the new cap")
        await wait_until(lambda: _int(pg, "SELECT coalesce(sum(n), 0) FROM relayd_cap_minutes") == 2,
                         5, "both counted")
        assert "Traceback" not in a.log()
    finally:
        await a.stop()
    assert _int(pg, "SELECT coalesce(sum(n), 0) FROM relayd_cap_in_flight") == 0


def test_version_4_keeps_the_counts_of_version_3(pg: Cluster) -> None:
    conn: Conn = connect(_cfg(pg, "setup"))
    try:
        with conn.transaction():
            for version, statements in schema.MIGRATIONS:
                if version <= 3:
                    for statement in statements:
                        conn.execute(statement)
            conn.execute("INSERT INTO relayd_schema (version) VALUES (3)")
        now = time.time()
        rows = [(now - 7200.5, 3, "relay-a"), (now - 7199.0, 4, "relay-a"),
                (now - 60, 2, "relay-b"), (now - 59.9, 5, "relay-b"), (now - 2 * DAY, 9, "relay-a")]
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO relayd_cap_deliveries (at, n, node) VALUES (%s, %s, %s)",
                            rows)
        conn.execute("INSERT INTO relayd_cap_in_flight (node, n, since) VALUES ('relay-b', 2, %s)",
                     (now,))
        assert schema.migrate(conn) == (3, 4)
        per_node = dict(conn.execute(
            "SELECT node, sum(n)::int FROM relayd_cap_minutes GROUP BY node").fetchall())
        assert per_node == {"relay-a": 16, "relay-b": 7}
        per_minute = sorted(conn.execute("SELECT minute, node, n FROM relayd_cap_minutes").fetchall())
        expected: dict[tuple[int, str], int] = {}
        for at, n, node in rows:
            key = (int(at // 60), node)
            expected[key] = expected.get(key, 0) + n
        assert per_minute == sorted((m, node, n) for (m, node), n in expected.items())
        assert conn.execute("SELECT to_regclass('relayd_cap_deliveries')").fetchone() == (None,)
        assert conn.execute("SELECT n FROM relayd_cap_in_flight").fetchall() == [(2,)]
    finally:
        conn.close()
    # The window sum over the new table is what version 3's query gave (the old row of two
    # days ago is out of both).
    db = SharedDB(_cfg(pg, "relay-c"))
    try:
        used, held, _ = SharedDailyCap(db, 100, window=DAY).state(time.time(), 1)
        assert (used, held) == (14, 2)
    finally:
        db.close()
