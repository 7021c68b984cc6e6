"""``relayd explain``: the dry run prints every decision and the plan, and sends nothing."""

from __future__ import annotations

import io
import time
from pathlib import Path

from relayd.cli import IO, main
from relayd.delivery.limits import DailyCap
from relayd.policy.suppressions import SuppressionStore
from tests.support.policy_helpers import DATA, dkim_keypair

CONFIG = """
smarthosts:
  - name: primary
    host: email-smtp.eu-west-1.amazonaws.com
    tls: starttls
    auth: {method: plain, username: AKIAEXAMPLE, password: "very-secret-password"}
  - {name: preview, outbox: ./outbox}
state_dir: ./state
sender:
  from: {address: noreply@example.com, name: "Example", mode: always}
  envelope_from: bounces@example.com
headers: {add: {X-SES-CONFIGURATION-SET: transactional}, remove: [X-Mailer]}
priority: [{subject: "(?i)password reset"}]
unsubscribe:
  url: "https://example.com/unsubscribe?token={token}"
  secret: "unsubscribe-secret-value"
  footer_text: "Unsubscribe: {url}"
limits: {daily_cap: 10, rate: 14/s}
dkim: [{domain: example.com, selector: relayd, private_key_file: dkim.pem}]
"""


def _setup(tmp_path: Path) -> Path:
    (tmp_path / "dkim.pem").write_bytes(dkim_keypair()[0])
    cfg = tmp_path / "relayd.yaml"
    cfg.write_text(CONFIG)
    return cfg


def _explain(cfg: Path, *argv: str, stdin: str = "") -> tuple[int, str]:
    out = io.StringIO()
    rc = main(["-c", str(cfg), "explain", *argv], io=IO(out, io.StringIO(), io.StringIO(stdin)))
    return rc, out.getvalue()


def test_explain_prints_each_decision_and_the_plan(tmp_path: Path) -> None:
    cfg = _setup(tmp_path)
    with SuppressionStore(tmp_path / "state") as store:
        store.add(["bob@example.net"])
    cap = DailyCap(10, tmp_path / "state")
    cap.record(7, time.time() - 3600)
    cap.close()
    rc, out = _explain(cfg, str(DATA / "plain.eml"), "--to", "alice@example.net", "bob@example.net")
    assert rc == 0
    assert "priority: no (no rule matched)" in out
    assert "do_not_email: suppressed (never delivered): bob@example.net" in out
    assert "  - From: App <app@example.com>" in out
    assert "  + From: Example <noreply@example.com>" in out
    assert "  + X-SES-CONFIGURATION-SET: transactional" in out
    assert "unsubscribe: part 1 text/plain: footer added (us-ascii, 7bit)" in out
    assert "dkim: signed d=example.com s=relayd" in out
    assert "envelope upstream: MAIL FROM <bounces@example.com>" in out
    assert "daily cap: 7 of 10 used in the last 24 h, 3 remaining; these 1 recipient(s) would go now" in out
    assert "rate: 14/s" in out
    assert "1. primary: email-smtp.eu-west-1.amazonaws.com:587, tls=starttls, auth=plain" in out
    assert "2. preview: write an .eml file to" in out
    for secret in ("very-secret-password", "unsubscribe-secret-value", "PRIVATE KEY"):
        assert secret not in out
    assert not (tmp_path / "outbox").exists()


def test_explain_reads_stdin_and_shows_priority(tmp_path: Path) -> None:
    cfg = _setup(tmp_path)
    php = (DATA / "php_mail.eml").read_bytes().decode("utf-8").replace("\r\n", "\n")
    rc, out = _explain(cfg, stdin=php)
    assert rc == 0
    assert "message: " in out and "to=<kim@example.net>" in out
    assert "priority: yes (priority[0]: subject matches '(?i)password reset')" in out
    assert "unsubscribe: skipped: priority mail (skip_priority)" in out
    assert "  - X-Mailer: PHP/8.2.7" in out
    assert "priority mail is exempt (priority_exempt)" in out


def test_explain_everything_suppressed(tmp_path: Path) -> None:
    cfg = _setup(tmp_path)
    with SuppressionStore(tmp_path / "state") as store:
        store.add(["alice@example.net"])
    rc, out = _explain(cfg, str(DATA / "plain.eml"))
    assert rc == 0
    assert "nothing to deliver: every recipient is suppressed or rejected" in out
