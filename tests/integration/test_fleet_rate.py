"""The fleet's limits.rate in PostgreSQL (relayd/shared/rate.py): two nodes' pacers against
one real database never start more sends in a one-second window than the rate allows, take
their slots in batches (the database is not asked once per message), and wait instead of
sending while the database cannot be reached; then the same with two `relayd run` nodes."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.config.schema import SharedStateConfig, SslMode
from relayd.errors import StateUnavailable
from relayd.secrets import Secret
from relayd.shared import schema
from relayd.shared.db import Conn, SharedDB, connect
from relayd.shared.rate import SharedRate, window_allowance
from relayd.units import Rate
from tests.integration.test_fleet import _fleet, _message, _stop, _subjects
from tests.support.postgres import PASSWORD, Cluster
from tests.support.upstream import Upstreams
from tests.support.waiting import wait_until


def test_the_window_allowance_adds_up_to_the_rate_also_for_a_fractional_rate() -> None:
    assert [window_allowance(14.0, k) for k in range(3)] == [14, 14, 14]
    per_second = 10000 / 3600   # 10000/h: 2 or 3 a second, 10000 an hour
    start = 1_700_000_000
    assert sum(window_allowance(per_second, k) for k in range(start, start + 3600)) == 10000
    assert {window_allowance(per_second, k) for k in range(start, start + 10)} == {2, 3}
    slow = [window_allowance(1 / 60, k) for k in range(start, start + 120)]   # 1/m
    assert sum(slow) == 2 and max(slow) == 1


class Counting(SharedDB):
    """A node's connection that counts its transactions."""

    transactions = 0

    def run(self, work):  # type: ignore[no-untyped-def]
        self.transactions += 1
        return super().run(work)


@pytest.fixture
def nodes(pg: Cluster) -> Iterator[tuple[Counting, Counting]]:
    def cfg(node: str) -> SharedStateConfig:
        return SharedStateConfig(url=pg.url, password=Secret(PASSWORD), sslmode=SslMode.DISABLE,
                                 node=node)
    conn: Conn = connect(cfg("setup"))
    schema.migrate(conn)
    conn.close()
    a, b = Counting(cfg("relay-a")), Counting(cfg("relay-b"))
    yield a, b
    a.close()
    b.close()


async def test_two_nodes_share_one_rate_and_ask_the_database_in_batches(
        nodes: tuple[Counting, Counting], pg: Cluster) -> None:
    a, b = nodes
    rate = Rate(40, 1)   # batches of 10 slots
    pacers = [SharedRate(a, rate), SharedRate(b, rate)]
    starts: list[float] = []

    async def send(pacer: SharedRate) -> None:
        await pacer.wait(1)
        starts.append(time.time())

    began = time.time()
    # 100 sends on each node at once: alone, each node would be done in about 1.5 s
    await asyncio.gather(*(send(pacers[i % 2]) for i in range(200)))
    per_window = Counter(math.floor(t) for t in starts)
    assert max(per_window.values()) <= 40, per_window
    # 200 at 40 a second for the fleet: five windows at least (alone, each node would take
    # two or three)
    assert len(per_window) >= 5
    assert math.floor(max(starts)) - math.floor(began) >= 4
    used = pg.psql("SELECT sum(used), max(used) FROM relayd_rate_windows").split("|")
    assert int(used[0]) >= 200 and int(used[1]) <= 40
    assert a.transactions + b.transactions <= 200 / 5   # batches, not one query per send


async def test_a_message_with_more_recipients_than_a_window_collects_slots_and_goes(
        nodes: tuple[Counting, Counting]) -> None:
    a, _ = nodes
    pacer = SharedRate(a, Rate(4, 1))
    began = time.time()
    await pacer.wait(10)      # 10 recipients at 4/s: three windows' worth, as a bucket would
    assert time.time() - began > 1.0


async def test_while_the_database_is_down_wait_raises_and_spends_nothing(
        nodes: tuple[Counting, Counting], pg: Cluster) -> None:
    a, _ = nodes
    pacer = SharedRate(a, Rate(2, 1))
    await pacer.wait(1)
    await asyncio.to_thread(pg.stop)
    try:
        # the slots in hand are spent first; then the database must be asked, and cannot be
        with pytest.raises(StateUnavailable):
            for _ in range(5):
                await pacer.wait(1)
    finally:
        await asyncio.to_thread(pg.start)
    assert not a.up

    async def sent_again() -> bool:
        try:
            await pacer.wait(1)
        except StateUnavailable:
            return False  # SharedDB tries to reconnect at most once a second
        return True
    await wait_until(sent_again, 10, "the pacer to take slots again", interval=0.2)
    assert a.up


async def test_two_relays_deliver_at_the_fleets_rate_and_wait_while_the_database_is_down(
        tmp_path: Path, pg: Cluster, upstream: Upstreams) -> None:
    up = await upstream()
    nodes = await _fleet(tmp_path, pg, up, ["relay-a", "relay-b"], limits={"rate": "4/s"})
    try:
        await asyncio.gather(*(nodes[i % 2].send(_message(i, f"r{i}@example.net"),
                                                 rcpts=(f"r{i}@example.net",)) for i in range(16)))
        await wait_until(lambda: len(up.messages) == 16, 30, "sixteen deliveries")
        # 16 at 4 a second for the fleet: four windows at least (each node alone, at its own
        # 4 a second with a burst of 4, would have delivered its eight within about a second)
        times = sorted(m.at for m in up.messages)
        assert math.floor(times[-1]) - math.floor(times[0]) >= 3
        assert pg.psql("SELECT max(used) FROM relayd_rate_windows") == "4"

        await asyncio.to_thread(pg.stop)
        await asyncio.gather(*(nodes[i % 2].send(_message(i, f"r{i}@example.net"),
                                                 rcpts=(f"r{i}@example.net",)) for i in range(16, 20)))

        async def waiting_for_the_database() -> bool:
            rows = [r for n in nodes for r in await n.queue()]
            return len(rows) == 4 and all("waiting for the shared state (limits.rate)"
                                          in (r["last_error"] or "") for r in rows)
        await wait_until(waiting_for_the_database, 30, "all four to wait for the database",
                         interval=0.2)
        rows = [r for n in nodes for r in await n.queue()]
        assert all(r["attempts"] == 0 for r in rows)   # waiting spends no attempt
        assert len(up.messages) == 16
        await asyncio.to_thread(pg.start)
        await wait_until(lambda: len(up.messages) == 20, 30, "the four after the database is back")
        assert sorted(_subjects(up)) == sorted(set(_subjects(up)))   # none twice
        assert PASSWORD not in nodes[0].log() + nodes[1].log()
    finally:
        if pg.pid() is None:
            await asyncio.to_thread(pg.start)
        await _stop(nodes)
