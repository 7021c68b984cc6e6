"""A throwaway PostgreSQL cluster for the fleet tests: ``initdb`` in a temporary directory,
``pg_ctl`` on an ephemeral port, listening on 127.0.0.1 only, stopped by PID.

PostgreSQL refuses to run as root: as root, the cluster's directory belongs to the
``postgres`` system user (Debian's package creates it) or else ``nobody``, and the server
runs as that user. Password authentication (scram) for the ``relayd`` role, so the tests
exercise ``shared_state.password``; the superuser connects over the socket with trust.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.relay import free_port

PASSWORD = "fleet-pw-3d1c"  # the relayd role's password (tests check it never appears in output)


def pg_bin(name: str) -> str:
    """A PostgreSQL server binary: Debian keeps them under /usr/lib/postgresql/N/bin."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found: install Debian's postgresql package "
                           "(make sysdeps does)")
    return path


def _run_as() -> tuple[pwd.struct_passwd | None]:
    if os.geteuid() != 0:
        return (None,)
    for name in ("postgres", "nobody"):
        try:
            return (pwd.getpwnam(name),)
        except KeyError:
            continue
    raise RuntimeError("running as root and no postgres or nobody user to run PostgreSQL as")


@dataclass
class Cluster:
    """One running cluster with a ``relayd`` database owned by the ``relayd`` role."""

    directory: Path
    port: int
    user: pwd.struct_passwd | None

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def url(self) -> str:
        return f"postgresql://relayd@127.0.0.1:{self.port}/relayd"

    def _cmd(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        def demote() -> None:
            if self.user is not None:
                os.setgid(self.user.pw_gid)
                os.setuid(self.user.pw_uid)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self.directory)}
        done = subprocess.run(list(argv), preexec_fn=demote, env=env, capture_output=True,
                              text=True, timeout=timeout, cwd=self.directory)
        if check and done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def init(self) -> None:
        if self.user is not None:
            os.chown(self.directory, self.user.pw_uid, self.user.pw_gid)
        self.directory.chmod(0o700)
        self._cmd(pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as fh:
            fh.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                     f"unix_socket_directories = '{self.directory}'\nfsync = off\n"
                     "max_connections = 50\n")

    def start(self) -> None:
        self._cmd(pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.directory / "server.log"),
                  "-w", "-t", "60", "start")

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Fast shutdown (open connections are cut, as when a database host goes down),
        waiting for the postmaster to exit; SIGKILL by PID if it does not."""
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGINT)  # pg_ctl's "fast" mode
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)  # waiting for an exiting process, not for readiness
        os.kill(pid, signal.SIGKILL)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def psql(self, sql: str, db: str = "relayd") -> str:
        out = self._cmd(pg_bin("psql"), "-h", str(self.directory), "-p", str(self.port), "-U",
                        "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql)
        return out.stdout.strip()

    def create_relayd(self) -> None:
        """The role and database as docs/fleet.md sets them up."""
        self.psql(f"CREATE ROLE relayd LOGIN PASSWORD '{PASSWORD}'", db="postgres")
        self.psql("CREATE DATABASE relayd OWNER relayd", db="postgres")

    def reset(self) -> None:
        """A fresh relayd database (between tests sharing the cluster)."""
        self.psql("DROP DATABASE IF EXISTS relayd WITH (FORCE)", db="postgres")
        self.psql("CREATE DATABASE relayd OWNER relayd", db="postgres")


def start_cluster() -> Cluster:
    """A new cluster in its own directory under /tmp (pytest's tmp_path is root's, mode
    0700, which the postgres user cannot enter); remove it with ``destroy``."""
    (user,) = _run_as()
    directory = Path(tempfile.mkdtemp(prefix="relayd-pg-"))
    cluster = Cluster(directory, free_port(), user)
    cluster.init()
    cluster.start()
    cluster.create_relayd()
    return cluster
