"""sd_notify and socket activation observed through real sockets, as systemd would see them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

from relayd.daemon.sdnotify import Notifier, listen_fd_names, listen_fds, run_watchdog
from tests.support.ops_activation import spawn_socket_activated

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def notify_socket(tmp_path: Path):
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield str(path), sock
    sock.close()


def _recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_status_reload_stopping_reach_the_manager(notify_socket) -> None:
    path, sock = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("queue: 0 queued")
    assert _recv(sock) == ["READY=1", "STATUS=queue: 0 queued"]
    assert n.reloading()
    fields = _recv(sock)
    assert fields[0] == "RELOADING=1"
    # systemd >= 253 ignores RELOADING=1 without a CLOCK_MONOTONIC timestamp.
    key, value = fields[1].split("=")
    assert key == "MONOTONIC_USEC"
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 < now - int(value) < 5_000_000
    n.ready()
    assert _recv(sock) == ["READY=1"]
    n.status("queue: 3 queued\nbroken")
    assert _recv(sock) == ["STATUS=queue: 3 queued broken"]  # one line, never a forged field
    n.stopping()
    assert _recv(sock) == ["STOPPING=1"]
    n.close()


def test_abstract_namespace_socket() -> None:
    name = f"relayd-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert _recv(sock) == ["READY=1"]
        n.close()
    finally:
        sock.close()


def test_watchdog_at_half_the_interval_and_only_for_our_pid(notify_socket) -> None:
    path, sock = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"})
    assert n.watchdog_interval() == 15.0
    assert n.watchdog()
    assert _recv(sock) == ["WATCHDOG=1"]
    mine = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000",
                              "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval() == 2.0
    other = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000",
                               "WATCHDOG_PID": "1"})
    assert other.watchdog_interval() is None
    assert not other.watchdog()
    for x in (n, mine, other):
        x.close()


def test_no_op_outside_systemd() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog_interval() is None


def test_unreachable_socket_never_raises(tmp_path: Path) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.ready() is False
    n.close()


def test_listen_fds_ignores_other_pids_and_unsets_variables() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "smtp"}
    assert listen_fd_names(env) == ["smtp"]
    assert listen_fds(env) == []
    assert env == {}


def test_socket_activated_process_serves_on_the_passed_socket() -> None:
    """A child started like systemd starts relayd: listening socket on fd 3, LISTEN_PID = its pid."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    child = textwrap.dedent("""
        import os, sys
        sys.path.insert(0, sys.argv[1])
        from relayd.daemon.sdnotify import listen_fds, listen_fd_names
        names = listen_fd_names()
        socks = listen_fds()
        left = [k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ]
        s = socks[0]
        s.setblocking(True)
        conn, _ = s.accept()
        conn.sendall(f"{len(socks)} {s.fileno()} {names} {left}".encode())
        conn.close()
    """)
    proc = spawn_socket_activated([sys.executable, "-c", child, str(ROOT)], listener)
    listener.close()  # only the child holds the listening socket now
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.settimeout(10)
            data = b""
            while chunk := c.recv(1024):
                data += chunk
        assert data.decode() == "1 3 ['smtp'] []"
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


async def test_run_watchdog_keeps_sending_until_cancelled(notify_socket) -> None:
    path, sock = notify_socket
    sock.setblocking(False)
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})  # every 10 ms
    task = asyncio.create_task(run_watchdog(n))
    loop = asyncio.get_running_loop()
    got = [await asyncio.wait_for(loop.sock_recv(sock, 100), 5) for _ in range(3)]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert got == [b"WATCHDOG=1"] * 3
    # Disabled watchdog: the task ends by itself.
    await asyncio.wait_for(run_watchdog(Notifier.from_env({"NOTIFY_SOCKET": path})), 1)
    n.close()
