"""Submission from other hosts, as the operator meets it: `relayd run` with a submission
listener and a real certificate, users made with `relayd user add`, real clients (smtplib
with STARTTLS and implicit TLS, swaks, PHP), and only what a person sees: replies, the log,
`queue list --json`, `queue show`, `relayd user list`, exit codes."""

from __future__ import annotations

import base64
import json
import os
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.relay import free_port
from tests.support.submission import MESSAGE, PASSWORD, Submission, read_reply, replies_until_closed
from tests.support.waiting import wait_until

pytestmark = pytest.mark.asyncio


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _due_in(row: dict[str, Any]) -> float:
    """Seconds until a `queue list --json` row's next attempt (0 if none)."""
    due = row["next_attempt"]
    return datetime.fromisoformat(due).timestamp() - time.time() if due else 0.0


async def _delivered(sub: Submission, n: int) -> None:
    await wait_until(lambda: len(list(sub.outbox.glob("*.eml"))) >= n, 20, f"{n} mail(s) in the outbox")


async def test_starttls_login_and_plain_with_smtplib(tmp_path: Path) -> None:
    sub = Submission(tmp_path)
    await sub.add_user("alice", "--allowed-from", "@example.com")
    await sub.start()
    try:
        def send(mechanism: str) -> str:
            s = sub.smtp(login=None)
            assert "LOGIN" in s.esmtp_features["auth"] and "PLAIN" in s.esmtp_features["auth"]
            s.user, s.password = "alice", PASSWORD
            code, _ = s.auth(mechanism, getattr(s, f"auth_{mechanism.lower()}"))
            assert code == 235
            s.sendmail("app@example.com", ["user@example.net"], MESSAGE)
            s.quit()
            return mechanism
        assert await sub.in_thread(send, "LOGIN") == "LOGIN"
        assert await sub.in_thread(send, "PLAIN") == "PLAIN"
        await _delivered(sub, 2)
        log = sub.op.log()
        assert "sasl_method=LOGIN, sasl_username=alice" in log
        assert "sasl_method=PLAIN, sasl_username=alice" in log
        assert PASSWORD not in log
        assert PASSWORD not in sub.users_file.read_text()
    finally:
        assert await sub.op.stop() == 0


async def test_implicit_tls_with_smtp_ssl(tmp_path: Path) -> None:
    sub = Submission(tmp_path)
    await sub.add_user("printer", "--allowed-from", "scanner@example.com")
    await sub.start()
    try:
        def send() -> None:
            with sub.smtps() as s:
                s.ehlo("printer.lan")
                assert s.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
                s.login("printer", PASSWORD)
                s.sendmail("scanner@example.com", ["user@example.net"],
                           MESSAGE.replace(b"App <app@example.com>", b"scanner@example.com"))
        await sub.in_thread(send)
        await _delivered(sub, 1)
        assert "sasl_username=printer" in sub.op.log()
    finally:
        await sub.op.stop()


async def test_auth_refused_before_tls_and_mail_refused_without_auth(tmp_path: Path) -> None:
    sub = Submission(tmp_path)
    await sub.add_user("alice", "--allowed-from", "*")
    await sub.start()
    try:
        def plain_text() -> tuple[str, tuple[int, bytes], tuple[int, bytes], tuple[int, bytes]]:
            s = smtplib.SMTP("127.0.0.1", sub.starttls_port, timeout=10)
            s.ehlo("app.test")
            features = " ".join(s.esmtp_features)
            auth = s.docmd("AUTH", "PLAIN " + _b64(b"\0alice\0" + PASSWORD.encode()))
            mail = s.docmd("MAIL", "FROM:<app@example.com>")
            s.starttls(context=sub.certs.client_context())
            s.ehlo("app.test")
            after = s.docmd("MAIL", "FROM:<app@example.com>")
            s.quit()
            return features, auth, mail, after
        features, auth, mail, after = await sub.in_thread(plain_text)
        assert "auth" not in features and "starttls" in features
        assert auth[0] == 538 and auth[1].startswith(b"5.7.11")
        assert mail[0] == 530 and mail[1].startswith(b"5.7.0")
        assert after[0] == 530 and after[1].startswith(b"5.7.0")
    finally:
        await sub.op.stop()


async def test_plain_text_pipelined_after_starttls_never_runs_inside_tls(tmp_path: Path) -> None:
    """T43, STARTTLS command injection (CVE-2011-0411, aiosmtpd CVE-2024-34083): commands sent
    in the same segment as STARTTLS, before the handshake, are dropped. Inside TLS exactly the
    commands sent inside TLS are answered, and the session is the one begun inside TLS."""
    sub = Submission(tmp_path)
    await sub.add_user("alice", "--allowed-from", "@example.com")
    await sub.start()
    try:
        def session() -> tuple[str, str, list[str]]:
            raw = socket.create_connection(("127.0.0.1", sub.starttls_port), timeout=10)
            read_reply(raw)
            raw.sendall(b"EHLO app.test\r\n")
            before_tls = read_reply(raw)
            # One write, one segment: what a man in the middle appends to the client's STARTTLS.
            raw.sendall(b"STARTTLS\r\nNOOP\r\nEHLO injected.test\r\n")
            ready = read_reply(raw)  # all the server said in clear text after STARTTLS
            tls = sub.certs.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
            plain = _b64(b"\0alice\0" + PASSWORD.encode())
            tls.sendall(b"".join(line + b"\r\n" for line in (
                b"EHLO inside.test", b"AUTH PLAIN " + plain.encode(), b"MAIL FROM:<app@example.com>",
                b"RCPT TO:<user@example.net>", b"DATA")))
            tls.sendall(MESSAGE + b".\r\nQUIT\r\n")
            inside = replies_until_closed(tls)
            tls.close()
            return before_tls, ready, inside
        before_tls, ready, inside = await sub.in_thread(session)
        assert "STARTTLS" in before_tls and "AUTH" not in before_tls  # T42: no AUTH in clear
        assert ready.startswith("220 ") and ready.count("\r\n") == 1, ready
        codes = [reply[:3] for reply in inside]
        assert codes == ["250", "235", "250", "250", "354", "250", "221"], inside
        assert inside[0].startswith("250-") and "AUTH LOGIN PLAIN" in inside[0]  # EHLO inside.test
        await _delivered(sub, 1)
        await wait_until(lambda: "helo=<inside.test>" in sub.op.log(), 10, "the message's log line")
        assert "injected" not in sub.op.log()
    finally:
        await sub.op.stop()


async def test_wrong_password_unknown_user_and_lockout(tmp_path: Path) -> None:
    metrics_port = free_port()
    sub = Submission(tmp_path, metrics={"listen": f"127.0.0.1:{metrics_port}"})
    await sub.add_user("alice", "--allowed-from", "*")
    await sub.start()
    try:
        def attempts() -> list[int]:
            codes = []
            s = sub.smtp(login=None)
            for user, password in (("alice", "wrong"), ("nobody", PASSWORD),
                                   ("alice", "wrong again")):  # the third: locked out
                s.user, s.password = user, password
                try:
                    codes.append(s.auth("LOGIN", s.auth_login)[0])
                except smtplib.SMTPAuthenticationError as exc:
                    codes.append(exc.smtp_code)
            # A new session from the locked-out address, even with the right password.
            try:
                sub.smtp()
            except (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected,
                    smtplib.SMTPResponseException) as exc:
                codes.append(getattr(exc, "smtp_code", 421))
            return codes
        codes = await sub.in_thread(attempts)
        assert codes == [535, 535, 421, 421]
        log = sub.op.log()
        assert "authentication failed (bad credentials, mechanism LOGIN) for user nobody" in log
        assert "locked out: too many failed authentication attempts" in log
        assert "wrong again" not in log and PASSWORD not in log
        page = await sub.in_thread(lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode())
        assert 'relayd_auth_total{result="failure"} 3.0' in page
        assert 'relayd_auth_total{result="success"} 0.0' in page
        assert 'relayd_auth_total{result="locked_out"} 1.0' in page
    finally:
        await sub.op.stop()


async def test_sender_not_owned_is_refused(tmp_path: Path) -> None:
    sub = Submission(tmp_path)
    await sub.add_user("alice", "--allowed-from", "@example.com")
    await sub.start()
    try:
        def send() -> tuple[tuple[int, bytes], int]:
            s = sub.smtp()
            envelope = s.docmd("MAIL", "FROM:<ceo@other.example>")
            s.rset()
            try:  # envelope owned, header From not
                s.sendmail("app@example.com", ["user@example.net"],
                           MESSAGE.replace(b"app@example.com", b"ceo@other.example"))
                header = 250
            except smtplib.SMTPDataError as exc:
                header = exc.smtp_code
            s.quit()
            return envelope, header
        envelope, header = await sub.in_thread(send)
        assert envelope[0] == 553 and envelope[1].startswith(b"5.7.1")
        assert header == 553
        assert "header From <ceo@other.example> is not in the user's allowed_from" in sub.op.log()
        assert await sub.op.queue() == []
        explain = await sub.op.cli("explain", "--user", "alice", "--from", "ceo@other.example",
                                   "--to", "user@example.net", stdin=MESSAGE.decode())
        assert explain.code == 0 and "553 5.7.1" in explain.out
    finally:
        await sub.op.stop()


async def test_swaks_login_and_plain(tmp_path: Path) -> None:
    sub = Submission(tmp_path)
    await sub.add_user("alice", "--allowed-from", "@example.com")
    await sub.start()
    try:
        for mech in ("LOGIN", "PLAIN"):
            p = await sub.in_thread(lambda m=mech: subprocess.run(
                ["swaks", "--server", "127.0.0.1", "--port", str(sub.starttls_port), "--tls",
                 "--tls-ca-path", str(sub.certs.ca_file), "--tls-verify",
                 "--auth", m, "--auth-user", "alice", "--auth-password", PASSWORD,
                 "--from", "app@example.com", "--to", "user@example.net",
                 "--header", "From: app@example.com"],
                capture_output=True, text=True, timeout=60))
            assert p.returncode == 0, p.stdout + p.stderr
            assert "235 2.7.0" in p.stdout
        await _delivered(sub, 2)
    finally:
        await sub.op.stop()


PHP_LOGIN = r"""<?php
// What PHPMailer does with SMTPSecure=ssl, Port=465, AuthType=LOGIN.
[$port, $ca, $user, $pass] = array_slice($argv, 1);
$ctx = stream_context_create(['ssl' => ['cafile' => $ca, 'peer_name' => '127.0.0.1']]);
$s = stream_socket_client("ssl://127.0.0.1:$port", $errno, $err, 10, STREAM_CLIENT_CONNECT, $ctx);
if (!$s) { fwrite(STDERR, "connect: $err\n"); exit(2); }
function reply($s) { $all = ''; while (($l = fgets($s)) !== false) { $all .= $l; if ($l[3] === ' ') break; } return $all; }
function cmd($s, $c) { fwrite($s, "$c\r\n"); return reply($s); }
$out = reply($s);
$out .= cmd($s, "EHLO php.test");
$out .= cmd($s, "AUTH LOGIN");
$out .= cmd($s, base64_encode($user));
$out .= cmd($s, base64_encode($pass));
$out .= cmd($s, "MAIL FROM:<app@example.com>");
$out .= cmd($s, "RCPT TO:<user@example.net>");
$out .= cmd($s, "DATA");
$out .= cmd($s, "From: app@example.com\r\nSubject: php\r\n\r\nhello\r\n.");
$out .= cmd($s, "QUIT");
echo $out;
"""


async def test_php_login_over_465(tmp_path: Path) -> None:
    sub = Submission(tmp_path)
    await sub.add_user("legacy", "--allowed-from", "app@example.com")
    script = tmp_path / "login.php"
    script.write_text(PHP_LOGIN)
    await sub.start()
    try:
        p = await sub.in_thread(lambda: subprocess.run(
            ["php", str(script), str(sub.implicit_port), str(sub.certs.ca_file), "legacy",
             PASSWORD], capture_output=True, text=True, timeout=60))
        assert p.returncode == 0, p.stderr
        assert "235 2.7.0" in p.stdout and "250 2.0.0 Ok: queued as" in p.stdout, p.stdout
        await _delivered(sub, 1)
    finally:
        await sub.op.stop()


async def test_hostile_auth_exchanges(tmp_path: Path) -> None:
    sub = Submission(tmp_path, listener={"auth_failure_limit": 100})
    await sub.add_user("alice", "--allowed-from", "*")
    await sub.start()
    try:
        def run() -> list[str]:
            out = []
            sock = sub.tls_socket()
            for line in (b"AUTH PLAIN !!!notbase64\r\n",
                         b"AUTH PLAIN " + _b64(b"only-one-part").encode() + b"\r\n",
                         b"AUTH PLAIN " + _b64(b"\0alice\0" + PASSWORD.encode() + b"\0x").encode() + b"\r\n",
                         b"AUTH CRAM-MD5\r\n",
                         b"AUTH\r\n"):
                sock.sendall(line)
                out.append(read_reply(sock))
            sock.sendall(b"AUTH LOGIN\r\n")
            out.append(read_reply(sock))
            sock.sendall(b"*\r\n")
            out.append(read_reply(sock))
            sock.sendall(b"AUTH LOGIN\r\n")
            read_reply(sock)
            sock.sendall(b"A" * 20000 + b"\r\n")
            out.append(read_reply(sock))
            sock.sendall(b"AUTH LOGIN " + _b64(b"al\0ice").encode() + b"\r\n")
            read_reply(sock)
            sock.sendall(_b64(b"pass\0word").encode() + b"\r\n")
            out.append(read_reply(sock))
            sock.sendall(b"AUTH LOGIN\r\n")
            read_reply(sock)
            sock.sendall(b"YWxpY2U=\nrest-of-the-line\r\n")  # a bare LF
            out.append(read_reply(sock))
            # Still a usable session: the right credentials work afterwards.
            sock.sendall(b"AUTH PLAIN " + _b64(b"\0alice\0" + PASSWORD.encode()).encode() + b"\r\n")
            out.append(read_reply(sock))
            sock.close()
            return out
        replies = await sub.in_thread(run)
        codes = [r[:3] for r in replies]
        assert codes == ["501", "501", "501", "504", "501", "334", "501", "500", "535", "500",
                         "235"], replies
        assert "Authentication aborted" in replies[6]
        log = sub.op.log()
        assert PASSWORD not in log and "pass\\x00word" not in log
        assert "Traceback" not in log
    finally:
        await sub.op.stop()


async def test_users_file_changes_while_running(tmp_path: Path) -> None:
    sub = Submission(tmp_path, listener={"auth_failure_limit": 100})
    await sub.add_user("alice", "--allowed-from", "*")
    await sub.start()
    try:
        await sub.add_user("bob", "--allowed-from", "*", password="bobs-password")
        await sub.in_thread(lambda: sub.smtp(login=("bob", "bobs-password")).quit())
        changed = await sub.op.cli("user", "passwd", "bob", stdin="new-password\n")
        assert changed.code == 0
        with pytest.raises(smtplib.SMTPAuthenticationError):
            await sub.in_thread(lambda: sub.smtp(login=("bob", "bobs-password")))
        await sub.in_thread(lambda: sub.smtp(login=("bob", "new-password")).quit())
        assert (await sub.op.cli("user", "remove", "bob")).code == 0
        with pytest.raises(smtplib.SMTPAuthenticationError):
            await sub.in_thread(lambda: sub.smtp(login=("bob", "new-password")))
        assert "users_file" in sub.op.log() and "re-read" in sub.op.log()
    finally:
        await sub.op.stop()


async def test_sighup_swaps_the_certificate_open_sessions_finish(tmp_path: Path) -> None:
    sub = Submission(tmp_path)
    await sub.add_user("alice", "--allowed-from", "@example.com")
    await sub.start()
    try:
        def subject(sock: ssl.SSLSocket) -> str:
            cert = sock.getpeercert()
            assert cert is not None
            return str(dict(x[0] for x in cert["subject"])["commonName"])  # type: ignore[index]
        old_session = await sub.in_thread(sub.smtp)
        old_implicit = await sub.in_thread(sub.smtps)
        assert subject(old_session.sock) == "first" and subject(old_implicit.sock) == "first"
        sub.certs.issue("renewed")
        sub.op.relay.signal(signal.SIGHUP)
        await wait_until(lambda: sub.op.log().count("TLS certificate re-read") >= 2, 20,
                         "the certificates to be re-read")
        new_session = await sub.in_thread(sub.smtp)
        new_implicit = await sub.in_thread(sub.smtps)
        assert subject(new_session.sock) == "renewed"
        assert subject(new_implicit.sock) == "renewed"
        # The sessions opened before the renewal still finish their mail.
        await sub.in_thread(old_session.sendmail, "app@example.com", ["user@example.net"], MESSAGE)
        old_implicit.ehlo("x")
        old_implicit.login("alice", PASSWORD)
        await sub.in_thread(old_implicit.sendmail, "app@example.com", ["user@example.net"], MESSAGE)
        for s in (old_session, old_implicit, new_session, new_implicit):
            s.quit()
        await _delivered(sub, 2)
    finally:
        await sub.op.stop()


async def test_user_cap_mail_waits_and_is_released(tmp_path: Path) -> None:
    sub = Submission(tmp_path, alerts={"events": ["user_limit_reached"]})
    await sub.add_user("cron", "--allowed-from", "@example.com", "--daily-cap", "2")
    await sub.start()
    try:
        def send(n: int) -> None:
            s = sub.smtp(login=("cron", PASSWORD))
            for _ in range(n):
                s.sendmail("app@example.com", ["user@example.net"], MESSAGE)
            s.quit()
        await sub.in_thread(send, 3)
        await _delivered(sub, 2)
        # The outbox has a message's .eml before relayd logs its delivery and lets its spool
        # file go: wait until the third is the only message left in the queue.
        async def one_left() -> list[dict[str, Any]] | None:
            rows = await sub.op.queue()
            return rows if len(rows) == 1 else None
        left: list[dict[str, Any]] = await wait_until(one_left, 20, "the two delivered to leave the queue",
                                                      interval=0.1)
        (third,) = left
        row = await sub.op.wait_entry(third["id"], "the third message to wait for cron's cap",
                                      lambda r: r["last_error"] == "waiting for the daily_cap "
                                      "of user cron")
        assert row["user"] == "cron" and row["attempts"] == 0
        show = await sub.op.cli("queue", "show", row["id"])
        assert "user:         cron (sasl_method=PLAIN)" in show.out  # smtplib's first choice
        log = sub.op.log()
        assert "user_limit_reached cron 90%" in log and "user_limit_reached cron 100%" in log
        # relayd looks at mail waiting for its user's cap again after 5 s while the deliveries
        # that fill the cap are under way (not counted yet), after up to 300 s once they are
        # counted. Raise the cap only once the message is in the long wait: a look due sooner
        # could read the raised cap and deliver it before `queue retry` does (which then finds
        # no such message and exits 1).
        await sub.op.wait_entry(row["id"], "the third to wait the long way for cron's cap",
                                lambda r: r["last_error"] == row["last_error"] and _due_in(r) > 60)
        # The operator raises the cap and releases the mail.
        text = sub.users_file.read_text().replace("daily_cap: 2", "daily_cap: 10")
        sub.users_file.write_text(text)
        assert (await sub.op.cli("queue", "retry", row["id"])).code == 0
        await _delivered(sub, 3)

        async def empty() -> bool:
            return await sub.op.queue() == []
        await wait_until(empty, 20, "the third to leave the queue", interval=0.1)
    finally:
        await sub.op.stop()


async def test_user_commands_and_check_config(tmp_path: Path) -> None:
    sub = Submission(tmp_path)
    added = await sub.op.cli("user", "add", "gen", "--allowed-from", "@example.com",
                             "--daily-cap", "100", "--rate", "10/m", "--priority", "--generate")
    assert added.code == 0
    generated = added.out.rsplit(" ", 1)[-1].strip()
    assert len(generated) >= 20
    assert stat.S_IMODE(os.stat(sub.users_file).st_mode) == 0o640
    assert (await sub.op.cli("user", "add", "gen", stdin="x\n")).code == 1
    assert (await sub.op.cli("user", "add", "bad name", stdin="x\n")).code == 1
    assert (await sub.op.cli("user", "passwd", "nobody", stdin="x\n")).code == 1
    assert (await sub.op.cli("user", "remove", "nobody")).code == 1
    listed = await sub.op.cli("user", "list", "--json")
    assert listed.code == 0
    assert json.loads(listed.out) == [{"name": "gen", "allowed_from": ["@example.com"],
                                       "daily_cap": 100, "rate": "10/m", "priority": True,
                                       "disabled": False}]
    assert generated not in listed.out and "scrypt" not in listed.out
    assert generated not in sub.users_file.read_text()
    assert (await sub.op.cli("check-config")).out.strip() == "config OK"
    os.chmod(sub.users_file, 0o644)
    refused = await sub.op.cli("check-config")
    assert refused.code == 1 and "users_file: is readable by every user" in refused.out
    assert (await sub.op.cli("user", "list")).code == 1


async def test_check_config_refuses_auth_without_tls(tmp_path: Path) -> None:
    sub = Submission(tmp_path)
    text = sub.op.config.read_text()
    import yaml
    data = yaml.safe_load(text)
    data["submission"][0] = {"listen": "0.0.0.0:587", "tls": "none"}
    del data["users_file"]
    sub.op.config.write_text(yaml.safe_dump(data))
    result = await sub.op.cli("check-config")
    assert result.code == 1
    assert "submission[0].tls: must be starttls or implicit" in result.out
    assert "users_file: is required with submission" in result.out


async def test_a_route_by_user_takes_that_users_mail_only(tmp_path: Path) -> None:
    """routes[].match.user (issue 19) matches the user that authenticated on the submission
    listener (issue 18); local mail and other users' mail take the default route."""
    cron_box = tmp_path / "cron-outbox"
    sub = Submission(tmp_path, smarthosts=[{"name": "cronbox", "outbox": str(cron_box)}],
                     routes=[{"name": "cron", "match": {"user": ["cron"]}, "smarthosts": ["cronbox"]}])
    await sub.add_user("alice", "--allowed-from", "@example.com")
    await sub.add_user("cron", "--allowed-from", "@example.com")
    await sub.start()
    try:
        def send(user: str) -> None:
            s = sub.smtp(login=(user, PASSWORD))
            s.sendmail(f"{user}@example.com", ["user@example.net"], MESSAGE)
            s.quit()
        await sub.in_thread(send, "cron")
        await sub.in_thread(send, "alice")
        await sub.op.send(sender="local@example.com")  # the loopback listener: no user
        await wait_until(lambda: len(list(cron_box.glob("*.eml"))) == 1, 20, "cron's mail")
        await _delivered(sub, 2)
        def routes() -> list[str]:
            return sorted(line.split("route=")[1].split(",")[0] for line in sub.op.log().splitlines()
                          if ": to=<" in line)
        # The .eml file is written before the delivery line is logged: wait for the lines.
        await wait_until(lambda: len(routes()) == 3, 20, "three delivery lines")
        assert routes() == ["cron", "default", "default"]
        assert b"cron@example.com" in next(cron_box.glob("*.eml")).read_bytes()
    finally:
        assert await sub.op.stop() == 0
