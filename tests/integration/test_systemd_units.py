"""The shipped systemd units, checked by systemd's own tools.

systemd-analyze is required (``make test`` installs the systemd package): a missing tool makes
these tests fail, never skip. ``verify`` checks that ExecStart= binaries exist; relayd is not
installed at /usr/local/bin on a test machine, so the units are verified from a temporary copy
whose command paths point at a stand-in executable. Everything else is verified unchanged.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze not found: install the 'systemd' package (make test does)"
    return tool


def _copy_units(tmp_path: Path) -> Path:
    stand_in = tmp_path / "bin" / "relayd"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    out = tmp_path / "units"
    out.mkdir()
    service = (UNITS / "relayd.service").read_text()
    assert "/usr/local/bin/relayd " in service
    (out / "relayd.service").write_text(service.replace("/usr/local/bin/relayd", str(stand_in)))
    shutil.copy(UNITS / "relayd.socket", out / "relayd.socket")
    return out


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = _copy_units(tmp_path)
    r = subprocess.run([_analyze(), "verify", str(units / "relayd.service"), str(units / "relayd.socket")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # Unknown directives and bad values are reported as warnings without failing the exit code.
    assert "relayd.s" not in r.stderr, r.stderr


def test_hardening_scores_ok(tmp_path: Path) -> None:
    units = _copy_units(tmp_path)
    r = subprocess.run([_analyze(), "security", "--offline=yes", str(units / "relayd.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    m = re.search(r"Overall exposure level for relayd\.service: (\d+\.\d+) (\w+)", r.stdout)
    assert m, r.stdout
    assert float(m.group(1)) <= 1.5 and m.group(2) == "OK", m.group(0)


def test_service_contract() -> None:
    text = (UNITS / "relayd.service").read_text()
    for line in ("Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID",
                 "User=relayd", "StateDirectory=relayd", "ConfigurationDirectory=relayd",
                 "ReadWritePaths=/var/spool/relayd", "RestartPreventExitStatus=78",
                 "Requires=relayd.socket", "CapabilityBoundingSet=\n"):
        assert line in text, line
    sock = (UNITS / "relayd.socket").read_text()
    assert "ListenStream=127.0.0.1:25\n" in sock and "ListenStream=[::1]:25\n" in sock


def test_sysusers_and_tmpfiles_create_user_and_spool(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib/sysusers.d").mkdir(parents=True)
    (root / "usr/lib/tmpfiles.d").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy(UNITS / "relayd.sysusers", root / "usr/lib/sysusers.d/relayd.conf")
    shutil.copy(UNITS / "relayd.tmpfiles", root / "usr/lib/tmpfiles.d/relayd.conf")
    sysusers = shutil.which("systemd-sysusers")
    tmpfiles = shutil.which("systemd-tmpfiles")
    assert sysusers and tmpfiles, "systemd-sysusers/systemd-tmpfiles missing (package systemd)"
    r = subprocess.run([sysusers, f"--root={root}", "relayd.conf"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    passwd = (root / "etc/passwd").read_text()
    entry = next(line for line in passwd.splitlines() if line.startswith("relayd:"))
    uid = int(entry.split(":")[2])
    assert entry.endswith(":/var/spool/relayd:/usr/sbin/nologin")
    r = subprocess.run([tmpfiles, "--create", f"--root={root}", "relayd.conf"], capture_output=True,
                       text=True, timeout=60)
    spool = root / "var/spool/relayd"
    assert spool.is_dir(), r.stderr
    assert spool.stat().st_mode & 0o777 == 0o750
    if os.geteuid() == 0:  # only root can hand the directory to the relayd user
        assert r.returncode == 0, r.stderr
        assert spool.stat().st_uid == uid
