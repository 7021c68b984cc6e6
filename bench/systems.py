"""The systems under test of ``relay_bench.py``: relayd (``relayd run`` with a temporary config,
plain or with the ``policy`` scenario's settings) and Postfix (``bench/postfix.py``), plain or
with OpenDKIM as a milter on its smtpd (``bench/opendkim.py``).

The ``policy`` scenario is exactly the configuration of issue 15: ``sender.from`` and
``sender.reply_to`` with ``mode: missing``, ``headers.add`` / ``headers.remove`` and ``dkim`` with a
2048-bit RSA key (relaxed/relaxed). Its Postfix peer signs with the same key and
canonicalization through OpenDKIM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from opendkim import OpenDkimMilter
from postfix import PostfixRelay, free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH_DOMAIN = "bench.example"  # load.py and smtp-source send From: load@bench.example
SELECTOR = "bench"

RELAYD_CONFIG = """\
hostname: relayd.bench.example
listen: ["127.0.0.1:{port}"]
allowed_clients: ["127.0.0.0/8"]
max_message_size: 25MB
spool: {{path: {spool}}}
state_dir: {state}
secrets: {{key_file: {state}/secret.key}}
smarthosts:
  - name: sink
    host: 127.0.0.1
    port: {sink_port}
    tls: none
    auth: {{method: none}}
    max_connections: {connections}
logging: {{level: {log_level}, format: text}}
"""


# The policy scenario (issue 15): what a sysadmin turns on for an application's mail.
POLICY_CONFIG = """\
sender:
  from: {{address: noreply@bench.example, name: Bench, mode: missing}}
  reply_to: {{address: support@bench.example, mode: missing}}
headers:
  add: {{X-Relayd-Bench: policy}}
  remove: [X-Mailer]
dkim:
{dkim}"""

# ``dkim:`` entries by scenario: the RSA-2048, Ed25519 alone (RFC 8463) and both side
# by side (dual signing, as providers recommend while receivers adopt Ed25519).
DKIM_RSA = "  - {{domain: bench.example, selector: bench, private_key_file: {key}}}\n"
DKIM_ED25519 = ("  - {{domain: bench.example, selector: bench-ed, algorithm: ed25519-sha256, "
                "private_key_file: {key}}}\n")


def dkim_entries(kind: str, rsa: Path, ed25519: Path | None) -> str:
    """The ``dkim:`` list for ``kind``: rsa, ed25519 or dual."""
    out = DKIM_RSA.format(key=rsa) if kind in ("rsa", "dual") else ""
    if kind in ("ed25519", "dual"):
        assert ed25519 is not None
        out += DKIM_ED25519.format(key=ed25519)
    return out


def ed25519_key(path: Path) -> Path:
    """A fresh Ed25519 key (PEM, 0600) at ``path``."""
    if not path.exists():
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(path)],
                       check=True, capture_output=True)
        path.chmod(0o600)
    return path


def dkim_key(path: Path) -> Path:
    """A fresh 2048-bit RSA key (PEM, 0600) at ``path``, the same for relayd and OpenDKIM."""
    if not path.exists():
        subprocess.run(["openssl", "genrsa", "-out", str(path), "2048"], check=True,
                       capture_output=True)
        path.chmod(0o600)
    return path


def rollup_mb(text: str) -> dict[str, float]:
    """RSS, PSS, and the anonymous and file-backed parts of RSS, in MB, from the text of
    ``/proc/PID/smaps_rollup``."""
    kb: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            kb[name] = int(value.split()[0])
    rss, anon = kb.get("Rss", 0), kb.get("Anonymous", 0)
    return {"rss": rss / 1024, "pss": kb.get("Pss", 0) / 1024, "anon": anon / 1024,
            "file": (rss - anon) / 1024}


# -- the systems under test --------------------------------------------------------------------

def wait_banner(port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the relay exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.settimeout(5)
            if s.recv(100).startswith(b"220"):
                s.sendall(b"QUIT\r\n")
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing answered on port {port}")


class Relayd:
    name = "relayd"

    def __init__(self, workdir: Path, sink_port: int, connections: int,
                 profile: Path | None = None, profile_name: str = "", log_level: str = "info",
                 tree: Path = ROOT, name: str = "relayd", policy_key: Path | None = None,
                 dkim: str = "rsa", ed25519_key: Path | None = None,
                 extra_config: str = "") -> None:
        self.name = name
        self.tree = tree  # the checkout whose relayd runs (another one for --baseline)
        self.workdir = workdir
        self.port = free_port()
        self.config = workdir / "relayd.yaml"
        (workdir / "state").mkdir(parents=True, exist_ok=True)
        self.config.write_text(RELAYD_CONFIG.format(
            port=self.port, spool=workdir / "spool", state=workdir / "state", sink_port=sink_port,
            connections=connections, log_level=log_level)
            + (POLICY_CONFIG.format(dkim=dkim_entries(dkim, policy_key, ed25519_key))
               if policy_key is not None else "")
            + extra_config)
        self.log = workdir / "relayd.log"
        self.profile = profile
        self.profile_name = profile_name
        self.proc: subprocess.Popen[bytes] | None = None
        self.spy: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(self.tree)}
        if "shared_state:" in self.config.read_text():
            subprocess.run([sys.executable, "-m", "relayd", "-c", str(self.config), "shared-state",
                            "migrate"], env=env, cwd=self.tree, check=True, capture_output=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "relayd", "-c", str(self.config),
                                          "run"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.tree)
        wait_banner(self.port, proc=self.proc)

    def start_profile(self) -> None:
        if self.profile is None or self.proc is None:
            return
        self.profile.mkdir(parents=True, exist_ok=True)
        out = self.profile / f"{self.profile_name}.txt"
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.spy = subprocess.Popen([spy, "record", "--pid", str(self.proc.pid), "--threads", "--subprocesses",
                                     "--rate", "100", *os.environ.get("BENCH_PYSPY_ARGS", "").split(), "--format", "raw", "--output", str(out)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop_profile(self) -> None:
        if self.spy is not None:
            self.spy.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.spy.wait(30)
            self.spy = None

    def pids(self) -> list[int]:
        """relayd run and its delivery process (relayd/daemon/child.py), if it has one."""
        assert self.proc is not None
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            kids = []
        return [self.proc.pid, *map(int, kids)]

    def proc_status(self, pid: int | None = None) -> dict[str, str]:
        assert self.proc is not None
        out = {}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid or self.proc.pid}/status").read_text().splitlines():
                k, _, v = line.partition(":")
                out[k] = v.strip()
        return out

    @staticmethod
    def _ticks(path: str) -> tuple[int, int]:
        try:
            fields = Path(path).read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0, 0
        return int(fields[11]), int(fields[12])

    def cpu_seconds(self) -> float:
        """Both processes (a process's stat counts all its threads)."""
        return sum(sum(self._ticks(f"/proc/{pid}/stat")) for pid in self.pids()) / os.sysconf("SC_CLK_TCK")

    def main_thread_cpu_seconds(self) -> float:
        """CPU of the event-loop threads alone (the spool's I/O threads excluded)."""
        return sum(sum(self._ticks(f"/proc/{pid}/task/{pid}/stat"))
                   for pid in self.pids()) / os.sysconf("SC_CLK_TCK")

    def cpu_split(self) -> dict[str, float]:
        """User and system CPU seconds of the loop threads and of all other threads."""
        out = {"loop_user": 0.0, "loop_sys": 0.0, "threads_user": 0.0, "threads_sys": 0.0}
        tck = os.sysconf("SC_CLK_TCK")
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for tid in os.listdir(f"/proc/{pid}/task"):
                    user, system = self._ticks(f"/proc/{pid}/task/{tid}/stat")
                    who = "loop" if int(tid) == pid else "threads"
                    out[f"{who}_user"] += user / tck
                    out[f"{who}_sys"] += system / tck
        return out

    def rss_mb(self) -> float:
        """Resident memory of both processes now."""
        return sum(int(self.proc_status(pid).get("VmRSS", "0 kB").split()[0]) for pid in self.pids()) / 1024

    def peak_rss_mb(self) -> float:
        """Sum of each process's peak (VmHWM): an upper bound of the peak of the sum."""
        return sum(int(self.proc_status(pid).get("VmHWM", "0 kB").split()[0]) for pid in self.pids()) / 1024

    def memory_now(self) -> dict[str, dict[str, float]]:
        """Each process's resident (RSS) and proportional (PSS) memory now, in MB. PSS counts a
        page shared by the two processes (libraries, the interpreter) half in each, so the sum
        of PSS is the memory the pair occupies; the sum of RSS counts shared pages twice."""
        out: dict[str, dict[str, float]] = {}
        for i, pid in enumerate(self.pids()):
            fields: dict[str, float] = {}
            with contextlib.suppress(OSError):
                fields = rollup_mb(Path(f"/proc/{pid}/smaps_rollup").read_text())
            out["accepting" if i == 0 else "delivery"] = fields
        return out

    def queue_left(self) -> int:
        n = 0
        for state in ("queued", "active"):
            with contextlib.suppress(FileNotFoundError):
                n += len(os.listdir(self.workdir / "spool" / state))
        return n

    def stop(self) -> None:
        self.stop_profile()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Postfix:
    name = "postfix"

    def __init__(self, workdir: Path, sink_port: int, dkim_key: Path | None = None) -> None:
        self.workdir = workdir
        self.milter = (OpenDkimMilter(workdir / "opendkim", BENCH_DOMAIN, SELECTOR, dkim_key)
                       if dkim_key is not None else None)
        if self.milter is not None:
            self.name = "postfix+opendkim"
        self.relay = PostfixRelay(workdir, sink_port,
                                  milter=self.milter.socket if self.milter else None)
        self.port = self.relay.port

    def start(self) -> None:
        if self.milter is not None:
            self.milter.start()
        self.relay.start()

    def start_profile(self) -> None:
        pass

    def stop_profile(self) -> None:
        pass

    def cpu_seconds(self) -> float:
        return 0.0

    def main_thread_cpu_seconds(self) -> float:
        return 0.0

    def cpu_split(self) -> dict[str, float]:
        return {}

    def peak_rss_mb(self) -> float:
        return 0.0

    def memory_now(self) -> dict[str, dict[str, float]]:
        return {}

    def queue_left(self) -> int:
        return self.relay.queue_size()

    def stop(self) -> None:
        self.relay.stop()
        if self.milter is not None:
            self.milter.stop()


