"""The sendmail command run as callers run it (a process with argv and a stdin pipe), handing
mail to a recording SMTP server that stands in for the daemon; PHP's real mail() included."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from relayd.cli import IO
from relayd.commands import sendmail
from relayd.config.load import load_config
from relayd.model import Envelope, Message
from relayd.spool.store import Spool
from tests.support.config_builder import ConfigBuilder
from tests.support.ops_smtp import RecordingServer
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def daemon():
    with RecordingServer() as srv:
        yield srv


def _config(tmp_path: Path, port: int) -> Path:
    return ConfigBuilder(tmp_path).write([{"name": "preview", "outbox": str(tmp_path / "outbox")}],
                                         hostname="host.example.com", local_domain="example.com", port=port)


@pytest.fixture
def shim(tmp_path: Path):
    """A `relayd-sendmail` console script like pip generates, plus sendmail/mailq symlinks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "relayd-sendmail"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom relayd.cli import sendmail_main\n"
                      "sys.exit(sendmail_main())\n")
    script.chmod(0o755)
    (bin_dir / "sendmail").symlink_to(script)
    (bin_dir / "mailq").symlink_to(script)
    return bin_dir


def _run(shim: Path, cfg: Path, argv: list[str], stdin: bytes, name: str = "relayd-sendmail"):
    env = dict(os.environ, RELAYD_CONFIG=str(cfg), PYTHONPATH=str(ROOT))
    return subprocess.run([str(shim / name), *argv], input=stdin, capture_output=True, env=env,
                          timeout=30)


CRON_MAIL = (b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> run-parts\n"
             b"Content-Type: text/plain; charset=UTF-8\n\nout\n.\nafter a dot line\n")


def test_cronie_argv_delivers_with_t_and_qualified_root(tmp_path, daemon, shim) -> None:
    cfg = _config(tmp_path, daemon.port)
    r = _run(shim, cfg, ["-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t"], CRON_MAIL,
             name="sendmail")
    assert r.returncode == 0, r.stderr
    (msg,) = daemon.recorder.messages
    assert msg.rcpt_tos == ["root@example.com"]
    assert msg.mail_from == "root@example.com"
    # -i: the lone dot is content, not the end of input; CRLF on the wire.
    assert b"\r\n.\r\nafter a dot line\r\n" in msg.content
    assert b"Received:" not in msg.content


def test_debian_cron_argv_recipient_on_argv(tmp_path, daemon, shim) -> None:
    cfg = _config(tmp_path, daemon.port)
    r = _run(shim, cfg, ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
             "Subject: report\n\nwörld\n".encode())
    assert r.returncode == 0, r.stderr
    (msg,) = daemon.recorder.messages
    assert msg.rcpt_tos == ["root@example.com"]
    assert b"From: CronDaemon <root@example.com>" in msg.content or b"From: CronDaemon" in msg.content
    assert "BODY=8BITMIME" in msg.mail_options
    assert "wörld".encode() in msg.content


def test_without_i_a_lone_dot_ends_the_message(tmp_path, daemon, shim) -> None:
    cfg = _config(tmp_path, daemon.port)
    r = _run(shim, cfg, ["-FAnacron", "-odi", "root"], b"Subject: a\n\nkept\n.\ndropped\n")
    assert r.returncode == 0, r.stderr
    (msg,) = daemon.recorder.messages
    assert b"kept" in msg.content and b"dropped" not in msg.content


@pytest.mark.parametrize(("argv", "rcpts", "sender"), [
    (["-i", "--", "bob@example.org"], ["bob@example.org"], None),                      # s-nail
    (["-i", "-f", "dev@example.org", "a@example.org", "b@example.org"],
     ["a@example.org", "b@example.org"], "dev@example.org"),                             # git
    (["-t", "-fraid@example.org"], ["admin@example.org"], "raid@example.org"),         # mdadm
    (["-i", "alice"], ["alice@example.com"], None),                                     # atd
])
def test_other_callers(tmp_path, daemon, shim, argv, rcpts, sender) -> None:
    cfg = _config(tmp_path, daemon.port)
    r = _run(shim, cfg, argv, b"To: admin@example.org\nSubject: s\n\nbody\n")
    assert r.returncode == 0, r.stderr
    (msg,) = daemon.recorder.messages
    assert msg.rcpt_tos == rcpts
    if sender:
        assert msg.mail_from == sender


def test_t_strips_bcc(tmp_path, daemon, shim) -> None:
    cfg = _config(tmp_path, daemon.port)
    r = _run(shim, cfg, ["-t", "-i"], b"To: a@example.org\nBcc: secret@example.org\nSubject: s\n\nb\n")
    assert r.returncode == 0, r.stderr
    (msg,) = daemon.recorder.messages
    assert msg.rcpt_tos == ["a@example.org", "secret@example.org"]
    assert b"secret@example.org" not in msg.content


def test_relayd_sendmail_subcommand_form(tmp_path, daemon) -> None:
    cfg = _config(tmp_path, daemon.port)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "relayd", "-c", str(cfg), "sendmail", "-i", "x@example.org"],
                       input=b"Subject: s\n\nb\n", capture_output=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    assert daemon.recorder.messages[0].rcpt_tos == ["x@example.org"]


def test_php_mail_through_relayd_sendmail(tmp_path, daemon, shim) -> None:
    cfg = _config(tmp_path, daemon.port)
    code = ("$ok = mail('user@example.org', 'PHP test', \"line1\\nline2\", "
            "['From' => 'web@example.com', 'Bcc' => 'hidden@example.org'], '-fbounce@example.com');"
            "exit($ok ? 0 : 3);")
    env = dict(os.environ, RELAYD_CONFIG=str(cfg), PYTHONPATH=str(ROOT))
    r = subprocess.run(["php", "-n", "-d", f"sendmail_path={shim / 'relayd-sendmail'} -t -i",
                        "-r", code], capture_output=True, env=env, timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    (msg,) = daemon.recorder.messages
    assert msg.mail_from == "bounce@example.com"
    assert sorted(msg.rcpt_tos) == ["hidden@example.org", "user@example.org"]
    assert b"Subject: PHP test\r\n" in msg.content
    assert b"hidden@example.org" not in msg.content
    assert b"line1\r\nline2" in msg.content


def test_php_mail_returns_false_when_daemon_down(tmp_path, shim) -> None:
    cfg = _config(tmp_path, free_port())
    env = dict(os.environ, RELAYD_CONFIG=str(cfg), PYTHONPATH=str(ROOT))
    r = subprocess.run(["php", "-n", "-d", f"sendmail_path={shim / 'relayd-sendmail'} -t -i", "-r",
                        "exit(mail('u@example.org', 's', 'b') ? 0 : 3);"],
                       capture_output=True, env=env, timeout=60)
    assert r.returncode == 3


def test_exit_75_when_daemon_is_down(tmp_path, shim) -> None:
    cfg = _config(tmp_path, free_port())
    r = _run(shim, cfg, ["-t", "-i"], b"To: a@example.org\n\nb\n")
    assert r.returncode == 75
    assert b"not sent, try again later" in r.stderr


def test_exit_75_on_4xx_and_nothing_half_sent(tmp_path, daemon, shim) -> None:
    cfg = _config(tmp_path, daemon.port)
    daemon.recorder.data_reply = "451 4.3.0 spool full"
    r = _run(shim, cfg, ["-t", "-i"], b"To: a@example.org\n\nb\n")
    assert r.returncode == 75
    assert b"451 4.3.0 spool full" in r.stderr
    daemon.recorder.data_reply = None
    daemon.recorder.rcpt_reply = "452 4.5.3 too many recipients"
    assert _run(shim, cfg, ["-i", "a@example.org"], b"\nb\n").returncode == 75


def test_5xx_is_a_permanent_error_with_the_reply(tmp_path, daemon, shim) -> None:
    cfg = _config(tmp_path, daemon.port)
    daemon.recorder.data_reply = "552 5.3.4 message too big"
    r = _run(shim, cfg, ["-t", "-i"], b"To: a@example.org\n\nb\n")
    assert r.returncode == 65
    assert b"552 5.3.4 message too big" in r.stderr
    daemon.recorder.data_reply = None
    daemon.recorder.rcpt_reply = "550 5.7.1 on the do-not-email list"
    r = _run(shim, cfg, ["-i", "a@example.org"], b"\nb\n")
    assert r.returncode == 64
    assert b"550 5.7.1 on the do-not-email list" in r.stderr
    assert daemon.recorder.messages == []


def test_usage_errors(tmp_path, daemon, shim) -> None:
    cfg = _config(tmp_path, daemon.port)
    assert _run(shim, cfg, ["-i"], b"Subject: s\n\nb\n").returncode == 64   # no recipient
    r = _run(shim, cfg, ["-bd"], b"")
    assert r.returncode == 64 and b"relayd run" in r.stderr
    assert _run(shim, cfg, ["-bi"], b"").returncode == 0                    # newaliases: no-op


def test_bs_session_like_swiftmailer(tmp_path, daemon, shim) -> None:
    cfg = _config(tmp_path, daemon.port)
    env = dict(os.environ, RELAYD_CONFIG=str(cfg), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([str(shim / "sendmail"), "-bs"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)
    assert proc.stdin and proc.stdout

    def say(line: bytes) -> None:
        proc.stdin.write(line + b"\r\n")
        proc.stdin.flush()

    def reply() -> list[bytes]:
        lines = []
        while True:
            line = proc.stdout.readline()
            assert line, "sendmail -bs closed the session"
            lines.append(line)
            if line[3:4] == b" ":
                return lines
    try:
        assert reply()[0].startswith(b"220 ")
        say(b"EHLO app.example.com")
        assert reply()[-1].startswith(b"250 ")
        say(b"MAIL FROM:<app@example.com>")
        assert reply()[0].startswith(b"250")
        say(b"RCPT TO:<u@example.org>")
        assert reply()[0].startswith(b"250")
        say(b"DATA")
        assert reply()[0].startswith(b"354")
        say(b"Subject: bs\r\n\r\nhello\r\n.")
        assert reply()[0].startswith(b"250 2.0.0 Ok: queued as TESTID1")
        say(b"QUIT")
        assert reply()[0].startswith(b"221")
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
    (msg,) = daemon.recorder.messages
    assert msg.mail_from == "app@example.com" and b"hello" in msg.content


def test_bs_with_daemon_down_answers_421_and_exits_75(tmp_path, shim) -> None:
    cfg = _config(tmp_path, free_port())
    r = _run(shim, cfg, ["-bs"], b"EHLO x\r\n")
    assert r.returncode == 75
    assert r.stdout.startswith(b"421 4.3.0 ")


class _FakeSpool:
    def __init__(self, path) -> None:
        env = types.SimpleNamespace(mail_from="app@example.com", rcpt_tos=("a@example.org",))
        self.entries = [types.SimpleNamespace(id="4Xk2mN7QpRzbvT", state="queued", envelope=env,
                                              size=900, created="2026-11-21T10:00:00+00:00",
                                              last_error="connect to smarthost: refused")]
        self.retried: list[str] = []

    def list(self, state=None):
        return self.entries

    def retry(self, queue_id: str) -> None:
        self.retried.append(queue_id)


def test_bp_and_q_use_the_spool(tmp_path, monkeypatch) -> None:
    cfg = _config(tmp_path, free_port())
    fake = _FakeSpool(tmp_path)
    monkeypatch.setattr(sendmail, "_open_spool", lambda path: fake)
    monkeypatch.setenv("RELAYD_CONFIG", str(cfg))
    out, err = io.StringIO(), io.StringIO()
    args = types.SimpleNamespace(sendmail_args=["-bp"], config=None)
    assert sendmail.main(args, IO(out, err, io.StringIO())) == 0  # type: ignore[arg-type]
    assert "4Xk2mN7QpRzbvT" in out.getvalue()
    assert "(connect to smarthost: refused)" in out.getvalue()
    args = types.SimpleNamespace(sendmail_args=["-q"], config=None)
    assert sendmail.main(args, IO(out, err, io.StringIO())) == 0  # type: ignore[arg-type]
    assert fake.retried == ["4Xk2mN7QpRzbvT"]


def test_callers_need_no_access_to_secrets(tmp_path, daemon, shim) -> None:
    """www-data and crontab users cannot read relayd's password files; sendmail must not need them."""
    cfg = tmp_path / "relayd.yaml"
    cfg.write_text(f"""
hostname: host.example.com
listen: ["127.0.0.1:{daemon.port}"]
spool: {{path: {tmp_path / 'spool'}}}
secrets: {{key_file: /nonexistent/secret.key}}
smarthosts:
  - name: ses
    host: email-smtp.eu-west-1.amazonaws.com
    auth: {{method: plain, username: AKIA, password_file: /nonexistent/ses-password}}
""")
    r = _run(shim, cfg, ["-i", "root"], b"Subject: s\n\nb\n")
    assert r.returncode == 0, r.stderr
    assert daemon.recorder.messages[0].rcpt_tos == ["root@host.example.com"]  # local_domain defaults to hostname


def test_unreadable_or_invalid_config_exits_78(tmp_path, shim) -> None:
    r = _run(shim, tmp_path / "missing.yaml", ["-i", "root"], b"x\n")
    assert r.returncode == 78 and b"cannot read" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: ['127.0.0.1:99999']\n")
    r = _run(shim, bad, ["-i", "root"], b"x\n")
    assert r.returncode == 78 and b"listen[0]: port must be between 1 and 65535" in r.stderr


def test_falls_back_to_the_next_listen_address(tmp_path, daemon, shim) -> None:
    cfg = tmp_path / "relayd.yaml"
    cfg.write_text(f"""
hostname: host.example.com
listen: ["127.0.0.1:{free_port()}", "0.0.0.0:{daemon.port}"]
""")
    r = _run(shim, cfg, ["-i", "a@example.org"], b"Subject: s\n\nb\n")
    assert r.returncode == 0, r.stderr
    assert len(daemon.recorder.messages) == 1


def test_non_ascii_address_goes_with_smtputf8(tmp_path, daemon, shim) -> None:
    cfg = _config(tmp_path, daemon.port)
    r = _run(shim, cfg, ["-i", "jörg@exämple.org"], b"Subject: s\n\nb\n")
    assert r.returncode == 0, r.stderr
    (msg,) = daemon.recorder.messages
    assert msg.rcpt_tos == ["jörg@exämple.org"] and "SMTPUTF8" in msg.mail_options


def test_sendmail_and_the_daemon_agree_on_the_defaults(tmp_path, monkeypatch) -> None:
    """A config that sets only smarthosts: sendmail hands the message to the addresses the
    daemon listens on by default, says HELO with the daemon's hostname, qualifies ``root``
    with its default local_domain and lists the spool it writes (one reader for both)."""
    cfg = tmp_path / "relayd.yaml"
    cfg.write_text("smarthosts: [{name: s, host: smtp.example.net}]\n")
    daemon_cfg = load_config(cfg)
    submitted = []
    monkeypatch.setattr(sendmail, "submit_any",
                        lambda addresses, **kw: submitted.append((addresses, kw)) or "250 2.0.0 Ok")
    opened = []
    monkeypatch.setattr(sendmail, "_open_spool", lambda path: opened.append(path) or _FakeSpool(path))
    monkeypatch.setenv("RELAYD_CONFIG", str(cfg))
    out, err = io.StringIO(), io.StringIO()
    args = types.SimpleNamespace(sendmail_args=["-i", "root"], config=None)
    assert sendmail.main(args, IO(out, err, io.StringIO("Subject: s\n\nb\n"))) == 0, err.getvalue()
    ((addresses, kw),) = submitted
    assert addresses == sendmail.daemon_addresses(daemon_cfg.listen) == [("127.0.0.1", 25), ("::1", 25)]
    assert kw["helo"] == daemon_cfg.hostname
    assert list(kw["recipients"]) == [f"root@{daemon_cfg.local_domain}"]
    args = types.SimpleNamespace(sendmail_args=["-bp"], config=None)
    assert sendmail.main(args, IO(out, err, io.StringIO())) == 0
    assert opened == [daemon_cfg.spool.path]



def test_mailq_and_q_read_the_spool(tmp_path, shim) -> None:
    """``mailq`` and ``sendmail -q`` open the real spool (a lookup of the spool by module
    name, which a move had broken, once made them fail with a traceback)."""
    cfg = _config(tmp_path, free_port())
    spool = Spool(tmp_path / "spool")
    spool.ensure_dirs()
    qid = spool.put(Message(Envelope("app@example.com", ("a@example.org",)), b"Subject: s\r\n\r\nb\r\n"))
    spool.close()
    r = _run(shim, cfg, [], b"", name="mailq")
    assert r.returncode == 0, r.stderr
    assert qid.encode() in r.stdout and b"a@example.org" in r.stdout and b"1 Request." in r.stdout
    r = _run(shim, cfg, ["-q"], b"")
    assert r.returncode == 0, r.stderr
    assert [e.id for e in Spool(tmp_path / "spool").list()] == [qid]
