"""Local faults under a running relayd: a full disk, a read-only spool, corrupt spool files,
wall-clock jumps and a configuration reload while deliveries are in flight.

The full and read-only disk tests run `relayd run` in its own user + mount namespace
(``unshare``) with a small tmpfs as the spool, so the kernel itself returns ENOSPC / EROFS:
no mocking of the write path. RELAYD_FAIL_AT=spool-write (relayd/faults.py) covers the same
code path on hosts without user namespaces (see test_injected_enospc_at_fsync).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import aiosmtplib
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relayd.config.load import load_config
from relayd.config.schema import Smarthost
from relayd.daemon.app import Daemon
from relayd.daemon.delivering import Delivering
from relayd.delivery.ports import Pool
from relayd.errors import SpoolError
from relayd.model import DeliveryResult, Envelope, Message, State
from relayd.spool.records import Entry
from relayd.spool.store import Spool
from tests.integration.test_alerts import Receiver
from tests.support.clock import JumpingClock
from tests.support.crashload import KillableRelay, message
from tests.support.operator import Operator
from tests.support.relay import (
    RunningRelay,
    free_port,
    running_relay,
    upstream_smarthost,
    wait_until,
    write_config,
)
from tests.support.smtpclient import RawClient
from tests.support.upstream import FakeUpstream

DOWN = {"greeting": "421 4.3.2 down for maintenance"}


async def send(port: int, data: bytes) -> tuple[int, str]:
    """(code, text) of the final reply to one message, 250 or the refusal."""
    try:
        _errors, reply = await aiosmtplib.send(data, sender="app@example.com", recipients=["user@example.net"],
                                              hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    return 250, reply


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


@pytest.mark.parametrize(("options", "size"), [("size=1m", 150_000), ("nr_inodes=40", 500)],
                         ids=["blocks", "inodes"])
async def test_disk_full_answers_451_stores_nothing_and_recovers_without_restart(
        tmp_path: Path, options: str, size: int) -> None:
    """T08/T10: out of blocks, or out of inodes (the create fails with ENOSPC too)."""
    async with FakeUpstream(replies=DOWN) as up:
        port = free_port()
        spool_dir = tmp_path / "spool"
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], port=port)
        relay = KillableRelay(cfg, port, tmp_path / "relayd.log", tmpfs=(spool_dir, options))
        await asyncio.to_thread(relay.start)
        try:
            accepted = []
            for n in range(40):  # the small tmpfs fills after a few
                code, text = await send(port, message(f"full{n}", size))
                if code != 250:
                    break
                accepted.append(f"full{n}")
            assert code == 451 and "4.3.0" in text, (code, text)
            assert 2 <= len(accepted) < 40
            inside = relay.inside(spool_dir)

            def files() -> dict[str, list[str]]:
                return {d: listing(inside / d) for d in ("tmp", "queued", "active")}

            # Nothing half-stored, and every accepted message in queued/ or active/. relayd keeps
            # trying the queued mail meanwhile: a message moves to active/ and back and its
            # metadata passes through tmp/, so listings taken one after the other can catch it
            # twice or not at all. Poll for one consistent picture (a timeout fails the test).
            def stored() -> bool:
                now = files()
                return now["tmp"] == [] and len(now["queued"]) + len(now["active"]) == len(accepted)
            await wait_until(stored, 10, lambda: f"nothing half-stored and the {len(accepted)} accepted "
                             f"in queued/ or active/: {files()}")
            # Still serving (and still refusing with a temporary code while the disk is full).
            assert (await send(port, message("still-full", size)))[0] == 451
            up.replies = {}  # the smarthost is back: deliveries free the space
            await wait_until(lambda: len(up.messages) >= len(accepted), timeout=20,
                             what=f"queued mail delivered; log: {relay.log()[-1500:]}")
            # Accepting again, without a restart.
            code, _ = await send(port, message("after", size))
            assert code == 250
            await wait_until(lambda: len(up.messages) == len(accepted) + 1, timeout=20, what="delivery")
            assert listing(inside / "tmp") == []
        finally:
            relay.stop()
    assert "not accepted, the spool failed" in relay.log()


async def test_injected_enospc_at_fsync(tmp_path: Path) -> None:
    """The portable variant: ENOSPC raised where delayed allocation reports it (before fsync)."""
    async with FakeUpstream() as up:
        port = free_port()
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], port=port)
        relay = KillableRelay(cfg, port, tmp_path / "relayd.log")
        await asyncio.to_thread(relay.start, 15.0, {"RELAYD_FAIL_AT": "spool-write@2"})
        try:
            assert (await send(port, message("first")))[0] == 250
            code, text = await send(port, message("second"))
            assert code == 451 and "4.3.0" in text
            await wait_until(lambda: len(up.messages) == 1, what="the first message delivered")
            assert listing(tmp_path / "spool" / "tmp") == []
            assert listing(tmp_path / "spool" / "queued") == []
        finally:
            relay.stop()


async def test_read_only_spool_answers_451_and_resumes_when_writable(tmp_path: Path) -> None:
    async with FakeUpstream(replies=DOWN) as up:
        port = free_port()
        spool_dir = tmp_path / "spool"
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], port=port)
        relay = KillableRelay(cfg, port, tmp_path / "relayd.log", tmpfs=(spool_dir, "size=4m"))
        await asyncio.to_thread(relay.start)
        try:
            for n in range(3):
                assert (await send(port, message(f"ro{n}")))[0] == 250
            # A read-only bind mount over the spool (a plain remount is "busy": relayd holds its
            # lock file open for writing): every path-based write now fails with EROFS.
            relay.in_namespace("sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"',
                               str(spool_dir))
            code, text = await send(port, message("refused"))
            assert code == 451 and "4.3.0" in text
            up.replies = {}  # deliveries are due now, but the spool cannot record them
            code, _ = await send(port, message("refused-again"))
            assert code == 451
            # The queue manager tries too (its smarthost pause is over) and cannot claim.
            await wait_until(lambda: relay.log().count("Read-only file system") >= 3, timeout=5,
                             what=f"a delivery attempt on the read-only spool; {relay.log()[-1500:]}")
            assert relay.running()
            relay.in_namespace("umount", str(spool_dir))  # writable again
            assert (await send(port, message("after")))[0] == 250
            await wait_until(lambda: len(up.messages) == 4, timeout=15,
                             what=f"every accepted message delivered; log: {relay.log()[-2000:]}")
        finally:
            relay.stop()
    got = sorted(m.data.split(b"X-Load-Id: ")[1].split(b"\r\n")[0] for m in up.messages)
    assert got == [b"after", b"ro0", b"ro1", b"ro2"]


async def gauge(port: int, name: str) -> float | None:
    """The value of the unlabelled gauge ``name`` on /metrics (None: no such series)."""
    text = (await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read())).decode()
    return next((s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                 if s.name == name), None)


@pytest.mark.parametrize("processes", ["0", "1"], ids=["split", "single"])
async def test_unwritable_spool_alerts_once_and_resolves_at_the_next_stored_message(
        tmp_path: Path, processes: str) -> None:
    """T12 (and T08/T11: every failed store takes this path): the 451s are not only logged.
    The accepting process reports the failed store to the alerts (over the notify pipe when
    split, a direct call in one process): one spool_unwritable notice per outage, naming the
    spool and the reason but no address, and one resolved notice at the next stored message."""
    async with Receiver() as rx, FakeUpstream() as up:
        port, metrics_port = free_port(), free_port()
        spool_dir = tmp_path / "spool"
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], port=port,
                           alerts={"webhook": f"http://127.0.0.1:{rx.port}/hook"},
                           metrics={"listen": f"127.0.0.1:{metrics_port}"})
        relay = KillableRelay(cfg, port, tmp_path / "relayd.log", tmpfs=(spool_dir, "size=4m"))
        await asyncio.to_thread(relay.start, 15.0, {"RELAYD_SINGLE_PROCESS": processes})
        try:
            assert (await send(port, message("before")))[0] == 250
            await wait_until(lambda: len(up.messages) == 1, timeout=15, what="the first delivery")
            assert await gauge(metrics_port, "relayd_spool_writable") == 1
            # Read-only, as in test_read_only_spool_answers_451_and_resumes_when_writable.
            relay.in_namespace("sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"',
                               str(spool_dir))
            code, text = await send(port, message("refused"))
            assert code == 451 and "4.3.0" in text
            await wait_until(lambda: rx.posts, timeout=15,
                             what=lambda: f"the spool_unwritable notice; log: {relay.log()[-2000:]}")
            (notice,) = rx.posts
            assert (notice["event"], notice["key"], notice["state"]) == \
                ("spool_unwritable", "spool", "firing"), notice
            assert str(spool_dir) in notice["message"] and "Read-only file system" in notice["message"]
            assert "@" not in notice["message"] and "refused" not in notice["message"]
            assert await gauge(metrics_port, "relayd_spool_writable") == 0
            assert (await send(port, message("refused-again")))[0] == 451
            relay.in_namespace("umount", str(spool_dir))  # writable again
            assert (await send(port, message("after")))[0] == 250
            await wait_until(lambda: len(rx.posts) >= 2, timeout=15,
                             what=lambda: f"the resolved notice; log: {relay.log()[-2000:]}")
            # The notices travel in order (one pipe, one queue): a notice for the second
            # refusal would have come before the recovery.
            assert [(p["event"], p["state"]) for p in rx.posts] == [
                ("spool_unwritable", "firing"), ("spool_unwritable", "resolved")]
            assert "accepts mail again" in rx.posts[1]["message"]
            assert rx.posts[1]["since"] == notice["since"]
            await wait_until(lambda: len(up.messages) == 2, timeout=15, what="the delivery after")
            assert await gauge(metrics_port, "relayd_spool_writable") == 1
        finally:
            relay.stop()
    got = [m.data.split(b"X-Load-Id: ")[1].split(b"\r\n")[0] for m in up.messages]
    assert got == [b"before", b"after"]
    log = relay.log()
    assert log.count("alert: spool_unwritable") == 1
    assert "stores mail again" in log


def test_requeue_puts_the_message_back_even_when_its_metadata_cannot_be_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.ensure_dirs()
    qid = spool.put(Message(Envelope("app@example.com", ("user@example.net",)), b"Subject: x\r\n\r\nb\r\n"))
    claimed = spool.claim(qid)
    assert claimed is not None

    def disk_full(queue_id: str, meta: object) -> None:
        raise SpoolError(f"cannot update {queue_id}: No space left on device")

    monkeypatch.setattr(spool, "write_meta", disk_full)
    with pytest.raises(SpoolError):
        spool.requeue(qid, claimed.entry.meta)
    assert spool.ids(State.QUEUED) == [qid] and spool.ids(State.ACTIVE) == []


async def test_corrupt_spool_files_are_set_aside_while_running_and_the_rest_delivered(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("relayd.delivery.qmgr.RESCAN_INTERVAL", 0.5)  # files that appear from outside
    async with FakeUpstream(replies=DOWN) as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")])
        async with running_relay(cfg) as relay:
            ids = [await relay.send(message(f"c{n}")) for n in range(3)]
        # A new daemon: nothing of these three is in memory any more (a just-accepted message
        # is delivered from the copy in memory, so damage to its file could not matter).
        async with running_relay(cfg) as relay:
            queued, held = tmp_path / "spool" / "queued", tmp_path / "spool" / "held"
            spool = relay.daemon.spool

            def held_now(qid: str) -> bool:  # hold it so no delivery attempt races the damage
                try:
                    spool.hold(qid)
                except SpoolError:
                    return False  # being delivered (deferred) right now: try again
                return True

            for qid in ids[:2]:
                await wait_until(lambda q=qid: held_now(q), what=f"{qid} held")
            (held / f"{ids[0]}.msg").write_bytes((held / f"{ids[0]}.msg").read_bytes()[:40])  # truncated
            raw = (held / f"{ids[1]}.msg").read_bytes()
            (held / f"{ids[1]}.msg").write_bytes(raw.replace(b'"envelope"', b'"envelope', 1))  # bad JSON
            (queued / "0123456789ABCDEF01.msg").write_bytes(b"\x00\xff garbage")  # not ours at all
            for qid in ids[:2]:
                spool.release(qid)  # back to queued/, damaged, while relayd runs
            up.replies = {}
            await wait_until(lambda: len(up.messages) == 1, what="the intact message delivered")
            await wait_until(lambda: len(listing(tmp_path / "spool" / "corrupt")) == 3, timeout=10,
                             what="the three bad files set aside")
            await wait_until(lambda: relay.daemon.delivery.qmgr.statistics().in_flight == 0
                             and listing(queued) == [] and listing(tmp_path / "spool" / "active") == [],
                             what="nothing left in delivery")
            assert (await relay.send(message("later"))) != ""  # still accepting
            await wait_until(lambda: len(up.messages) == 2, what="later delivered")
    assert b"X-Load-Id: c2" in up.messages[0].data
    assert sum("spool file set aside" in r.getMessage() for r in caplog.records) == 3


async def test_corrupt_files_found_at_start_are_set_aside_and_the_rest_delivered(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Damaged while relayd was stopped: the queue manager's first scan at start-up (not a
    second read before the listener binds) sets the bad files aside; the others go out."""
    async with FakeUpstream(replies=DOWN) as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")])
        async with running_relay(cfg) as relay:
            ids = [await relay.send(message(f"s{n}")) for n in range(3)]
        queued = tmp_path / "spool" / "queued"
        await wait_until(lambda: len(listing(queued)) == 3, what="three queued")
        (queued / f"{ids[0]}.msg").write_bytes((queued / f"{ids[0]}.msg").read_bytes()[:40])
        (queued / "0123456789ABCDEF01.msg").write_bytes(b"\x00\xff garbage")
        up.replies = {}
        async with running_relay(cfg):
            await wait_until(lambda: len(up.messages) == 2, what="the two intact messages")
            await wait_until(lambda: len(listing(tmp_path / "spool" / "corrupt")) == 2,
                             what="the two bad files set aside")
            await wait_until(lambda: listing(queued) == [], what="nothing left queued")
    assert sorted(m.data.split(b"X-Load-Id: ")[1].split(b"\r\n")[0] for m in up.messages) == [b"s1", b"s2"]
    assert sum("spool file set aside" in r.getMessage() for r in caplog.records) == 2


def invoice(name: str) -> bytes:
    return (b"From: app@example.com\r\nTo: user@example.net\r\nSubject: invoice %s\r\n"
            b"X-Load-Id: %s\r\n\r\nPay 100 EUR to account 12345\r\n" % (name.encode(), name.encode()))


def with_version(data: bytes, version: int) -> bytes:
    """The spool file ``data`` with its header's format version replaced (a newer relayd's)."""
    first, rest = data.split(b"\n", 1)
    n = int(first.rsplit(b" ", 1)[1])
    head = json.dumps({**json.loads(rest[:n]), "version": version}).encode()
    return b"RELAYD-SPOOL 1 %d\n%s\n%s" % (len(head), head, rest[n + 1:])


async def test_altered_and_newer_version_spool_files_are_set_aside_never_sent(tmp_path: Path) -> None:
    """T13 as the operator meets it: `relayd run` (two processes: the delivery process reads
    every message from its file), a message whose content lost a bit on disk (same length)
    and one with a newer relayd's format version. Neither goes upstream; both are set aside in
    corrupt/ with a log line naming them and why; `queue show` and `queue retry` say so; the
    intact message is delivered."""
    async with FakeUpstream(replies=DOWN) as up:
        op = Operator(tmp_path, [upstream_smarthost(up, tls="none")],
                      spool={"retry": {"initial": "1h", "max_interval": "2h"}})
        await op.start()
        try:
            ids = {name: await op.send(invoice(name)) for name in ("flipped", "newer", "intact")}
            flipped, newer, intact = ids["flipped"], ids["newer"], ids["intact"]
            spool = tmp_path / "spool"
            held, corrupt = spool / "held", spool / "corrupt"

            async def hold(qid: str) -> bool:  # fails while an attempt has it in active/
                return (await op.cli("queue", "hold", qid)).code == 0
            # Held, no delivery attempt can race the damage (the smarthost is down meanwhile).
            for qid in (flipped, newer):
                await wait_until(lambda q=qid: hold(q), what=f"{qid} held")
            raw = (held / f"{flipped}.msg").read_bytes()
            assert raw.count(b"12345") == 1
            damaged = {flipped: raw.replace(b"12345", b"02345"),  # one bit, same length
                       newer: with_version((held / f"{newer}.msg").read_bytes(), 9)}
            for qid, data in damaged.items():
                (held / f"{qid}.msg").write_bytes(data)
            assert len(damaged[flipped]) == len(raw)

            shown = await op.cli("queue", "show", flipped)
            assert shown.code == 1 and "Traceback" not in shown.err, shown
            assert shown.err.startswith(f"relayd: {flipped}: ") and "CRC-32" in shown.err, shown.err
            shown = await op.cli("queue", "show", newer)
            assert shown.code == 1 and "Traceback" not in shown.err, shown
            assert "unknown format version 9" in shown.err, shown.err
            # The header of the altered one is intact: listed as held until it is read in full.
            assert (await op.entry(flipped) or {}).get("state") == "held"

            for qid in (flipped, newer):
                assert (await op.cli("queue", "release", qid)).code == 0
            up.replies = {}  # the smarthost is back; `queue retry` lifts its pause
            retried = await op.cli("queue", "retry", flipped, intact)
            assert retried.code == 0, retried.err
            await wait_until(lambda: len(up.messages) == 1, timeout=20,
                             what=lambda: f"the intact message delivered; log: {op.log()[-2000:]}")
            await wait_until(lambda: len(listing(corrupt)) == 2, timeout=20,
                             what=lambda: f"both bad files set aside; log: {op.log()[-2000:]}")

            await op.wait_empty()  # the intact one leaves the spool just after its 250
            await op.wait_logged(intact)

            log = op.log()
            assert f"{flipped}: spool file set aside in {corrupt}: " in log
            assert "content does not match the CRC-32 in its header" in log.split(f"{flipped}: spool file set aside")[1]
            assert f"{newer}: spool file set aside in {corrupt}: " in log
            assert "unknown format version 9" in log.split(f"{newer}: spool file set aside")[1]
            # Set aside as they were: neither deleted nor rewritten.
            for qid, data in damaged.items():
                assert (corrupt / f"{qid}.msg").read_bytes() == data

            # Afterwards the commands say where the message went instead of "no message".
            for args in (("retry", flipped), ("show", newer)):
                after = await op.cli("queue", *args)
                assert after.code == 1 and f"{args[1]} was set aside in {corrupt}" in after.err, after
            for qid in (flipped, newer):
                assert not any("status=sent" in line for line in op.delivery_lines(qid))
        finally:
            assert await op.stop() == 0
    assert len(up.messages) == 1 and b"X-Load-Id: intact" in up.messages[0].data
    assert b"02345" not in up.messages[0].data


@pytest.mark.parametrize("jump_days", [5.0, -3.0])
async def test_wall_clock_jump_neither_expires_nor_strands_queued_mail(
        tmp_path: Path, jump_days: float, caplog: pytest.LogCaptureFixture) -> None:
    """+5 days (beyond spool.max_age of 4 days): no mass expiry from one jump. -3 days: retry
    times and smarthost pauses are not pushed three days out; mail flows once the smarthost
    is back."""
    clock = JumpingClock()
    async with FakeUpstream(replies=DOWN) as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")],
                           spool={"max_age": "4d", "retry": {"initial": "1s", "max_interval": "2s"}})
        async with running_relay(cfg, clock=clock) as relay:
            for n in range(3):
                await relay.send(message(f"j{n}"))
            await wait_until(lambda: up.connections >= 2, what="deferred attempts")
            clock.advance(jump_days * 86400)
            await wait_until(lambda: "the wall clock jumped" in caplog.text, what="the jump noticed")
            up.replies = {}
            await wait_until(lambda: len(up.messages) == 3, timeout=15,
                             what=f"delivery after a {jump_days:+} day jump")
            assert relay.daemon.spool.list(State.FAILED) == []


def waiting_for_the_cap(relay: RunningRelay, queue_id: str) -> Entry | None:
    """``queue_id``'s spool entry (what `queue list` shows) once it waits for the daily cap."""
    entry = next((e for e in relay.daemon.spool.list() if e.id == queue_id), None)
    return entry if entry is not None and "limits.daily_cap" in (entry.last_error or "") else None


async def cap_gauge_is(port: int, value: float) -> bool:
    """Whether /metrics says ``relayd_daily_cap_remaining`` is ``value`` (set by housekeeping)."""
    text = (await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read())).decode()
    return any(s.name == "relayd_daily_cap_remaining" and s.value == value
               for fam in text_string_to_metric_families(text) for s in fam.samples)


@pytest.mark.parametrize("jump_days", [5.0, -3.0])
async def test_wall_clock_jump_keeps_a_full_daily_cap_on_real_time(
        tmp_path: Path, jump_days: float, caplog: pytest.LogCaptureFixture) -> None:
    """T17/T18/T87: a full cap frees when the real window ends, whichever way the clock jumps.
    Set back 3 days, its deliveries would stay in the window 3 more days, and the mail waiting
    for it too; set forward 5 days, they would leave it at once: a second quota the same real
    day at the provider, which counts real time."""
    window = 6.0   # stands in for 24 h
    clock, port = JumpingClock(), free_port()
    async with FakeUpstream() as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], limits={"daily_cap": 1},
                           metrics={"listen": f"127.0.0.1:{port}"})
        async with running_relay(cfg, clock=clock, cap_window=window, housekeeping_interval=0.2) as relay:
            await relay.send(message("cap0"))
            await wait_until(lambda: len(up.messages) == 1, what="the first delivery fills the cap")
            filled = time.monotonic()
            second = await relay.send(message("cap1"))
            await wait_until(lambda: waiting_for_the_cap(relay, second), what="the second waits")
            clock.advance(jump_days * 86400)
            await wait_until(lambda: "retry times and daily caps follow it" in caplog.text,
                             what="the jump noticed")
            third = await relay.send(message("cap2"))
            entry = await wait_until(lambda: waiting_for_the_cap(relay, third),
                                     what=lambda: f"the third to wait too ({len(up.messages)} delivered)")
            # What the operator sees: no room, and the next attempt within the real window.
            assert len(up.messages) == 1
            assert entry.next_attempt is not None and entry.next_attempt - clock() <= window
            await wait_until(lambda: cap_gauge_is(port, 0), what="relayd_daily_cap_remaining 0")
            await wait_until(lambda: len(up.messages) == 2, timeout=window + 10,
                             what="one more delivery when the real window ends")
            assert time.monotonic() - filled >= window - 0.5
            # The two were due together: one went, the other waits for the cap full again. The
            # smarthost has the one that went before relayd reads its 250 and lets its spool
            # file go, which until then still says it waits for the cap: wait for that first.
            await wait_until(lambda: sum(e.id in (second, third) for e in relay.daemon.spool.list()) == 1,
                             what="the delivered one to leave the spool")
            assert [bool(waiting_for_the_cap(relay, q)) for q in (second, third)].count(True) == 1


class GatedPool:
    """Wraps a real smarthost pool; deliveries wait for ``gate`` (to hold them in flight)."""

    def __init__(self, real: Pool, gate: asyncio.Event, started: list[str]) -> None:
        self.real, self.gate, self.started = real, gate, started

    async def deliver(self, queue_id: str, content: bytes, mail_from: str, rcpts: Sequence[str],
                      *, smtputf8: bool = False) -> DeliveryResult:
        self.started.append(queue_id)
        await self.gate.wait()
        return await self.real.deliver(queue_id, content, mail_from, rcpts, smtputf8=smtputf8)

    def retry_now(self) -> None:
        self.real.retry_now()

    async def aclose(self) -> None:
        await self.real.aclose()


async def test_reload_while_deliveries_and_a_data_phase_are_in_flight(tmp_path: Path) -> None:
    """In-flight deliveries finish on the smarthost they started with (once each), the SMTP
    session that was sending DATA gets its 250, and later mail uses the new smarthost."""
    gate, started = asyncio.Event(), []
    holder: dict[str, Daemon[Delivering]] = {}
    def factory(sh: Smarthost) -> Pool:
        # The daemon's own pool builder (with the settings of the moment), wrapped in a gate.
        return GatedPool(holder["daemon"].delivery.make_pool(sh), gate, started)

    async with FakeUpstream() as old_up, FakeUpstream() as new_up:
        cfg = write_config(tmp_path, [upstream_smarthost(old_up, tls="none", max_connections=4)])
        async with running_relay(cfg, pool_factory=factory) as relay:
            holder["daemon"] = relay.daemon
            for n in range(3):
                await relay.send(message(f"old{n}"))
            await wait_until(lambda: len(started) == 3, what="three deliveries in flight")
            client = await RawClient.connect("127.0.0.1", relay.port)
            await client.reply()
            for line in ("EHLO app.example", "MAIL FROM:<app@example.com>", "RCPT TO:<user@example.net>"):
                await client.cmd(line)
            assert (await client.cmd("DATA"))[0] == 354
            await client.send(message("mid-data")[:60])
            # Reload: the smarthost is replaced (other host, other name).
            new_cfg = write_config(tmp_path, [upstream_smarthost(new_up, name="replacement", tls="none")])
            relay.daemon.reload(load_config(new_cfg))
            await client.send(message("mid-data")[60:] + b".\r\n")
            code, _ = await client.reply()
            assert code == 250
            await client.cmd("QUIT")
            await client.close()
            gate.set()
            await relay.send(message("new0"))
            await wait_until(lambda: len(old_up.messages) == 3 and len(new_up.messages) == 2,
                             what="the in-flight three on the old smarthost, the rest on the new")
            await wait_until(lambda: not relay.daemon.spool.list(), what="empty queue")
    ids = lambda up: sorted(m.data.split(b"X-Load-Id: ")[1].split(b"\r\n")[0] for m in up.messages)  # noqa: E731
    assert ids(old_up) == [b"old0", b"old1", b"old2"]
    assert ids(new_up) == [b"mid-data", b"new0"]
