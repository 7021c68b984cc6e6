"""OpenDKIM (the Debian ``opendkim`` package) as a signing milter for the benchmark's Postfix.

``OpenDkimMilter(workdir, domain, selector, key)`` writes its own ``opendkim.conf`` into
``workdir`` and runs ``opendkim -f -x CONF`` in the foreground as a child process, which
``stop()`` ends by its PID: nothing under ``/etc/opendkim`` or the system service is used.
It signs mail from ``domain`` with ``key`` (rsa-sha256, relaxed/relaxed, as relayd does) for
clients on 127.0.0.0/8, and verifies nothing (``Mode s``). Postfix reaches it at
``self.socket`` (``smtpd_milters``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

from postfix import free_port

OPENDKIM = "/usr/sbin/opendkim"

CONF = """\
Mode                    s
Domain                  {domain}
Selector                {selector}
KeyFile                 {key}
Canonicalization        relaxed/relaxed
SignatureAlgorithm      rsa-sha256
InternalHosts           127.0.0.0/8
Socket                  inet:{port}@127.0.0.1
PidFile                 {workdir}/opendkim.pid
Syslog                  no
Background              no
UMask                   007
# The key sits in a temporary directory under /tmp (world-writable, sticky), which
# OpenDKIM otherwise refuses; the key file itself is 0600.
RequireSafeKeys         false
"""


class OpenDkimMilter:
    """One private OpenDKIM process, signing."""

    def __init__(self, workdir: Path, domain: str, selector: str, key: Path) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self.socket = f"inet:127.0.0.1:{self.port}"
        self.conf = self.workdir / "opendkim.conf"
        self.domain, self.selector, self.key = domain, selector, key
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(domain=self.domain, selector=self.selector,
                                         key=self.key, port=self.port, workdir=self.workdir))
        log = open(self.workdir / "opendkim.log", "wb")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen([OPENDKIM, "-f", "-x", str(self.conf)], stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"opendkim exited with {self.proc.returncode}: "
                                   + (self.workdir / "opendkim.log").read_text(errors="replace"))
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
                return
            time.sleep(0.05)
        raise RuntimeError(f"opendkim did not listen on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def available() -> str | None:
    """None when OpenDKIM can run here, else why not."""
    if not os.path.exists(OPENDKIM):
        return f"{OPENDKIM} not found (apt-get install opendkim)"
    return None
