"""Operations through the real daemon: PHP's mail() and cron's sendmail argv delivered end to
end, and the metrics endpoint scraped during a run with deliveries, deferrals and suppressions."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from relayd.cli import main as cli_main
from tests.support.relay import ROOT, free_port, running_relay, upstream_smarthost, wait_until, write_config
from tests.support.upstream import FakeUpstream


def make_shim(bin_dir: Path) -> Path:
    """A `relayd-sendmail` console script as pip generates it."""
    bin_dir.mkdir()
    script = bin_dir / "relayd-sendmail"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom relayd.cli import sendmail_main\n"
                      "sys.exit(sendmail_main())\n")
    script.chmod(0o755)
    return script


def run(argv: list[str], cfg: Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, RELAYD_CONFIG=str(cfg), PYTHONPATH=str(ROOT))
    return subprocess.run(argv, input=stdin, capture_output=True, env=env, timeout=60)


async def test_php_mail_and_cron_reach_the_provider_through_the_daemon(tmp_path: Path) -> None:
    shim = make_shim(tmp_path / "bin")
    async with FakeUpstream() as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], local_domain="example.com")
        async with running_relay(cfg) as relay:
            cfg.write_text(cfg.read_text().replace("127.0.0.1:0", f"127.0.0.1:{relay.port}"))
            php = ("$ok = mail('user@example.org', 'PHP test', \"line1\\nline2\", "
                   "['From' => 'web@example.com'], '-fbounce@example.com'); exit($ok ? 0 : 3);")
            r = await asyncio.to_thread(run, ["php", "-n", "-d", f"sendmail_path={shim} -t -i", "-r", php], cfg)
            assert r.returncode == 0, r.stderr
            cron = b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> backup\n\nok\n"
            r = await asyncio.to_thread(run, [str(shim), "-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t"], cfg, cron)
            assert r.returncode == 0, r.stderr
            await wait_until(lambda: len(up.messages) == 2, what="both messages at the provider")
            await wait_until(lambda: relay.daemon.spool.list() == [], what="queue empty")
    php_msg = next(m for m in up.messages if m.mail_from == "bounce@example.com")
    assert php_msg.rcpt_tos == ["user@example.org"] and b"line1\r\nline2" in php_msg.data
    cron_msg = next(m for m in up.messages if m is not php_msg)
    assert cron_msg.rcpt_tos == ["root@example.com"]


async def test_metrics_during_a_run_with_deliveries_deferrals_and_suppressions(tmp_path: Path) -> None:
    port = free_port()
    async with FakeUpstream(replies={"rcpt": {"slow@example.net": "450 4.2.0 mailbox busy"}}) as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], metrics={"listen": f"127.0.0.1:{port}"},
                           spool={"retry": {"initial": "1h", "max_interval": "2h"}})
        async with running_relay(cfg, housekeeping_interval=0.2) as relay:
            assert cli_main(["-c", str(cfg), "suppress", "add", "gone@example.net"]) == 0
            await relay.send(b"Subject: m\r\n\r\nx\r\n", rcpts=("ok@example.net", "slow@example.net", "gone@example.net"))
            await wait_until(lambda: len(up.messages) == 1, what="delivery")
            await wait_until(lambda: relay.daemon.spool.list() and relay.daemon.spool.list()[0].attempts == 1,
                             what="deferral recorded")
            url = f"http://127.0.0.1:{port}/metrics"

            async def scrape() -> str | None:
                text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
                return text if 'relayd_queue_messages{state="queued"} 1.0' in text else None
            # The queue gauges are refreshed by housekeeping (every 0.2 s here): poll with a deadline.
            text = await wait_until(scrape, 10, "the queued gauge at 1", interval=0.1)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("relayd_messages_received_total", ())] == 1
    assert samples[("relayd_deliveries_total", (("smarthost", "primary"), ("status", "sent")))] == 1
    assert samples[("relayd_deliveries_total", (("smarthost", "primary"), ("status", "deferred")))] == 1
    assert samples[("relayd_suppressed_total", ())] == 1
    assert samples[("relayd_queue_messages", (("state", "queued"),))] == 1
    assert "@" not in "".join(str(k) for k in samples)  # no address ever in a label
