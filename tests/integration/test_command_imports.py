"""Each command loads only its own modules.

``relayd.cli`` imports a command's module only when that command runs, so ``relayd queue
list`` does not pay for the daemon, and ``relayd sendmail``, started once per message by PHP
or cron, loads neither the spool, the policy, OAuth nor cryptography. Each case runs in a fresh
interpreter, since the test process has imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import io, json, sys
from relayd.cli import IO, main
main(sys.argv[1:], io=IO(io.StringIO(), io.StringIO(), io.StringIO("Subject: s\\n\\nb\\n")))
print(json.dumps(sorted(sys.modules)))
"""

DAEMON = ["relayd.daemon", "relayd.smtpd", "relayd.delivery", "relayd.control",
          "relayd.commands.run", "aiosmtpd", "aiosmtplib", "uvloop"]
# A fleet's database driver: only with shared_state, never for a single relay.
SHARED = ["relayd.shared", "psycopg", "psycopg_binary"]


def _loaded(tmp_path: Path, *argv: str) -> set[str]:
    cfg = tmp_path / "relayd.yaml"
    cfg.write_text(f"listen: ['127.0.0.1:9']\nspool: {{path: {tmp_path / 'spool'}}}\n"
                   f"state_dir: {tmp_path / 'state'}\n"
                   f"smarthosts: [{{name: preview, outbox: {tmp_path / 'outbox'}}}]\n")
    out = subprocess.run([sys.executable, "-c", _PROBE, "-c", str(cfg), *argv], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize(("argv", "absent"), [
    (["queue", "list"], [*DAEMON, *SHARED, "relayd.policy", "relayd.oauth", "cryptography"]),
    (["suppress", "list"], [*SHARED, "relayd.smtpd", "relayd.oauth", "aiosmtpd", "aiosmtplib"]),
    (["check-config"], [*DAEMON, "relayd.spool", "relayd.policy", "relayd.oauth", "cryptography"]),
    (["sendmail", "-i", "a@example.org"],
     [*DAEMON, "relayd.spool", "relayd.policy", "relayd.oauth", "cryptography"]),
])
def test_a_command_loads_only_its_own_modules(tmp_path: Path, argv: list[str], absent: list[str]) -> None:
    loaded = _loaded(tmp_path, *argv)
    assert f"relayd.commands.{argv[0].replace('-', '_')}" in loaded   # the probe ran it
    unwanted = sorted(m for m in loaded if any(m == a or m.startswith(a + ".") for a in absent))
    assert unwanted == []


def test_delivery_loads_the_7bit_converter_only_when_it_converts() -> None:
    """The conversion for a smarthost without 8BITMIME needs the email package (~1.5 MB per
    process): the delivery process imports it on the first 8-bit message for such a server,
    never before (relayd/delivery/smtp/transaction.py, ``seven_bit``)."""
    probe = ("import json, sys\nimport relayd.commands.deliver, relayd.delivery.qmgr, "
             "relayd.delivery.smtp.pool\nprint(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True)
    loaded = set(json.loads(out.stdout.splitlines()[-1]))
    assert "relayd.delivery.smtp.pool" in loaded
    assert {"relayd.delivery.smtp.sevenbit", "relayd.policy._mime", "email.parser"} & loaded == set()
