"""A real Debian Postfix as the smarthost for interop tests, in its own throw-away instance.

``PostfixSmarthost`` writes a private ``main.cf``/``master.cf`` (own config, queue and data
directories, an ``smtpd`` on an ephemeral 127.0.0.1 port, ``maillog_file`` since there is no
syslog), starts it with ``postfix -c DIR start`` and always stops it. Every message Postfix
accepts is put on its **hold** queue (``smtpd_data_restrictions = check_client_access
static:HOLD``): it is stored by Postfix's cleanup exactly as it would be for delivery, and stays
there, so a test reads back what Postfix stored with ``postqueue -j`` and ``postcat``.

Start it once per test module (starting Postfix takes about two seconds of integrity checks);
each test finds its own message by the queue ID Postfix returned. Options: ``tls`` (``smtpd_tls_security_level = encrypt`` with a trustme certificate for
127.0.0.1; ``ca_file`` is the CA to trust) and ``auth`` (SMTP AUTH PLAIN/LOGIN through
Postfix's Dovecot SASL client; the Dovecot side is ``FakeDovecotAuth`` below, a few lines of
the documented Dovecot auth protocol served from a thread, because neither Dovecot nor
saslpasswd2 is installed).
With ``auth``, relaying requires authentication (``permit_sasl_authenticated`` only).
``main``: more ``main.cf`` settings (e.g. ``smtpd_recipient_limit``), applied last.

Postfix's daemons run as ``postfix`` and must reach the queue directory, so the instance lives
in a world-traversable directory under /tmp (pytest's tmp_path is root-only), removed on stop.
Needs root (the master process starts as root) and the ``postfix`` Debian package; without
either, ``require_postfix`` fails the test with a message naming the fix.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import shutil
import signal
import socketserver
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.support.ports import free_port
from tests.support.smtpclient import smtp_greets
from tests.support.waiting import wait_until_sync

POSTFIX = Path("/usr/sbin/postfix")
HOSTNAME = "smarthost.test.example"


def require_postfix() -> None:
    """Fail (never skip) when the test cannot run Postfix here."""
    missing = [p for p in ("/usr/sbin/postfix", "/usr/sbin/postqueue", "/usr/sbin/postcat")
               if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"Debian package 'postfix' is not installed ({', '.join(missing)} missing): "
                    "run 'make test' (tests/support/install-sysdeps.sh) or "
                    "'apt-get install postfix'", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the Postfix interop test must run as root: Postfix's master process "
                    "starts as root and drops to the 'postfix' user", pytrace=False)
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        pytest.fail("user 'postfix' is missing: reinstall the Debian package 'postfix'",
                    pytrace=False)


@dataclass(frozen=True)
class Held:
    """One message on Postfix's hold queue."""

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    content: bytes  # header + body as Postfix stored it (its own Received line first)


# master.cf: only the services an smtpd -> cleanup -> hold queue set-up uses; no chroot (the
# chroot would need copies of /etc files in the queue directory).
_MASTER_CF = """\
{listen} inet n - n - - smtpd
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
tlsmgr    unix - - n 1000? 1 tlsmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixSmarthost:
    """A private Postfix instance; use as a context manager (stops and cleans up on exit)."""

    def __init__(self, *, tls: bool = False, credentials: tuple[str, str] | None = None,
                 main: dict[str, str] | None = None) -> None:
        require_postfix()
        self.extra_main = dict(main or {})
        self.tls = tls
        self.credentials = credentials
        self.host = "127.0.0.1"
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="relayd-postfix-", dir="/tmp"))
        self.root.chmod(0o755)  # postfix-owned daemons must traverse it
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.maillog = self.root / "maillog"
        self.ca_file: Path | None = None
        # Postfix's Dovecot SASL client connects here (FakeDovecotAuth listens).
        self.auth_socket = self.root / "auth" if credentials else None
        self.auth: FakeDovecotAuth | None = None
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> PostfixSmarthost:
        try:
            self._write_config()
            if self.credentials is not None and self.auth_socket is not None:
                self.auth = FakeDovecotAuth(self.auth_socket, *self.credentials)
            self._run("start")
            self._started = True
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        try:
            if self._started:
                subprocess.run([str(POSTFIX), "-c", str(self.config_dir), "stop"],
                               capture_output=True, timeout=30, check=False)
                self._kill_leftover_master()
            if self.auth is not None:
                self.auth.close()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_leftover_master(self) -> None:
        """If ``postfix stop`` failed, end this instance's master (by its pid file) anyway."""
        pid_file = self.queue_dir / "pid" / "master.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)

    def _write_config(self) -> None:
        postfix = pwd.getpwnam("postfix")
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            d.mkdir()
        # data_directory must belong to mail_owner; queue subdirectories are created and
        # owned correctly by postfix-script on start (queue_directory itself stays root's).
        os.chown(self.data_dir, postfix.pw_uid, -1)
        self.data_dir.chmod(0o700)
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": HOSTNAME,
            "mydomain": "test.example",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "relay_domains": "",
            "mynetworks": "127.0.0.0/8",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.root),
            "smtpd_banner": "$myhostname ESMTP Postfix",
            # Keep every accepted message on the hold queue, stored but never delivered.
            "smtpd_data_restrictions": "check_client_access static:HOLD",
        }
        if self.tls:
            ca = trustme.CA()
            self.ca_file = self.root / "ca.pem"
            ca.cert_pem.write_to_path(str(self.ca_file))
            cert = ca.issue_cert("127.0.0.1", "localhost", HOSTNAME)
            key_file, cert_file = self.config_dir / "key.pem", self.config_dir / "cert.pem"
            cert.private_key_pem.write_to_path(str(key_file))
            key_file.chmod(0o600)  # read by smtpd while still root
            cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
            main.update({
                "smtpd_tls_security_level": "encrypt",  # no MAIL before STARTTLS
                "smtpd_tls_chain_files": f"{key_file}, {cert_file}",
                "smtpd_tls_received_header": "yes",
                "smtpd_tls_loglevel": "1",
            })
        if self.auth_socket is not None:
            main.update({
                "smtpd_sasl_auth_enable": "yes",
                "smtpd_sasl_type": "dovecot",
                "smtpd_sasl_path": str(self.auth_socket),
                "smtpd_tls_auth_only": "yes" if self.tls else "no",
                # Only authenticated clients may relay: a message on the hold queue proves
                # that AUTH succeeded.
                "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
            })
        main.update(self.extra_main)
        text = "".join(f"{k} = {v}\n" for k, v in main.items())
        (self.config_dir / "main.cf").write_text(text)
        (self.config_dir / "master.cf").write_text(
            _MASTER_CF.format(listen=f"{self.host}:{self.port}"))

    def _run(self, command: str) -> None:
        run = subprocess.run([str(POSTFIX), "-c", str(self.config_dir), command],
                             capture_output=True, text=True, timeout=60, check=False)
        if run.returncode != 0:
            raise AssertionError(f"postfix {command} failed ({run.returncode}): "
                                 f"{run.stdout}{run.stderr}\n--- maillog ---\n{self.log()}")

    def _wait_listening(self, timeout: float = 15.0) -> None:
        wait_until_sync(lambda: smtp_greets(self.port, self.host, timeout=2), timeout,
                        lambda: f"Postfix to answer on port {self.port}:\n{self.log()}", interval=0.05)

    # -- what Postfix stored ------------------------------------------------------------------
    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def held(self) -> list[Held]:
        """The messages on the hold queue, with their content (blocking; use a thread)."""
        run = subprocess.run(["/usr/sbin/postqueue", "-c", str(self.config_dir), "-j"],
                             capture_output=True, text=True, timeout=30, check=True)
        out: list[Held] = []
        for line in run.stdout.splitlines():
            item = json.loads(line)
            if item["queue_name"] != "hold":
                continue
            content = subprocess.run(
                ["/usr/sbin/postcat", "-c", str(self.config_dir), "-h", "-b", "-q", item["queue_id"]],
                capture_output=True, timeout=30, check=True).stdout
            out.append(Held(queue_id=item["queue_id"], sender=item["sender"],
                            recipients=tuple(r["address"] for r in item["recipients"]),
                            content=content))
        return out


class FakeDovecotAuth(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The server side of the Dovecot authentication protocol (version 1.2) for Postfix's
    ``smtpd_sasl_type = dovecot``: PLAIN and LOGIN against one user name and password, served
    from a thread. ``attempts`` records (mechanism, user, ok) per AUTH Postfix forwarded."""

    daemon_threads = True

    def __init__(self, path: Path, username: str, password: str) -> None:
        super().__init__(str(path), _DovecotAuthSession)
        path.chmod(0o666)  # smtpd runs as postfix
        self.username = username
        self.password = password
        self.attempts: list[tuple[str, str, bool]] = []
        self._thread = threading.Thread(target=self.serve_forever, name="fake-dovecot-auth",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(10)

    def verdict(self, rid: str, mech: str, user: str, password: str) -> bytes:
        ok = user == self.username and password == self.password
        self.attempts.append((mech, user, ok))
        return (f"OK\t{rid}\tuser={user}\n" if ok else f"FAIL\t{rid}\tuser={user}\n").encode()


class _DovecotAuthSession(socketserver.StreamRequestHandler):
    server: FakeDovecotAuth

    def handle(self) -> None:
        self.wfile.write(b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n"
                         b"SPID\t1\nCUID\t1\nCOOKIE\t" + b"0" * 32 + b"\nDONE\n")
        pending: dict[str, tuple[str, list[str]]] = {}  # id -> (mechanism, answers so far)
        for line in self.rfile:
            fields = line.decode().rstrip("\n").split("\t")
            if fields[0] == "AUTH":
                rid, mech = fields[1], fields[2].upper()
                resp = next((f[5:] for f in fields[3:] if f.startswith("resp=")), None)
                if mech == "PLAIN" and resp is not None:
                    self.wfile.write(self._plain(rid, resp))
                elif mech == "PLAIN":
                    pending[rid] = (mech, [])
                    self.wfile.write(f"CONT\t{rid}\t\n".encode())
                elif mech == "LOGIN":
                    pending[rid] = (mech, [])
                    self.wfile.write(f"CONT\t{rid}\t{_b64('Username:')}\n".encode())
                else:
                    self.wfile.write(f"FAIL\t{rid}\treason=unsupported mechanism\n".encode())
            elif fields[0] == "CONT" and fields[1] in pending:
                rid, data = fields[1], fields[2] if len(fields) > 2 else ""
                mech, answers = pending[rid]
                if mech == "PLAIN":
                    del pending[rid]
                    self.wfile.write(self._plain(rid, data))
                elif not answers:
                    answers.append(base64.b64decode(data).decode())
                    self.wfile.write(f"CONT\t{rid}\t{_b64('Password:')}\n".encode())
                else:
                    del pending[rid]
                    self.wfile.write(self.server.verdict(rid, "LOGIN", answers[0],
                                                         base64.b64decode(data).decode()))
            self.wfile.flush()

    def _plain(self, rid: str, resp: str) -> bytes:
        parts = base64.b64decode(resp).decode().split("\0")
        user, password = (parts[1], parts[2]) if len(parts) == 3 else ("", "")
        return self.server.verdict(rid, "PLAIN", user, password)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
