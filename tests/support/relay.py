"""Runs a real relayd daemon (in-process ``Daemon.serve`` or a ``relayd run`` subprocess)
from a real config file, for integration tests. Readiness comes from the daemon's on_ready
hook (in-process) or from polling the port with a deadline (subprocess), never from sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from relayd.config.load import load_config
from relayd.config.schema import Config
from relayd.daemon.app import Daemon, single_process
from relayd.daemon.delivering import Delivering
from tests.support.config_builder import ConfigBuilder
from tests.support.ports import free_port as free_port  # re-exported for the tests
from tests.support.smtpclient import smtp_greets
from tests.support.waiting import wait_until as wait_until  # re-exported for the tests
from tests.support.waiting import wait_until_sync

ROOT = Path(__file__).resolve().parents[2]


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port`` now (an HTTP endpoint
    relayd opens after it starts)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def write_config(path: Path, smarthosts: list[dict[str, Any]], **extra: Any) -> Path:
    """Write ``path``/relayd.yaml with the test defaults (``ConfigBuilder(path).write``)."""
    return ConfigBuilder(path).write(smarthosts, **extra)


def upstream_smarthost(up: Any, name: str = "primary", **kw: Any) -> dict[str, Any]:
    """A config entry for a FakeUpstream."""
    entry: dict[str, Any] = {"name": name, "host": up.host, "port": up.port, "tls": up.tls,
                             "timeout": "2s", "max_connections": 2}
    if up.ca_file is not None:
        entry["ca_file"] = str(up.ca_file)
    entry.update(kw)
    return entry


def wait_for_greeting(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """Poll 127.0.0.1:``port`` until relayd greets with 220 (True) or ``proc`` exits (False);
    AssertionError after ``timeout`` seconds."""
    def settled() -> str | None:
        if proc.poll() is not None:
            return "exited"
        return "greeted" if smtp_greets(port) else None
    return wait_until_sync(settled, timeout, f"relayd to listen on port {port}") == "greeted"


class RunningRelay:
    def __init__(self, daemon: Daemon[Delivering], port: int, config_path: Path) -> None:
        self.daemon = daemon
        self.port = port
        self.config_path = config_path

    @property
    def config(self) -> Config:
        return self.daemon.config

    async def send(self, data: bytes, sender: str = "app@example.com",
                   rcpts: tuple[str, ...] = ("user@example.net",)) -> str:
        """Submit one message over SMTP; returns the queue ID from the 250 reply."""
        import aiosmtplib

        _errors, reply = await aiosmtplib.send(data, sender=sender, recipients=list(rcpts),
                                              hostname="127.0.0.1", port=self.port, start_tls=False,
                                              use_tls=False, timeout=10)
        return reply.rsplit(" ", 1)[-1]


@contextlib.asynccontextmanager
async def running_relay(config_path: Path, **daemon_kw: Any) -> AsyncIterator[RunningRelay]:
    """An in-process daemon serving ``config_path``."""
    cfg = load_config(config_path)
    daemon = single_process(cfg, **daemon_kw)
    ready: asyncio.Future[list[tuple[str, int]]] = asyncio.get_running_loop().create_future()
    daemon.hooks.on_ready = ready.set_result
    task = asyncio.create_task(daemon.serve())
    done, _ = await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    addrs = await ready
    try:
        yield RunningRelay(daemon, addrs[0][1], config_path)
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 30)


class RelayProcess:
    """``relayd run`` as a child process (for kill -9, SIGHUP and SIGTERM tests)."""

    def __init__(self, config_path: Path, port: int, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.port = port
        self.log_path = log_path
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), RELAYD_CONFIG=str(self.config_path), **self.env)
        env.pop("NOTIFY_SOCKET", None)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen([sys.executable, "-m", "relayd", "run"], env=env,
                                     stdout=log, stderr=log)
        log.close()
        if not wait_for_greeting(self.proc, self.port, timeout):
            raise AssertionError(f"relayd exited with {self.proc.returncode}: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)
