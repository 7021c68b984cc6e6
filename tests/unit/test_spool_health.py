"""The spool_unwritable alert's pieces: the intake's report (a failed store, then the first
store that succeeds again), its line on the notify pipe, the alert itself and its default."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from relayd.config.load import parse_config
from relayd.config.schema import ALERT_EVENTS, AlertsConfig
from relayd.control.alerts import Alerts
from relayd.control.metrics import Metrics, Recorder
from relayd.daemon.pipe import config_line, parse_config_line, parse_spool_line, spool_line
from relayd.errors import SpoolError
from relayd.model import Envelope, Message
from relayd.policy.acceptance import Accepted
from relayd.policy.records import PipelineResult
from relayd.smtpd.intake import Intake
from relayd.spool.health import SpoolHealth
from relayd.spool.records import new_queue_id
from relayd.spool.store import Spool

MINIMAL = "smarthosts:\n  - {host: smtp.example.com}\n"


# -- the notify pipe ----------------------------------------------------------------------------
@pytest.mark.parametrize("health", [
    SpoolHealth(False, "/var/spool/relayd", "No space left on device"),
    SpoolHealth(False, "/srv/my spool/é", "Read-only file system"),
    SpoolHealth(True, "/var/spool/relayd"),
])
def test_spool_line_round_trip(health: SpoolHealth) -> None:
    line = spool_line(health)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_spool_line(line[:-1]) == health


@pytest.mark.parametrize("line", [
    b"0193A4F2C1D5E7A3B9 1",                      # a queue ID line
    config_line("smarthosts: []\n")[:-1],          # the config line
    b"spool 2 L3Zhcg== ",                          # not 0/1
    b"spool 0 L3Zhcg==",                           # a field missing
    b"spool 0 not-base64! Tm8gc3BhY2U=",           # damaged
    b"",
])
def test_other_notify_lines_are_not_spool_lines(line: bytes) -> None:
    assert parse_spool_line(line) is None


def test_a_spool_line_is_not_a_config_line() -> None:
    assert parse_config_line(spool_line(SpoolHealth(False, "/s", "x"))[:-1]) is None


# -- the event and its default ------------------------------------------------------------------
def test_spool_unwritable_is_on_by_default_and_can_be_left_out() -> None:
    assert "spool_unwritable" in ALERT_EVENTS
    assert "spool_unwritable" in AlertsConfig().events
    assert "spool_unwritable" in parse_config(MINIMAL).alerts.events
    assert "spool_unwritable" in parse_config(MINIMAL + "alerts: {webhook: http://127.0.0.1:1/}\n").alerts.events
    chosen = parse_config(MINIMAL + "alerts: {events: [queue_age]}\n")
    assert chosen.alerts.events == ("queue_age",)


def test_the_alert_fires_once_per_outage_and_clears(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relayd.alerts")
    alerts = Alerts(AlertsConfig(), hostname="h")
    failing = SpoolHealth(False, "/var/spool/relayd", "No space left on device")
    alerts.spool_health(failing)
    alerts.spool_health(failing)
    assert alerts.active == {("spool_unwritable", "spool")}
    fired = [r.getMessage() for r in caplog.records if r.getMessage().startswith("alert:")]
    assert fired == ["alert: spool_unwritable spool: the spool /var/spool/relayd cannot store mail "
                     "(No space left on device); every message is answered 451 4.3.0 until a store "
                     "succeeds"]
    alerts.spool_health(SpoolHealth(True, "/var/spool/relayd"))
    assert alerts.active == frozenset()
    assert "alert resolved: spool_unwritable spool: the spool /var/spool/relayd accepts mail again" \
        in caplog.text


def test_the_alert_is_silent_when_not_chosen() -> None:
    alerts = Alerts(AlertsConfig(events=("queue_age",)), hostname="h")
    alerts.spool_health(SpoolHealth(False, "/s", "Read-only file system"))
    assert alerts.active == frozenset()


# -- the intake ---------------------------------------------------------------------------------
class _Policy:
    """Accepts every message as it is (the acceptance policy is not what is tested here)."""

    def accept(self, message: Message, now: float) -> Accepted:
        result = PipelineResult(False, None, (), (), (message,), ())
        return Accepted((message,), (), result)


class _Gauge(Recorder):
    def __init__(self) -> None:
        self.writable: list[bool] = []

    def set_spool_writable(self, writable: bool) -> None:
        self.writable.append(writable)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as ex:
        yield ex


async def test_intake_reports_each_failure_and_only_the_first_success_after(
        tmp_path: Path, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    spool.ensure_dirs()
    real_put = spool.put_batch
    failing = [False]

    def put_batch(items: Sequence[tuple[Message, str]]) -> list[str | SpoolError]:
        if failing[0]:
            return [SpoolError("cannot store message: No space left on device") for _ in items]
        return real_put(items)

    monkeypatch.setattr(spool, "put_batch", put_batch)
    reports: list[SpoolHealth] = []
    gauge = _Gauge()
    intake = Intake(_Policy(), spool, executor=executor, clock=lambda: 1_700_000_000.0,  # type: ignore[arg-type]
                    metrics=gauge, enqueue=lambda qid, prio: None, on_spool=reports.append)
    envelope = Envelope("app@example.com", ("user@example.net",))

    async def send() -> int:
        return (await intake.accept(new_queue_id(), envelope, b"Subject: x\r\n\r\nbody\r\n")).code

    assert await send() == 250
    assert reports == [] and gauge.writable == []        # nothing to report while it stores
    failing[0] = True
    assert [await send(), await send()] == [451, 451]
    down = SpoolHealth(False, str(tmp_path / "spool"), "No space left on device")
    assert reports == [down, down]                       # the alerts de-duplicate
    assert gauge.writable == [False, False]
    failing[0] = False
    assert [await send(), await send()] == [250, 250]
    assert reports == [down, down, SpoolHealth(True, str(tmp_path / "spool"))]
    assert gauge.writable == [False, False, True]
    spool.close()


def test_the_gauge_is_one_until_a_store_fails() -> None:
    metrics = Metrics()
    assert b"relayd_spool_writable 1.0" in metrics.render()
    metrics.set_spool_writable(False)
    assert b"relayd_spool_writable 0.0" in metrics.render()
    metrics.set_spool_writable(True)
    assert b"relayd_spool_writable 1.0" in metrics.render()
