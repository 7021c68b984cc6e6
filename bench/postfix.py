"""Postfix (the Debian package) as a relay for the benchmark, in its own directories.

``PostfixRelay(workdir, sink_port)`` writes a ``main.cf`` and ``master.cf`` into
``workdir/etc`` (Postfix's ``config_directory``), with ``queue_directory`` and
``data_directory`` under ``workdir`` too, and runs ``postfix -c workdir/etc start``. Nothing
under ``/etc/postfix`` or ``/var/spool/postfix`` is read or changed, so it runs beside a
system Postfix (if any) without touching it.

What the configuration does, and why:

- ``relayhost = [127.0.0.1]:<sink>``: everything goes to the sink (brackets: no MX lookup).
- ``mydestination`` empty, ``local_transport = error:...``: no local delivery at all.
- ``mynetworks = 127.0.0.0/8`` and ``smtpd_relay_restrictions = permit_mynetworks, reject``:
  the load generator on 127.0.0.1 may relay; nothing else may.
- the smtpd service is ``127.0.0.1:<ephemeral port>`` in ``master.cf``; ``inet_interfaces =
  127.0.0.1``; ``inet_protocols = ipv4``.
- ``mail_owner = postfix``, ``setgid_group = postdrop``: Postfix refuses to run its daemons
  as root; the Debian package created both.
- ``maillog_file`` plus the ``postlog`` service: there is no syslog in a sandbox, so Postfix
  3.4+'s own logger writes to ``workdir/maillog``.
- every service with ``chroot = n``: a chroot would need copies of /etc files inside the
  temporary queue directory.
- durability is Postfix's default: ``cleanup`` fsyncs the queue file before smtpd answers
  250 (there is no switch to turn that off short of a RAM disk). Concurrency, connection
  caching, ``in_flow_delay`` and the rest are left at Postfix's defaults.
- with ``milter=``, ``smtpd_milters`` (OpenDKIM for the policy scenario, ``bench/opendkim.py``).
- TLS off both ways (``smtpd_tls_security_level = none``, ``smtp_tls_security_level = none``),
  as relayd's ``tls: none`` to the sink.

Running as root (as in the sandbox) is fine: ``postfix start`` drops privileges itself. As a
plain user it cannot start (the master needs root to set up the queue ownership).

Run by hand: ``python bench/postfix.py --sink-port N`` prints ``port <smtpd port>`` and keeps
Postfix up until SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.example
mydomain = bench.example
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{sink_port}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
smtpd_tls_security_level = none
smtp_tls_security_level = none
smtputf8_enable = yes
biff = no
append_dot_mydomain = no
readme_directory = no
maillog_file = {maillog}
maillog_file_prefixes = {workdir}
"""

# A milter on smtpd (OpenDKIM signing); a milter that fails tempfails the message rather than
# letting it through unsigned, so every counted message was signed.
MILTER_CF = """\
smtpd_milters = {milter}
non_smtpd_milters =
milter_default_action = tempfail
"""

# service type private unpriv chroot wakeup maxproc command
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def free_port() -> int:
    """A port that was free a moment ago (Postfix cannot report the port it bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def available() -> str | None:
    """None when Postfix can run here, else why not."""
    if not os.path.exists(POSTFIX):
        return f"{POSTFIX} not found (apt-get install postfix)"
    if os.geteuid() != 0:
        return "Postfix needs root to start its master process"
    return None


class PostfixRelay:
    """One private Postfix instance relaying to the sink."""

    def __init__(self, workdir: Path, sink_port: int, port: int | None = None,
                 milter: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.milter = milter  # e.g. inet:127.0.0.1:PORT of bench/opendkim.py
        self.sink_port = sink_port
        self.port = port or free_port()
        self.etc = self.workdir / "etc"
        self.queue = self.workdir / "queue"
        self.maillog = self.workdir / "maillog"

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "MAIL_CONFIG": str(self.etc)}
        return subprocess.run([POSTFIX, "-c", str(self.etc), *args], env=env, check=check,
                              capture_output=True, text=True, timeout=60)

    def configure(self) -> None:
        self.etc.mkdir(parents=True, exist_ok=True)
        # The postfix user must be able to reach data/ and queue/ (the parents must be too).
        self.workdir.chmod(0o755)
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        self.queue.mkdir(exist_ok=True)  # `postfix start` creates the subdirectories
        shutil.chown(data, "postfix")
        (self.etc / "main.cf").write_text(MAIN_CF.format(
            queue=self.queue, data=data, sink_port=self.sink_port, maillog=self.maillog,
            workdir=self.workdir)
            + (MILTER_CF.format(milter=self.milter) if self.milter else ""))
        (self.etc / "master.cf").write_text(MASTER_CF.format(port=self.port))
        # postfix-files and dynamicmaps.cf are read from config_directory by `postfix check`.
        for name in ("postfix-files", "dynamicmaps.cf"):
            src = Path("/etc/postfix") / name
            if src.exists():
                shutil.copy(src, self.etc / name)
        for name in ("postfix-files.d", "dynamicmaps.cf.d"):
            src = Path("/etc/postfix") / name
            if src.is_dir():
                shutil.copytree(src, self.etc / name, dirs_exist_ok=True)
        self.maillog.touch()

    def start(self, timeout: float = 30.0) -> None:
        self.configure()
        r = self._postfix("start", check=False)
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed: {r.stdout}{r.stderr}{self.log_tail()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1) as s:
                if s.recv(100).startswith(b"220"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"Postfix did not answer on port {self.port}: {self.log_tail()}")

    def stop(self) -> None:
        r = self._postfix("stop", check=False)
        if r.returncode != 0:
            self._postfix("abort", check=False)
        # The master exits after its children; wait for the pid file lock to go.
        pid_file = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, 0)
            except (OSError, ValueError, IndexError):
                return
            time.sleep(0.1)

    def queue_size(self) -> int:
        """Messages still in Postfix's queue (incoming + active + deferred)."""
        n = 0
        for sub in ("incoming", "active", "deferred", "maildrop"):
            for _root, _dirs, files in os.walk(self.queue / sub):
                n += len(files)
        return n

    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def main() -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--sink-port", type=int, required=True)
    p.add_argument("--workdir", type=Path)
    a = p.parse_args()
    why = available()
    if why:
        print(f"postfix: {why}")
        return 1
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="bench-postfix-"))
    relay = PostfixRelay(workdir, a.sink_port)
    relay.start()
    print(f"port {relay.port}", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        relay.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
