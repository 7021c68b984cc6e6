"""`relayd run` as a real process: kill -9 loses no accepted mail, SIGHUP applies corrected
settings to queued mail (and refuses an invalid file), SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiosmtplib

from tests.support.relay import RelayProcess, free_port, upstream_smarthost, wait_until, write_config
from tests.support.upstream import FakeUpstream

MSG = b"From: app@example.com\r\nTo: user@example.net\r\nSubject: crash test %d\r\n\r\nbody %d\r\n"


async def submit(port: int, n: int) -> None:
    _errors, reply = await aiosmtplib.send(MSG % (n, n), sender="app@example.com",
                                          recipients=[f"user{n}@example.net"], hostname="127.0.0.1",
                                          port=port, start_tls=False, timeout=10)
    assert reply.startswith("2.0.0 Ok: queued as"), reply


async def test_kill_9_with_queued_mail_then_everything_arrives(tmp_path: Path) -> None:
    async with FakeUpstream(replies={"greeting": "421 4.3.2 down for maintenance"}) as up:
        port = free_port()
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], port=port)
        proc = RelayProcess(cfg, port, tmp_path / "relayd.log")
        await asyncio.to_thread(proc.start)
        await asyncio.gather(*(submit(port, n) for n in range(20)))
        proc.kill9()  # no clean shutdown: whatever got 250 must be on disk
        up.replies = {}  # the provider is back
        await asyncio.to_thread(proc.start)
        try:
            await wait_until(lambda: len({m.rcpt_tos[0] for m in up.messages}) == 20, timeout=30,
                             what=f"all 20 messages after the crash; log: {proc.log()[-2000:]}")
        finally:
            assert proc.stop() == 0
    subjects = {m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in up.messages}
    assert subjects == {b"crash test %d" % n for n in range(20)}


async def test_sighup_applies_corrected_credentials_to_queued_mail(tmp_path: Path) -> None:
    async with FakeUpstream(auth=("PLAIN", "LOGIN"), credentials={"relay": "right-password"},
                            require_auth=True) as up:
        port = free_port()
        entry = upstream_smarthost(up, tls="none", auth={"method": "plain", "username": "relay",
                                                         "password": "wrong-password"})
        cfg = write_config(tmp_path, [entry], port=port)
        proc = RelayProcess(cfg, port, tmp_path / "relayd.log")
        await asyncio.to_thread(proc.start)
        try:
            await submit(port, 1)
            await wait_until(lambda: any(not a.ok for a in up.auth_attempts), what="failed login")
            assert up.messages == []
            # An invalid file on SIGHUP is refused with the check-config lines; the old one stays.
            good_text = cfg.read_text()
            cfg.write_text(good_text.replace("port: " + str(up.port), "port: 70000"))
            proc.signal(signal.SIGHUP)
            await wait_until(lambda: "must be between 1 and 65535 (got 70000)" in proc.log(),
                             what="reload refusal in the log")
            assert "smarthosts[0].port: must be between 1 and 65535 (got 70000)" in proc.log()
            cfg.write_text(good_text.replace("wrong-password", "right-password"))
            proc.signal(signal.SIGHUP)
            await wait_until(lambda: len(up.messages) == 1, timeout=20,
                             what=f"delivery after reload; log: {proc.log()[-1500:]}")
        finally:
            assert proc.stop() == 0  # SIGTERM: clean exit 0
    log = proc.log()
    assert "right-password" not in log and "wrong-password" not in log
    assert "status=sent" in log


async def test_second_relayd_on_the_same_spool_refuses_to_start(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, [{"name": "preview", "outbox": str(tmp_path / "out")}], port=port)
    first = RelayProcess(cfg, port, tmp_path / "first.log")
    await asyncio.to_thread(first.start)
    try:
        (tmp_path / "other").mkdir()
        other_cfg = write_config(tmp_path / "other", [{"name": "preview", "outbox": str(tmp_path / "out")}],
                                 port=free_port(), spool={"path": str(tmp_path / "spool")})
        second = RelayProcess(other_cfg, 0, tmp_path / "second.log")
        try:
            await asyncio.to_thread(second.start, 10.0)
        except AssertionError as exc:
            assert "another relayd is already running" in str(exc)
        else:
            raise AssertionError("a second relayd started on a locked spool")
    finally:
        assert first.stop() == 0
