"""`relayd run` as systemd starts it: a socket passed on fd 3 (LISTEN_FDS) instead of binding
`listen`, READY=1 / STATUS= / RELOADING=1 on a real NOTIFY_SOCKET, clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiosmtplib

from tests.support.ops_activation import spawn_socket_activated
from tests.support.relay import ROOT, free_port, running_relay, upstream_smarthost, wait_until, write_config
from tests.support.upstream import FakeUpstream
from tests.support.waiting import wait_until_sync


def read_notifications(sock: socket.socket, want: str, timeout: float = 15.0) -> list[str]:
    """Datagrams received until one contains ``want`` (or the deadline)."""
    got: list[str] = []
    sock.settimeout(0.05)

    def arrived() -> bool:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            return False
        return want in got[-1]
    wait_until_sync(arrived, timeout, lambda: f"{want!r} from relayd; got {got}", interval=0)
    return got


async def test_socket_activated_relayd_with_notify_socket(tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = str(tmp_path / "notify.sock")
    notify.bind(notify_path)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    async with FakeUpstream() as up:
        # `listen` names a different, unused port: with LISTEN_FDS relayd must not bind it.
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], port=free_port())
        env = dict(os.environ, PYTHONPATH=str(ROOT), RELAYD_CONFIG=str(cfg), NOTIFY_SOCKET=notify_path)
        log = open(tmp_path / "relayd.log", "wb")  # noqa: SIM115
        proc = spawn_socket_activated([sys.executable, "-m", "relayd", "run"], listener, env=env,
                                      stdout=log, stderr=log)
        listener.close()
        try:
            ready = await asyncio.to_thread(read_notifications, notify, "READY=1")
            _errors, reply = await aiosmtplib.send(b"Subject: activated\r\n\r\nx\r\n", sender="app@example.com",
                                                   recipients=["user@example.net"], hostname="127.0.0.1",
                                                   port=port, start_tls=False, timeout=10)
            assert reply.startswith("2.0.0 Ok: queued as")
            await wait_until(lambda: len(up.messages) == 1, what="delivery")
            proc.send_signal(signal.SIGHUP)
            reload = await asyncio.to_thread(read_notifications, notify, "READY=1")
            assert any("RELOADING=1" in n and "MONOTONIC_USEC=" in n for n in reload)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
            notify.close()
    assert any("READY=1" in n for n in ready)


async def test_rate_limit_paces_deliveries(tmp_path: Path) -> None:
    async with FakeUpstream() as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], limits={"rate": "4/s"})
        async with running_relay(cfg) as relay:
            start = time.monotonic()
            await asyncio.gather(*(relay.send(b"Subject: r\r\n\r\nx\r\n", rcpts=(f"r{n}@example.net",))
                                   for n in range(12)))
            await wait_until(lambda: len(up.messages) == 12, timeout=20, what="all deliveries")
            elapsed = time.monotonic() - start
    # A burst of one second's worth (4), then 4 a second: 12 recipients need about 2 s more.
    assert elapsed >= 1.5, f"12 deliveries at 4/s took only {elapsed:.2f}s"
