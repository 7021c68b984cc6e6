"""Log output as an operator sees it: Postfix-shaped text, journald mode, JSON, redaction."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from relayd.config.schema import LogFormat, LoggingConfig
from relayd.daemon.logsetup import TRANSCRIPT_LOGGER, redact, setup_logging
from relayd.delivery.logline import delivery_line
from relayd.model import Status


@pytest.fixture(autouse=True)
def restore_root():
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    yield
    for h in list(root.handlers):
        if getattr(h, "_relayd", False):
            root.removeHandler(h)
    root.setLevel(saved[0])
    logging.getLogger(TRANSCRIPT_LOGGER).setLevel(logging.NOTSET)


LINE = delivery_line("4Xk2mN7QpRzbvT", "bob@example.org", "primary[smtp.example.com]:587", 1.4, 1,
                     "2.0.0", Status.SENT, "250 2.0.0 Ok")


def test_text_lines_are_postfix_shaped_with_timestamp() -> None:
    out = io.StringIO()
    setup_logging(LoggingConfig(), stream=out, environ={})
    log = logging.getLogger("relayd.qmgr")
    log.info(LINE)
    log.warning("smarthost primary paused for 60 s")
    log.debug("not shown at info")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} relayd\[\d+\]: "
                        r"4Xk2mN7QpRzbvT: to=<bob@example.org>, relay=primary\[smtp.example.com\]:587, "
                        r"delay=1.40, attempts=1, dsn=2.0.0, status=sent \(250 2.0.0 Ok\)", lines[0])
    assert lines[1].endswith("relayd[" + lines[1].split("relayd[")[1].split("]")[0]
                             + "]: warning: smarthost primary paused for 60 s")


def test_journald_mode_has_no_timestamp_and_priority_prefixes() -> None:
    out = io.StringIO()
    setup_logging(LoggingConfig(level="debug"), stream=out, environ={"JOURNAL_STREAM": "8:12345"})
    log = logging.getLogger("relayd.qmgr")
    log.info(LINE)
    log.error("spool write failed")
    log.debug("detail")
    assert out.getvalue().splitlines() == [f"<6>{LINE}", "<3>error: spool write failed",
                                           "<7>debug: detail"]


def test_multiline_messages_stay_one_event() -> None:
    out = io.StringIO()
    setup_logging(LoggingConfig(), stream=out, environ={"JOURNAL_STREAM": "1:1"})
    logging.getLogger("relayd").warning("config refused:\nsmarthosts[0].port: bad")
    assert out.getvalue() == "<4>warning: config refused:\n    smarthosts[0].port: bad\n"


def test_control_characters_from_clients_are_escaped() -> None:
    out = io.StringIO()
    setup_logging(LoggingConfig(), stream=out, environ={"JOURNAL_STREAM": "1:1"})
    logging.getLogger("relayd").info("Q1: helo=<a\x00b\tc\x1b[2Jd\x7fe\rf>")
    assert out.getvalue() == "<6>Q1: helo=<a\\x00b\\x09c\\x1b[2Jd\\x7fef>\n"


def test_json_lines_with_queue_id() -> None:
    out = io.StringIO()
    setup_logging(LoggingConfig(format=LogFormat.JSON), stream=out, environ={})
    logging.getLogger("relayd.qmgr").info(LINE, extra={"queue_id": "4Xk2mN7QpRzbvT",
                                                       "status": "sent", "smarthost": "primary"})
    obj = json.loads(out.getvalue())
    assert obj["message"] == LINE
    assert obj["queue_id"] == "4Xk2mN7QpRzbvT" and obj["status"] == "sent"
    assert obj["level"] == "info" and obj["logger"] == "relayd.qmgr"
    assert obj["time"].endswith("Z")


def test_transcripts_only_when_enabled_and_redacted() -> None:
    out = io.StringIO()
    setup_logging(LoggingConfig(smtp_transcripts=False), stream=out, environ={})
    logging.getLogger(TRANSCRIPT_LOGGER).info("C: EHLO relay.example.com")
    assert out.getvalue() == ""
    setup_logging(LoggingConfig(smtp_transcripts=True), stream=out, environ={"JOURNAL_STREAM": "1:1"})
    t = logging.getLogger(TRANSCRIPT_LOGGER)
    t.debug("C: AUTH PLAIN AHVzZXIAaHVudGVyMg==")
    t.debug("C: AUTH LOGIN")
    t.debug("S: 334 VXNlcm5hbWU6")
    t.debug("C: dXNlckBleGFtcGxlLmNvbQ==")
    t.debug("C: STARTTLS")
    text = out.getvalue()
    assert "AHVzZXIAaHVudGVyMg" not in text and "dXNlckBleGFtcGxlLmNvbQ" not in text
    assert "C: AUTH PLAIN [redacted]" in text
    assert "C: AUTH LOGIN\n" in text and "S: 334 VXNlcm5hbWU6" in text   # server prompt kept
    assert "C: STARTTLS" in text
    # Only one relayd handler even after a second setup (reload).
    assert sum(getattr(h, "_relayd", False) for h in logging.getLogger().handlers) == 1


@pytest.mark.parametrize(("raw", "leaked"), [
    ("token request failed: {\"access_token\": \"eyJ0eXAi.abc\", \"expires_in\": 3599}", "eyJ0eXAi"),
    ("POST body grant_type=refresh_token&refresh_token=1//0gAbC&client_secret=s3cr3t", "0gAbC"),
    ("client_secret=s3cr3t", "s3cr3t"),
    ("Authorization: Bearer eyJhbGciOi", "eyJhbGciOi"),
    ("callback https://x/cb?code=4/0AbCdEf&state=1", "0AbCdEf"),
    ("user=relay@example.com\x01auth=Bearer ya29.a0Af\x01\x01", "ya29"),
    ("password=\"hunter2\"", "hunter2"),
])
def test_redaction_of_secrets(raw: str, leaked: str) -> None:
    assert leaked not in redact(raw)
    assert "[redacted]" in redact(raw)


def test_redaction_keeps_ordinary_messages() -> None:
    for text in (LINE, "unsubscribe.secret: is required", "smarthosts[1].auth.oauth.token_url: must be https",
                 "token refresh failed for m365: invalid_grant", "C: MAIL FROM:<a@example.com> SIZE=100"):
        assert redact(text) == text


def test_filter_applies_to_args_too() -> None:
    out = io.StringIO()
    setup_logging(LoggingConfig(), stream=out, environ={})
    logging.getLogger("relayd").info("sending %s", "AUTH XOAUTH2 dXNlcj1hQGIBYXV0aD1CZWFyZXIgeHl6AQE=")
    assert "dXNlcj1h" not in out.getvalue() and "AUTH XOAUTH2 [redacted]" in out.getvalue()
