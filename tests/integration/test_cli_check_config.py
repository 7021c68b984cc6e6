"""``relayd check-config`` run as a sysadmin or a script runs it (``python -m relayd``): every
problem line starts with the full path of a key, so ``path.to.key: message`` can be parsed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMARTHOST = "smarthosts:\n  - {name: a, host: smtp.example.com}\n"
# The smallest one-click endpoint (secret_env keeps check-config's output free of warnings).
ENDPOINT = ("unsubscribe: {url: 'https://example.com/u?t={token}', secret_env: UNSUB_SECRET,"
            " http_listen: '127.0.0.1:8025'}\n")

# A key path: lower-case keys, list items by index; the keys under headers.add are header
# names (X-SES-CONFIGURATION-SET), so a component may also hold capitals, digits and dashes.
KEY_LINE = re.compile(r"^[a-z_]+(\[\d+\])?(\.[A-Za-z0-9_-]+(\[\d+\])?)*: \S")
# An item of a list of mappings is a section, not a key: a line may name it alone only when
# the item itself has the wrong type.
SECTION_ITEM = re.compile(r"^(smarthosts|priority|dkim)\[\d+\]: ")


def assert_keyed(lines: list[str]) -> None:
    for line in lines:
        assert KEY_LINE.match(line), f"not 'path.to.key: message': {line!r}"
        if SECTION_ITEM.match(line):
            assert "must be a mapping of keys" in line, f"names a section, not a key: {line!r}"
# Each broken config and the key path its problem must be reported under.
BROKEN = [
    ("smarthosts:\n  - {name: x}\n", "smarthosts[0].host"),
    ("smarthosts:\n  - {name: x, host: smtp.example.com, outbox: /tmp/out}\n",
     "smarthosts[0].outbox"),
    ("smarthosts: []\n", "smarthosts"),
    ("smarthosts: {host: smtp.example.com}\n", "smarthosts"),
    ("smarthosts: [42]\n", "smarthosts[0]"),
    ("smarthosts:\n  - {host: h, port: 70000}\n", "smarthosts[0].port"),
    ("smarthosts:\n  - {host: h, prot: 25}\n", "smarthosts[0].prot"),
    ("smarthosts:\n  - {host: h, auth: {method: plain, username: u}}\n",
     "smarthosts[0].auth.password"),
    ("smarthosts:\n  - {host: h, auth: {method: plain, username: u, password: p,"
     " password_env: P}}\n", "smarthosts[0].auth.password"),
    ("smarthosts:\n  - {host: h, auth: {method: xoauth2, username: u@example.com,"
     " oauth: {client_id: c}}}\n", "smarthosts[0].auth.oauth.provider"),
    (SMARTHOST + "lisen: ['127.0.0.1:25']\n", "lisen"),
    (SMARTHOST + "listen: ['[::1]:99999']\n", "listen[0]"),
    (SMARTHOST + "spool: 5\n", "spool"),
    (SMARTHOST + "spool: {retry: {initial: 1h, max_interval: 1m}}\n",
     "spool.retry.max_interval"),
    (SMARTHOST + "priority:\n  - {pattern: '^1'}\n", "priority[0].header"),
    (SMARTHOST + "priority:\n  - {subject: '(unclosed'}\n", "priority[0].subject"),
    (SMARTHOST + "sender: {from: {name: Example}}\n", "sender.from.address"),
    (SMARTHOST + 'headers: {add: {X-Custom-Tag: "v\\nBcc: x@example.org"}}\n',
     "headers.add.X-Custom-Tag"),
    (SMARTHOST + "headers: {remove: ['Bad Name']}\n", "headers.remove[0]"),
    (SMARTHOST + "do_not_email: {auto_add: [complaint]}\n", "do_not_email.auto_add[0]"),
    (SMARTHOST + "unsubscribe: {url: 'https://example.com/u?t={token}'}\n", "unsubscribe.secret"),
    (SMARTHOST + "unsubscribe: {mailto: u@example.com, http_listen: '127.0.0.1:8025'}\n",
     "unsubscribe.url"),
    (SMARTHOST + "unsubscribe: {url: 'https://example.com/u?e={email}',"
     " http_listen: '127.0.0.1:8025'}\n", "unsubscribe.url"),
    (SMARTHOST + "do_not_email: {bypass_all: true}\n" + ENDPOINT, "do_not_email.bypass_all"),
    (SMARTHOST + "dkim:\n  - {domain: example.com}\n", "dkim[0].selector"),
    (SMARTHOST + "alerts: {events: [everything]}\n", "alerts.events[0]"),
    (SMARTHOST + "logging: {level: loud}\n", "logging.level"),
    (SMARTHOST + "secrets: {key_file: ''}\n", "secrets.key_file"),
]


def check_config(cfg: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), UNSUB_SECRET="s3cret-for-tests")
    env.pop("RELAYD_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "relayd", "-c", str(cfg), "check-config"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


def _write(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "relayd.yaml"
    cfg.write_text(text)
    return cfg


@pytest.mark.parametrize(("text", "key"), BROKEN, ids=[k for _, k in BROKEN])
def test_every_problem_line_starts_with_the_key_path(tmp_path: Path, text: str, key: str) -> None:
    run = check_config(_write(tmp_path, text))
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines, run.stderr
    assert_keyed(lines)
    assert any(line.startswith(f"{key}: ") for line in lines), lines


def test_smarthost_without_host_names_host_and_mentions_outbox(tmp_path: Path) -> None:
    run = check_config(_write(tmp_path, "smarthosts:\n  - {name: x}\n"))
    assert run.returncode == 1
    assert run.stdout == ("smarthosts[0].host: is required (or set outbox: DIR to write .eml "
                          "files instead)\n")


def test_many_problems_at_once_each_on_its_own_keyed_line(tmp_path: Path) -> None:
    text = "".join(t.replace(SMARTHOST, "") for t, _ in BROKEN if t.startswith(SMARTHOST))
    text = "smarthosts:\n  - {name: x}\n  - {host: h, outbox: out}\n" + text
    run = check_config(_write(tmp_path, text.replace("spool: 5\n", "")))
    assert run.returncode == 1
    lines = run.stdout.splitlines()
    assert len(lines) >= 12   # repeated top-level keys: YAML keeps the last one
    assert_keyed(lines)


@pytest.mark.parametrize(("text", "message"), [
    ("smarthosts:\n  - {host: h\n", "invalid YAML at line 3, column 1: "),
    ("- just\n- a list\n", "must be a mapping of keys (got a list)"),
])
def test_problems_with_the_whole_file_start_with_its_absolute_path(
        tmp_path: Path, text: str, message: str) -> None:
    """No key to name: the line starts with the file's path, which begins with / (never a
    key), so a script can tell the two kinds apart."""
    cfg = tmp_path / "relayd.yaml"
    cfg.write_text(text)
    run = check_config(cfg)
    assert run.returncode == 1
    assert run.stdout.startswith(f"{cfg}: {message}"), run.stdout
    assert len(run.stdout.splitlines()) == 1


def test_unreadable_file_starts_with_its_absolute_path(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "relayd", "-c", "missing.yaml", "check-config"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert run.returncode == 1
    assert run.stdout == f"{tmp_path / 'missing.yaml'}: cannot read the file: No such file or directory\n"


@pytest.mark.parametrize("do_not_email", [
    "",                                                   # the endpoint implies recording
    "do_not_email: {auto_add: [hard_bounce]}\n",          # no "unsubscribe": still recorded
    "do_not_email: {auto_add: [hard_bounce, unsubscribe]}\n",   # accepted for compatibility
    "do_not_email: {action: reject, bypass_all: false}\n",
])
def test_one_click_endpoint_configs_that_record_are_accepted(tmp_path: Path, do_not_email: str) -> None:
    run = check_config(_write(tmp_path, SMARTHOST + do_not_email + ENDPOINT))
    assert (run.returncode, run.stdout) == (0, "config OK\n"), run.stdout + run.stderr


def test_bypass_all_is_refused_only_with_the_endpoint(tmp_path: Path) -> None:
    run = check_config(_write(tmp_path, SMARTHOST + "do_not_email: {bypass_all: true}\n" + ENDPOINT))
    assert run.returncode == 1
    assert run.stdout == ("do_not_email.bypass_all: cannot be true while unsubscribe.http_listen "
                          "acknowledges unsubscribes: listed addresses would still get every "
                          "message\n")
    run = check_config(_write(tmp_path, SMARTHOST + "do_not_email: {bypass_all: true}\n"))
    assert (run.returncode, run.stdout) == (0, "config OK\n")
