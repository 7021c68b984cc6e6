"""Alerts received by a local webhook receiver: once per outage, once on recovery."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl

import pytest
import trustme

from relayd.config.schema import AlertsConfig
from relayd.control.alerts import Alerts
from tests.support.clock import FakeClock


class Receiver:
    """A webhook endpoint on 127.0.0.1:0 recording each POSTed JSON body."""

    def __init__(self, status: int = 200, ssl_ctx: ssl.SSLContext | None = None) -> None:
        self.status = status
        self.ssl_ctx = ssl_ctx
        self.posts: list[dict] = []
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Receiver:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl_ctx)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.server
        self.server.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:"))
                     .split(b":")[1])
        body = await reader.readexactly(length)
        self.requests.append(head)
        self.posts.append(json.loads(body))
        writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()


async def test_one_alert_per_outage_and_one_recovery(clock: FakeClock) -> None:
    async with Receiver() as rx:
        alerts = Alerts(AlertsConfig(webhook=f"http://127.0.0.1:{rx.port}/hook?x=1"),
                        hostname="relay.example.com", clock=clock)
        await alerts.start()
        for _ in range(1000):  # every queued message hits the dead smarthost
            alerts.fire("smarthost_down", "primary", "connect to smtp.example.com:587: refused")
            clock.now += 1
        await alerts.wait_idle()
        assert len(rx.posts) == 1
        p = rx.posts[0]
        assert p["event"] == "smarthost_down" and p["key"] == "primary" and p["state"] == "firing"
        assert p["host"] == "relay.example.com" and p["repeat"] is False
        assert p["message"] == "connect to smtp.example.com:587: refused"
        assert p["time"].endswith("Z")
        assert "FIRING smarthost_down primary" in p["text"]
        assert rx.requests[0].startswith(b"POST /hook?x=1 HTTP/1.1\r\n")

        alerts.clear("smarthost_down", "primary", "delivered again")
        alerts.clear("smarthost_down", "primary", "delivered again")
        await alerts.wait_idle()
        assert [x["state"] for x in rx.posts] == ["firing", "resolved"]
        assert rx.posts[1]["since"] == p["since"]

        # A new outage is a new alert.
        alerts.fire("smarthost_down", "primary", "again")
        await alerts.wait_idle()
        assert len(rx.posts) == 3
        await alerts.close()


async def test_reminder_after_renotify_interval_and_per_key_dedupe(clock: FakeClock) -> None:
    async with Receiver() as rx:
        alerts = Alerts(AlertsConfig(webhook=f"http://127.0.0.1:{rx.port}/"),
                        hostname="h", clock=clock, renotify_after=3600)
        await alerts.start()
        alerts.fire("auth_failed", "primary", "535 5.7.8")
        alerts.fire("auth_failed", "backup", "535 5.7.8")   # another smarthost: its own alert
        clock.now += 3599
        alerts.fire("auth_failed", "primary", "535 5.7.8")
        clock.now += 2
        alerts.fire("auth_failed", "primary", "535 5.7.8")
        await alerts.wait_idle()
        assert [(x["key"], x["repeat"]) for x in rx.posts] == [
            ("primary", False), ("backup", False), ("primary", True)]
        await alerts.close()


async def test_only_configured_events() -> None:
    async with Receiver() as rx:
        alerts = Alerts(AlertsConfig(webhook=f"http://127.0.0.1:{rx.port}/",
                                     events=("daily_cap_reached",)), hostname="h")
        await alerts.start()
        alerts.fire("message_failed", "ABC", "550 no such user")
        alerts.fire("daily_cap_reached", "daily_cap", "10000 deliveries in 24 h")
        await alerts.wait_idle()
        assert [x["event"] for x in rx.posts] == ["daily_cap_reached"]
        await alerts.close()


async def test_queue_age_check() -> None:
    async with Receiver() as rx:
        alerts = Alerts(AlertsConfig(webhook=f"http://127.0.0.1:{rx.port}/", queue_age=7200),
                        hostname="h")
        await alerts.start()
        alerts.check_queue_age(60)
        alerts.check_queue_age(7300)
        alerts.check_queue_age(7400)
        alerts.check_queue_age(5)
        await alerts.wait_idle()
        assert [(x["event"], x["state"]) for x in rx.posts] == [("queue_age", "firing"),
                                                                  ("queue_age", "resolved")]
        await alerts.close()


async def test_webhook_failures_are_logged_never_raised(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="relayd.alerts")
    async with Receiver(status=500) as rx:
        alerts = Alerts(AlertsConfig(webhook=f"http://user:s3cret@127.0.0.1:{rx.port}/T0/secretpath"),
                        hostname="h")
        await alerts.start()
        alerts.fire("smarthost_down", "primary", "down")
        await alerts.wait_idle()
        assert len(rx.posts) == 1
        assert b"Authorization: Basic dXNlcjpzM2NyZXQ=" in rx.requests[0]
        port = rx.port
    # Receiver gone: connection refused.
    alerts.fire("auth_failed", "primary", "bad password")
    await alerts.wait_idle()
    await alerts.close()
    text = caplog.text
    assert "HTTP 500" in text
    assert f"alert webhook http://127.0.0.1:{port} failed" in text
    assert "s3cret" not in text and "secretpath" not in text


async def test_https_webhook_and_email_channel() -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    mails: list[tuple[bytes, str]] = []

    async def send_email(message: bytes, to: str) -> None:
        mails.append((message, to))

    async with Receiver(ssl_ctx=server_ctx) as rx:
        alerts = Alerts(AlertsConfig(webhook=f"https://127.0.0.1:{rx.port}/hook", email="ops@example.com"),
                        hostname="relay.example.com", send_email=send_email, ssl_context=client_ctx)
        await alerts.start()
        alerts.fire("token_refresh_failed", "m365", "invalid_grant: refresh token expired")
        await alerts.wait_idle()
        await alerts.close()
    assert rx.posts[0]["event"] == "token_refresh_failed"
    (message, to), = mails
    assert to == "ops@example.com"
    assert b"Subject: [relayd relay.example.com] FIRING: token_refresh_failed m365\r\n" in message
    assert b"Auto-Submitted: auto-generated" in message
    assert b"invalid_grant: refresh token expired" in message


async def test_email_failure_and_full_queue_do_not_raise() -> None:
    async def broken(message: bytes, to: str) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    alerts = Alerts(AlertsConfig(email="ops@example.com"), hostname="h", send_email=broken,
                    queue_size=2)
    for i in range(5):  # sender not started yet: the queue fills, the rest is dropped
        alerts.fire("message_failed", f"ID{i}", "550")
    assert alerts.dropped == 3
    await alerts.start()
    await alerts.wait_idle()
    assert alerts.sent == 0
    await alerts.close()


@pytest.mark.parametrize("events", [(), ("queue_age",)])
async def test_no_channel_configured_is_silent(events) -> None:
    alerts = Alerts(AlertsConfig(events=events), hostname="h")
    alerts.fire("queue_age", "queue", "old")
    await alerts.start()
    await alerts.wait_idle()
    await alerts.close()
    assert alerts.sent == 0


async def test_many_keys_of_one_event_are_capped_per_hour(clock: FakeClock) -> None:
    """500 messages failing for the same reason must not become 500 alerts."""
    async with Receiver() as rx:
        alerts = Alerts(AlertsConfig(webhook=f"http://127.0.0.1:{rx.port}/"), hostname="h",
                        clock=clock, event_burst=3, event_window=3600)
        await alerts.start()
        for i in range(500):
            alerts.fire("message_failed", f"ID{i}", "554 Message rejected: Email address is not verified")
        alerts.fire("smarthost_down", "primary", "other events have their own budget")
        await alerts.wait_idle()
        assert [x["key"] for x in rx.posts] == ["ID0", "ID1", "ID2", "primary"]
        clock.now += 3600
        alerts.fire("message_failed", "ID500", "554 again")
        await alerts.wait_idle()
        assert rx.posts[-1]["key"] == "ID500" and rx.posts[-1]["suppressed"] == 497
        assert "(+497 similar not sent)" in rx.posts[-1]["text"]
        # A condition whose firing was held back sends no recovery either.
        alerts.clear("message_failed", "ID400", "n/a")
        await alerts.wait_idle()
        assert len(rx.posts) == 5
        await alerts.close()
