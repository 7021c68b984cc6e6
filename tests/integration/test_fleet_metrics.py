"""Each node's /metrics in a fleet: the node's name in relayd_node_info (not a label of the
other metrics), and relayd_daily_cap_remaining as the fleet's, refreshed by the housekeeping
also on a node that sends nothing. No address in any label."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

from relayd.control.metrics import Metrics
from tests.integration.test_fleet import _fleet, _message, _stop
from tests.support.postgres import Cluster
from tests.support.relay import free_port, listening
from tests.support.upstream import Upstreams
from tests.support.waiting import wait_until


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def _value(text: str, series: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[1])
    return None


def test_a_single_relay_has_no_node_series() -> None:
    assert "relayd_node_info" not in Metrics().render().decode()


async def test_each_node_names_itself_and_shows_the_fleets_cap_remaining(
        tmp_path: Path, pg: Cluster, upstream: Upstreams) -> None:
    up = await upstream()
    metrics_b = free_port()
    nodes = await _fleet(tmp_path, pg, up, ["relay-a", "relay-b"], limits={"daily_cap": 20})
    a = nodes[0]
    await nodes[1].stop()
    b_cfg = nodes[1].config
    b_cfg.write_text(b_cfg.read_text() + f"metrics:\n  listen: 127.0.0.1:{metrics_b}\n")
    await nodes[1].start()
    try:
        # start() returns once relayd greets on its SMTP listener; /metrics binds after it.
        await wait_until(lambda: listening(metrics_b), 10, "relay-b's /metrics")
        text = await asyncio.to_thread(_scrape, metrics_b)
        assert _value(text, 'relayd_node_info{node="relay-b"}') == 1.0
        assert "relay-a" not in text
        # every existing metric keeps its labels: no node label anywhere else
        assert all('node="' not in line for line in text.splitlines()
                   if not line.startswith("relayd_node_info"))

        # five recipients delivered through relay-a: relay-b, which sends nothing, sees the
        # fleet's cap go down from its housekeeping
        await asyncio.gather(*(a.send(_message(i, f"m{i}@example.net"), rcpts=(f"m{i}@example.net",))
                               for i in range(5)))
        await wait_until(lambda: len(up.messages) == 5, 20, "five deliveries through relay-a")

        async def fleet_remaining() -> bool:
            text = await asyncio.to_thread(_scrape, metrics_b)
            return _value(text, "relayd_daily_cap_remaining") == 15.0
        await wait_until(fleet_remaining, 30, "relay-b's gauge to show the fleet's 15 left",
                         interval=0.5)
        assert "example.net" not in await asyncio.to_thread(_scrape, metrics_b)
    finally:
        await _stop(nodes)
