"""One alert per outage for a fleet (relayd/shared/alerts.py with relayd/control/alerts.py):
the first node to fire notifies, naming the nodes that saw the outage; the others only add
their name; the last to clear sends the one recovery. First two nodes' alert senders against
one real database, then two `relayd run` nodes and one failing smarthost."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.config.schema import AlertsConfig, SharedStateConfig, SslMode
from relayd.control.alerts import Alerts
from relayd.secrets import Secret
from relayd.shared import schema
from relayd.shared.alerts import FleetAlerts
from relayd.shared.db import SharedDB, connect
from tests.integration.test_alerts import Receiver
from tests.integration.test_fleet import _fleet, _message, _stop
from tests.support.postgres import PASSWORD, Cluster
from tests.support.upstream import Upstreams
from tests.support.waiting import wait_until


@pytest.fixture
def dbs(pg: Cluster) -> Iterator[tuple[SharedDB, SharedDB]]:
    def cfg(node: str) -> SharedStateConfig:
        return SharedStateConfig(url=pg.url, password=Secret(PASSWORD), sslmode=SslMode.DISABLE,
                                 node=node)
    conn = connect(cfg("setup"))
    schema.migrate(conn)
    conn.close()
    a, b = SharedDB(cfg("relay-a")), SharedDB(cfg("relay-b"))
    yield a, b
    a.close()
    b.close()


def _alerts(port: int, db: SharedDB) -> Alerts:
    return Alerts(AlertsConfig(webhook=f"http://127.0.0.1:{port}/hook"), hostname="relay",
                  fleet=FleetAlerts(db), gather=0.5)


async def test_two_nodes_send_one_notice_naming_both_and_the_last_to_clear_recovers(
        dbs: tuple[SharedDB, SharedDB]) -> None:
    async with Receiver() as rx:
        a, b = _alerts(rx.port, dbs[0]), _alerts(rx.port, dbs[1])
        await a.start()
        await b.start()
        a.fire("smarthost_down", "primary", "smarthost mx.example.com:587: connection refused")
        b.fire("smarthost_down", "primary", "smarthost mx.example.com:587: connection refused")
        await wait_until(lambda: rx.posts, 10, "the notice")
        await a.wait_idle()
        await b.wait_idle()
        assert len(rx.posts) == 1
        notice = rx.posts[0]
        assert (notice["event"], notice["state"]) == ("smarthost_down", "firing")
        assert sorted(notice["nodes"]) == ["relay-a", "relay-b"]
        assert "(seen by relay-" in notice["text"]

        a.clear("smarthost_down", "primary", "smarthost mx.example.com:587 is reachable again")
        await a.wait_idle()
        assert len(rx.posts) == 1     # relay-b still sees it
        b.clear("smarthost_down", "primary", "smarthost mx.example.com:587 is reachable again")
        await b.wait_idle()
        assert [p["state"] for p in rx.posts] == ["firing", "resolved"]
        assert sorted(rx.posts[1]["nodes"]) == ["relay-a", "relay-b"]

        # the next outage is a new one: one notice again
        b.fire("smarthost_down", "primary", "smarthost mx.example.com:587: 421")
        a.fire("smarthost_down", "primary", "smarthost mx.example.com:587: 421")
        await wait_until(lambda: len(rx.posts) == 3, 10, "the second outage's notice")
        await a.wait_idle()
        await b.wait_idle()
        assert len(rx.posts) == 3
        await a.close()
        await b.close()


async def test_events_of_one_node_and_a_single_relays_payload_are_unchanged(
        dbs: tuple[SharedDB, SharedDB]) -> None:
    async with Receiver() as rx:
        a, b = _alerts(rx.port, dbs[0]), _alerts(rx.port, dbs[1])
        await a.start()
        await b.start()
        # queue_age is each node's own queue: each node alerts
        a.fire("queue_age", "queue", "oldest queued message is 130 min old")
        b.fire("queue_age", "queue", "oldest queued message is 130 min old")
        await wait_until(lambda: len(rx.posts) == 2, 10, "both nodes' queue_age")
        assert all("nodes" not in p for p in rx.posts)
        await a.close()
        await b.close()


async def test_while_the_database_is_down_a_node_notifies_alone(
        dbs: tuple[SharedDB, SharedDB], pg: Cluster) -> None:
    async with Receiver() as rx:
        a = _alerts(rx.port, dbs[0])
        await a.start()
        await asyncio.to_thread(pg.stop)
        try:
            a.fire("smarthost_down", "primary", "smarthost mx.example.com:587: connection refused")
            await wait_until(lambda: rx.posts, 10, "the notice")
            assert rx.posts[0]["nodes"] == ["relay-a"]
            a.clear("smarthost_down", "primary", "reachable again")
            await wait_until(lambda: len(rx.posts) == 2, 10, "the recovery")
            assert rx.posts[1]["state"] == "resolved"
        finally:
            await asyncio.to_thread(pg.start)
        await a.close()


async def test_two_relays_and_one_failing_smarthost_give_one_alert_and_one_recovery(
        tmp_path: Path, pg: Cluster, upstream: Upstreams) -> None:
    up = await upstream(replies={"greeting": "421 4.3.2 Service not available"})
    async with Receiver() as rx:
        nodes = await _fleet(tmp_path, pg, up, ["relay-a", "relay-b"],
                             alerts={"webhook": f"http://127.0.0.1:{rx.port}/hook"})
        a, b = nodes
        try:
            await asyncio.gather(a.send(_message(1, "x1@example.net"), rcpts=("x1@example.net",)),
                                 b.send(_message(2, "x2@example.net"), rcpts=("x2@example.net",)))
            await wait_until(lambda: all("alert: smarthost_down primary" in n.log() for n in nodes),
                             30, "both nodes to meet the outage")
            await wait_until(lambda: any("notified by another node of the fleet" in n.log()
                                         for n in nodes), 30, "one node to leave it to the other")
            await wait_until(lambda: rx.posts, 30, "the notice")
            assert len(rx.posts) == 1
            firing = rx.posts[0]
            assert (firing["event"], firing["key"], firing["state"]) == (
                "smarthost_down", "primary", "firing")
            assert firing["nodes"] and set(firing["nodes"]) <= {"relay-a", "relay-b"}

            up.replies = {}   # the smarthost is back: the next retry (1 s apart here) delivers
            await wait_until(lambda: len(up.messages) == 2, 30, "both messages delivered")
            await wait_until(lambda: len(rx.posts) == 2, 30, "the recovery")
            recovery = rx.posts[1]
            assert (recovery["event"], recovery["state"]) == ("smarthost_down", "resolved")
            assert sorted(recovery["nodes"]) == ["relay-a", "relay-b"]
            assert [p["state"] for p in rx.posts] == ["firing", "resolved"]
            assert pg.psql("SELECT count(*) FROM relayd_alerts") == "0"
        finally:
            await _stop(nodes)
