"""What a sysadmin has in hand: a config file, `relayd run` as a process, the `relayd`
commands and the log. Tests built on this check only what a person sees (exit codes,
`queue list --json`, `queue show`, log lines), never relayd's objects.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import yaml

from tests.support.relay import ROOT, RelayProcess, free_port, write_config
from tests.support.waiting import wait_until

SPLIT = {"RELAYD_SINGLE_PROCESS": "0"}  # two processes, as on any machine with two CPUs
MESSAGE = b"From: app@example.com\r\nTo: user@example.net\r\nSubject: report\r\n\r\nbody\r\n"


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def run_cli(config: Path, *args: str, stdin: str = "") -> Result:
    """`relayd -c CONFIG ARGS…` as a separate process (blocking)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RELAYD_CONFIG", None)
    p = subprocess.run([sys.executable, "-m", "relayd", "-c", str(config), *args], input=stdin,
                       capture_output=True, text=True, env=env, timeout=120)
    return Result(p.returncode, p.stdout, p.stderr)


class Operator:
    """One relayd installation: its config file, its daemon and its commands."""

    def __init__(self, tmp_path: Path, smarthosts: list[dict[str, Any]], **extra: Any) -> None:
        self.port = free_port()
        self.config = write_config(tmp_path, smarthosts, port=self.port, **extra)
        self.relay = RelayProcess(self.config, self.port, tmp_path / "relayd.log", env=SPLIT)

    async def start(self) -> None:
        await asyncio.to_thread(self.relay.start)

    async def stop(self) -> int:
        return await asyncio.to_thread(self.relay.stop)

    async def cli(self, *args: str, stdin: str = "") -> Result:
        return await asyncio.to_thread(run_cli, self.config, *args, stdin=stdin)

    async def queue(self) -> list[dict[str, Any]]:
        result = await self.cli("queue", "list", "--json")
        assert result.code == 0, result.err
        rows: list[dict[str, Any]] = json.loads(result.out)
        return rows

    async def entry(self, qid: str) -> dict[str, Any] | None:
        return next((row for row in await self.queue() if row["id"] == qid), None)

    async def wait_entry(self, qid: str, what: str, cond: Any, timeout: float = 20.0) -> dict[str, Any]:
        """Poll `queue list --json` until the row of ``qid`` satisfies ``cond``."""
        found: dict[str, Any] = {}

        async def check() -> bool:
            row = await self.entry(qid)
            if row is not None and cond(row):
                found.update(row)
                return True
            return False
        await wait_until(check, timeout, what, interval=0.1)
        return found

    async def send(self, data: bytes = MESSAGE, sender: str = "app@example.com",
                   rcpts: tuple[str, ...] = ("user@example.net",)) -> str:
        """Submit one message over SMTP; the queue ID from the 250 reply."""
        _errors, reply = await aiosmtplib.send(data, sender=sender, recipients=list(rcpts),
                                              hostname="127.0.0.1", port=self.port,
                                              start_tls=False, use_tls=False, timeout=10)
        return reply.rsplit(" ", 1)[-1]

    async def wait_empty(self, timeout: float = 20.0) -> None:
        """Poll `queue list --json` until it is empty (a delivered message's file goes just
        after its log line)."""
        async def empty() -> bool:
            return await self.queue() == []
        await wait_until(empty, timeout, "an empty queue", interval=0.1)

    async def wait_logged(self, qid: str, status: str = "sent", timeout: float = 20.0) -> str:
        """Wait for a ``status=STATUS`` delivery line of ``qid`` (written once the smarthost's
        reply is read, so after the smarthost has the message); returns the latest such line."""
        def line() -> str | None:
            found = [ln for ln in self.delivery_lines(qid) if f"status={status}" in ln]
            return found[-1] if found else None
        return await wait_until(line, timeout, f"the status={status} line of {qid}")

    def log(self) -> str:
        return self.relay.log()

    def delivery_lines(self, qid: str) -> list[str]:
        """The Postfix-shaped `ID: to=<…>, …, attempts=N, …, status=…` lines of ``qid``."""
        return [line for line in self.log().splitlines() if f"{qid}: to=<" in line]

    def delivery_process(self) -> int:
        """The pid of the current delivery process, as `relayd run` logged it."""
        pids = re.findall(r"delivery process started \(pid (\d+)\)", self.log())
        assert pids, "no delivery process was started"
        return int(pids[-1])

    def write(self, text: str) -> None:
        self.config.write_text(text)

    async def reload(self, edit: Callable[[dict[str, Any]], object]) -> None:
        """What an operator does to change a setting: edit the file (``edit`` changes the
        parsed YAML in place), SIGHUP, and wait for relayd to log that it took it."""
        data = yaml.safe_load(self.config.read_text())
        edit(data)
        self.write(yaml.safe_dump(data))
        before = self.log().count("configuration reloaded")
        self.relay.signal(signal.SIGHUP)
        await wait_until(lambda: self.log().count("configuration reloaded") > before, 20,
                         lambda: f"the reload; log:\n{self.log()}")


__all__ = ["MESSAGE", "SPLIT", "Operator", "Result", "run_cli", "wait_until"]
