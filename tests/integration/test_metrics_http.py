"""The /metrics endpoint scraped over a real socket and parsed as Prometheus does."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from relayd.control.metrics import Metrics
from relayd.control.metrics_http import MetricsServer
from relayd.model import State, Status
from relayd.units import HostPort
from tests.support.relay import write_config


async def _get(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_scrape_during_deliveries_deferrals_and_suppressions() -> None:
    m = Metrics()
    m.declare_smarthosts(["primary", "backup"])
    for _ in range(3):
        m.message_received()
    m.delivery("primary", Status.SENT, 0.4)
    m.delivery("primary", Status.SENT, 2.0)
    m.delivery("primary", Status.DEFERRED)
    m.suppressed(2)
    m.set_queue({State.QUEUED: 4, State.FAILED: 1}, oldest_age=125.0)
    m.set_daily_cap_remaining(9998)
    m.set_smarthost("primary", up=True, paused=False)
    m.set_smarthost("backup", up=False, paused=True)
    m.set_token_expiry("primary", 3000)
    async with MetricsServer(HostPort("127.0.0.1", 0), m.render) as srv:
        status, headers, body = await _get(srv.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == "HTTP/1.1 200 OK"
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert int(headers["Content-Length"]) == len(body)
        s = _samples(body.decode())
        assert s[("relayd_messages_received_total", ())] == 3
        assert s[("relayd_deliveries_total", (("smarthost", "primary"), ("status", "sent")))] == 2
        assert s[("relayd_deliveries_total", (("smarthost", "primary"), ("status", "deferred")))] == 1
        # Declared series exist at zero before anything happened on them.
        assert s[("relayd_deliveries_total", (("smarthost", "backup"), ("status", "failed")))] == 0
        assert s[("relayd_suppressed_total", ())] == 2
        assert s[("relayd_queue_messages", (("state", "queued"),))] == 4
        assert s[("relayd_queue_messages", (("state", "failed"),))] == 1
        assert s[("relayd_queue_oldest_age_seconds", ())] == 125
        assert s[("relayd_delivery_seconds_count", ())] == 2
        assert s[("relayd_delivery_seconds_bucket", (("le", "0.5"),))] == 1
        assert s[("relayd_daily_cap_remaining", ())] == 9998
        assert s[("relayd_smarthost_paused", (("smarthost", "backup"),))] == 1
        assert s[("relayd_oauth_token_expiry_seconds", (("smarthost", "primary"),))] == 3000
        # Labels never carry addresses.
        assert "@" not in body.decode()

        # A later scrape sees later events (rendered per request, not cached).
        m.delivery("primary", Status.FAILED)
        _, _, body = await _get(srv.port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert _samples(body.decode())[("relayd_deliveries_total", (("smarthost", "primary"), ("status", "failed")))] == 1


async def test_other_paths_and_methods() -> None:
    async with MetricsServer(HostPort("127.0.0.1", 0), Metrics().render) as srv:
        status, _, _ = await _get(srv.port, b"GET / HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 404 Not Found"
        status, headers, _ = await _get(srv.port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert status.startswith("HTTP/1.1 405") and headers["Allow"] == "GET, HEAD"
        status, headers, body = await _get(srv.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 200 OK" and body == b"" and int(headers["Content-Length"]) > 0
        status, _, _ = await _get(srv.port, b"garbage\r\n\r\n")
        assert status.startswith("HTTP/1.1 400")
        # A client that connects and sends nothing does not stop the server answering others.
        _idle_r, idle_w = await asyncio.open_connection("127.0.0.1", srv.port)
        status, _, _ = await _get(srv.port, b"GET /metrics?x=1 HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 200 OK"
    # Closing the server with that idle client still connected returns promptly.
    assert await asyncio.wait_for(_idle_r.read(), 5) == b""
    idle_w.close()


_LOADED = """
import sys
from pathlib import Path
from relayd.daemon.app import single_process, with_delivery_process
from relayd.config.load import load_config
cfg = load_config(Path(sys.argv[1]))
with_delivery_process(cfg, Path(sys.argv[1]))
single_process(cfg)
print("prometheus_client" in sys.modules)
"""


def test_the_prometheus_client_is_loaded_only_when_metrics_are_served(tmp_path: Path) -> None:
    """prometheus_client and what it imports cost the accepting process about 2 MB; without
    ``metrics.listen`` nothing could read the registry, so it is not loaded at all."""
    smarthost = {"name": "s", "host": "127.0.0.1", "port": 25, "tls": "none"}
    (tmp_path / "off").mkdir()
    (tmp_path / "on").mkdir()
    off = write_config(tmp_path / "off", [smarthost])
    on = write_config(tmp_path / "on", [smarthost], metrics={"listen": "127.0.0.1:9325"})
    root = Path(__file__).resolve().parents[2]
    for cfg, loaded in ((off, "False"), (on, "True")):
        out = subprocess.run([sys.executable, "-c", _LOADED, str(cfg)], capture_output=True,
                             text=True, cwd=root, timeout=60, check=True)
        assert out.stdout.strip() == loaded, (cfg, out.stderr)
