"""`relayd run` as two processes (relayd/daemon/child.py): the delivery process delivers what the
accepting one stores, its metrics reach /metrics, it is restarted when it dies, it dies with
its parent, and RELAYD_SINGLE_PROCESS=1 keeps one process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import aiosmtplib
from prometheus_client.parser import text_string_to_metric_families

from relayd.daemon.child import split_enabled
from relayd.daemon.pipe import DeliverArgs, child_argv, config_line, from_argv
from tests.support.relay import RelayProcess, free_port, upstream_smarthost, wait_until, write_config
from tests.support.upstream import FakeUpstream

# Two processes whatever the machine's CPU count (the default needs a second CPU).
SPLIT = {"RELAYD_SINGLE_PROCESS": "0"}

STARTED = re.compile(r"delivery process started \(pid (\d+)\)")


async def submit(port: int, n: int) -> None:
    msg = b"From: app@example.com\r\nSubject: split %d\r\n\r\nbody\r\n" % n
    _errors, reply = await aiosmtplib.send(msg, sender="app@example.com",
                                          recipients=[f"user{n}@example.net"], hostname="127.0.0.1",
                                          port=port, start_tls=False, timeout=10)
    assert reply.startswith("2.0.0 Ok: queued as"), reply


def children(proc: RelayProcess) -> list[int]:
    return [int(p) for p in STARTED.findall(proc.log())]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def delivered(up: FakeUpstream) -> set[str]:
    return {m.rcpt_tos[0] for m in up.messages}


async def test_delivery_process_delivers_reports_metrics_and_is_restarted(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    async with FakeUpstream() as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], port=port,
                           metrics={"listen": f"127.0.0.1:{metrics_port}"})
        proc = RelayProcess(cfg, port, tmp_path / "relayd.log", env=SPLIT)
        await asyncio.to_thread(proc.start)
        try:
            await wait_until(lambda: len(children(proc)) == 1, what="the delivery process")
            first = children(proc)[0]
            assert first != proc.proc.pid and alive(first)  # type: ignore[union-attr]
            with open(f"/proc/{first}/cmdline", "rb") as f:
                assert b"_deliver" in f.read()
            await asyncio.gather(*(submit(port, n) for n in range(5)))
            await wait_until(lambda: len(delivered(up)) == 5, what="5 deliveries")

            # What the delivery process counted is on the accepting process's /metrics.
            async def sent() -> float:
                text = await asyncio.to_thread(lambda: urllib.request.urlopen(
                    f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode())
                samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                           for fam in text_string_to_metric_families(text) for s in fam.samples}
                assert samples[("relayd_smarthost_up", (("smarthost", "primary"),))] == 1
                return samples[("relayd_deliveries_total", (("smarthost", "primary"), ("status", "sent")))]
            async def all_counted() -> bool:
                return await sent() == 5
            await wait_until(all_counted, 5, "5 sent deliveries on /metrics", interval=0.1)
            assert await sent() == 5

            os.kill(first, signal.SIGKILL)
            await wait_until(lambda: len(children(proc)) == 2, timeout=15, what="a new delivery process")
            assert "the delivery process exited unexpectedly" in proc.log()
            await asyncio.gather(*(submit(port, n) for n in range(5, 10)))
            await wait_until(lambda: len(delivered(up)) == 10, what="10 deliveries after the restart")
        finally:
            assert proc.stop() == 0
        assert not alive(children(proc)[-1])  # SIGTERM stopped the delivery process too
    assert len(up.messages) == 10  # nothing was in flight when it was killed: no duplicates


async def test_kill_9_of_relayd_run_takes_its_delivery_process_along(tmp_path: Path) -> None:
    port = free_port()
    async with FakeUpstream(replies={"greeting": "421 4.3.2 down for maintenance"}) as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], port=port)
        proc = RelayProcess(cfg, port, tmp_path / "relayd.log", env=SPLIT)
        await asyncio.to_thread(proc.start)
        await wait_until(lambda: len(children(proc)) == 1, what="the delivery process")
        child = children(proc)[0]
        await asyncio.gather(*(submit(port, n) for n in range(5)))
        proc.kill9()
        # It must not go on delivering beside the relayd run that replaces this one.
        await wait_until(lambda: not alive(child), timeout=5, what="the orphaned delivery process to exit")
        up.replies = {}
        await asyncio.to_thread(proc.start)  # the spool lock is free again
        try:
            await wait_until(lambda: len(delivered(up)) == 5, timeout=30, what="all 5 after the restart")
        finally:
            assert proc.stop() == 0


async def test_without_keys_neither_process_loads_cryptography(tmp_path: Path) -> None:
    """cryptography's native module is ~5 MB of memory per process. Without an ``enc:`` value
    or OAuth it stays out of both processes, also after deliveries (the delivery process
    used to import it with the OAuth module whenever it built a smarthost pool). Likewise
    SQLite (~1.5 MB each) while there is no do-not-email list and no ``limits.daily_cap``."""
    port = free_port()
    async with FakeUpstream() as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], port=port)
        proc = RelayProcess(cfg, port, tmp_path / "relayd.log", env=SPLIT)
        await asyncio.to_thread(proc.start)
        try:
            await wait_until(lambda: len(children(proc)) == 1, what="the delivery process")
            await asyncio.gather(*(submit(port, n) for n in range(3)))
            await wait_until(lambda: len(delivered(up)) == 3, what="three deliveries")
            assert proc.proc is not None
            for pid in (proc.proc.pid, children(proc)[0]):
                maps = Path(f"/proc/{pid}/maps").read_text()
                assert "libpython" in maps or "python" in maps  # the right process
                assert "_rust.abi3" not in maps, f"pid {pid} loaded cryptography"
                assert "libsqlite3" not in maps, f"pid {pid} loaded SQLite"
                # and PostgreSQL's driver without shared_state
                assert "libpq" not in maps and "psycopg" not in maps, f"pid {pid} loaded psycopg"
            assert (tmp_path / "state" / "suppressions.sqlite3").stat().st_size == 0
        finally:
            assert proc.stop() == 0


def test_the_delivery_process_command_line_is_read_back_without_the_cli() -> None:
    """relayd/__main__.py recognises the child's own command line and skips argparse (about
    1 MB the long-running child would keep); any other spelling goes to the CLI as before."""
    args = DeliverArgs(Path("/etc/relayd/relayd.yaml"), 5, 7)
    argv = child_argv(args)
    assert argv[2] == "_deliver"  # what ps shows, as docs/operations.md says
    assert from_argv(argv) == args
    assert from_argv(["-c", "x.yaml", "queue", "list"]) is None
    assert from_argv(["_deliver", "--notify-fd", "5", "--events-fd", "7"]) is None
    assert from_argv(["-c", "x.yaml", "_deliver", "--notify-fd", "five", "--events-fd", "7"]) is None
    assert from_argv(["-c", "x.yaml", "_deliver", "--events-fd", "7", "--notify-fd", "5"]) is None


def _child(tmp_path: Path, notify: bytes) -> subprocess.CompletedProcess[str]:
    """The delivery process started by hand, its notify pipe holding ``notify`` then EOF."""
    cfg = tmp_path / "relayd.yaml"
    cfg.write_text("listen: [unclosed\n")  # never read: the child takes the text from the pipe
    root = Path(__file__).resolve().parents[2]
    notify_r, notify_w = os.pipe()
    os.write(notify_w, notify)
    os.close(notify_w)
    try:
        return subprocess.run([sys.executable, "-m", "relayd", *child_argv(DeliverArgs(cfg, notify_r, 1))],
                              capture_output=True, text=True, cwd=root, timeout=60,
                              pass_fds=(notify_r,))
    finally:
        os.close(notify_r)


def test_a_delivery_process_given_an_invalid_config_reports_it_like_the_cli(tmp_path: Path) -> None:
    """The child runs the text relayd run accepted. If that text no longer loads (a file it
    names changed in between), the child says what is wrong and exits 78 (EX_CONFIG), as every
    other command does."""
    out = _child(tmp_path, config_line("spool: {path: /nonexistent, retry: {initial: soon}}\n"))
    assert out.returncode == 78
    assert f"invalid config {tmp_path / 'relayd.yaml'}" in out.stderr
    assert "spool.retry.initial" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_delivery_process_never_reads_the_config_file(tmp_path: Path) -> None:
    """Started without a config line (not by relayd run), it refuses instead of reading the
    file, which may hold settings relayd run refused."""
    out = _child(tmp_path, b"")
    assert out.returncode == 1
    assert "started by 'relayd run' only" in out.stderr
    assert "invalid YAML" not in out.stderr and "Traceback" not in out.stderr


def test_the_environment_switch() -> None:
    assert not split_enabled({"RELAYD_SINGLE_PROCESS": "1"})
    assert split_enabled({"RELAYD_SINGLE_PROCESS": "0"})
    assert split_enabled({}) == ((os.cpu_count() or 1) >= 2)


async def test_single_process_when_the_environment_asks(tmp_path: Path) -> None:
    port = free_port()
    async with FakeUpstream() as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], port=port)
        proc = RelayProcess(cfg, port, tmp_path / "relayd.log", env={"RELAYD_SINGLE_PROCESS": "1"})
        await asyncio.to_thread(proc.start)
        try:
            await submit(port, 1)
            await wait_until(lambda: len(up.messages) == 1, what="the delivery")
        finally:
            assert proc.stop() == 0
        assert children(proc) == []
