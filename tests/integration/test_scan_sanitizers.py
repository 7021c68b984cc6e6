"""relayd/_scan.c under AddressSanitizer and UndefinedBehaviorSanitizer: 20,000 random
cases (tests/support/scan_cases.py) with every Python allocation going through malloc, so an
out-of-bounds read or write on any buffer stops the run."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _gcc_file(name: str) -> str:
    return subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_c_scans_under_asan_and_ubsan(tmp_path: Path) -> None:
    so = tmp_path / "_scan.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                    f"-I{sysconfig.get_paths()['include']}", str(ROOT / "relayd/_scan.c"),
                    "-o", str(so)], check=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONMALLOC="malloc",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0",
               LD_PRELOAD=f"{_gcc_file('libasan.so')}:{_gcc_file('libubsan.so')}")
    run = subprocess.run([sys.executable, "-m", "tests.support.scan_cases", str(so), "20000"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok 20000" in run.stdout
    assert "runtime error" not in run.stderr  # UBSan's report
