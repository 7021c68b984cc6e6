"""The fleet's database as the operator meets it through the commands: `relayd shared-state
migrate` (exit codes, a newer schema), `relayd run` refusing a schema it does not know,
`relayd suppress` from any node, and `relayd shared-state import` growing a single relay into
a fleet. Real PostgreSQL (tests/support/postgres.py); the password never appears in output."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from relayd.shared.schema import MIGRATIONS, SCHEMA_VERSION
from tests.support.operator import run_cli
from tests.support.postgres import PASSWORD, Cluster
from tests.support.relay import ROOT, free_port, write_config


def _config(tmp_path: Path, url: str, node: str = "relay-a", **extra: Any) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "pg.password").write_text(PASSWORD + "\n")
    shared = {"url": url, "password_file": str(tmp_path / "pg.password"), "node": node}
    return write_config(tmp_path, [{"name": "s", "host": "127.0.0.1", "port": 9}],
                        port=free_port(), shared_state=shared, **extra)


def _no_password(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text


def test_migrate_creates_then_finds_current_and_a_second_node_agrees(tmp_path: Path, pg: Cluster) -> None:
    a = _config(tmp_path / "a", pg.url)
    b = _config(tmp_path / "b", pg.url, node="relay-b")
    first = run_cli(a, "shared-state", "migrate")
    assert first.code == 0, first.err
    assert first.out == f"migrated {pg.url} from schema version 0 to {SCHEMA_VERSION}\n"
    again = run_cli(b, "shared-state", "migrate")
    assert (again.code, again.out) == (0, f"schema version {SCHEMA_VERSION} is current in {pg.url}\n")
    assert pg.psql("SELECT version FROM relayd_schema") == str(SCHEMA_VERSION)
    _no_password(first.out, first.err, again.out, again.err)


def schema_v1_cap_deliveries() -> str:
    """Version 1's table of the daily cap's deliveries, as relayd/shared/schema.py created it."""
    return "; ".join(s for s in MIGRATIONS[0][1] if "relayd_cap_deliveries" in s)


def test_migrate_upgrades_a_version_1_database_and_run_refuses_it_before(tmp_path: Path,
                                                                        pg: Cluster) -> None:
    cfg = _config(tmp_path, pg.url)
    assert run_cli(cfg, "shared-state", "migrate").code == 0
    # What relayd's schema version 1 left: no tables for the fleet's rate, alerts and tokens
    # yet, and the daily cap's deliveries one row each (version 4 counts them per minute)
    pg.psql("DROP TABLE relayd_rate_windows, relayd_alerts, relayd_oauth, relayd_cap_minutes; "
            "ALTER TABLE relayd_cap_in_flight DROP COLUMN seen; " + schema_v1_cap_deliveries() +
            "; ALTER TABLE relayd_cap_deliveries OWNER TO relayd; "
            "UPDATE relayd_schema SET version = 1")
    pg.psql("INSERT INTO relayd_suppressions (address, reason, node) "
            "VALUES ('kept@example.net', 'manual', 'relay-a')")
    run = subprocess.run([sys.executable, "-m", "relayd", "-c", str(cfg), "run"],
                         capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 1
    assert ("the database's relayd schema is version 1, older than this relayd's "
            f"({SCHEMA_VERSION}): run 'relayd shared-state migrate'") in run.stderr
    result = run_cli(cfg, "shared-state", "migrate")
    assert (result.code, result.out) == (
        0, f"migrated {pg.url} from schema version 1 to {SCHEMA_VERSION}\n")
    assert pg.psql("SELECT count(*) FROM relayd_rate_windows") == "0"
    assert pg.psql("SELECT count(*) FROM relayd_alerts") == "0"
    assert pg.psql("SELECT count(*) FROM relayd_oauth") == "0"
    assert pg.psql("SELECT address FROM relayd_suppressions") == "kept@example.net"


def test_migrate_exits_1_when_the_database_is_unreachable(tmp_path: Path) -> None:
    cfg = _config(tmp_path, f"postgresql://relayd@127.0.0.1:{free_port()}/relayd")
    result = run_cli(cfg, "shared-state", "migrate")
    assert result.code == 1
    assert result.err.startswith("relayd: shared_state: cannot reach postgresql://relayd@127.0.0.1:")
    _no_password(result.out, result.err)


def test_migrate_says_what_the_database_refused_without_a_traceback(tmp_path: Path,
                                                                   pg: Cluster) -> None:
    """A table relayd must create already exists, owned by another role (a DBA's leftover):
    the statement is refused; the operator gets PostgreSQL's reason on one line, exit 1."""
    cfg = _config(tmp_path, pg.url)
    pg.psql("CREATE TABLE relayd_suppressions (address text)")  # owned by postgres
    result = run_cli(cfg, "shared-state", "migrate")
    assert result.code == 1
    assert "Traceback" not in result.err
    assert result.err.startswith(f"relayd: shared_state: cannot migrate {pg.url}: ")
    assert "relayd_suppressions" in result.err and len(result.err.strip().splitlines()) == 1
    assert pg.psql("SELECT to_regclass('relayd_schema') IS NULL") == "t"   # nothing half-made
    _no_password(result.out, result.err)


def test_migrate_and_run_refuse_a_newer_schema(tmp_path: Path, pg: Cluster) -> None:
    cfg = _config(tmp_path, pg.url)
    assert run_cli(cfg, "shared-state", "migrate").code == 0
    pg.psql("UPDATE relayd_schema SET version = 99")
    result = run_cli(cfg, "shared-state", "migrate")
    assert result.code == 1
    assert f"schema is version 99, newer than this relayd knows ({SCHEMA_VERSION})" in result.err
    run = subprocess.run([sys.executable, "-m", "relayd", "-c", str(cfg), "run"],
                         capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 1
    assert ("relayd: cannot start: shared_state: the database's relayd schema is version 99, "
            f"newer than this relayd knows ({SCHEMA_VERSION}): a newer relayd migrated it; "
            "upgrade relayd on this node") in run.stderr
    _no_password(result.err, run.stderr, run.stdout)


def test_run_refuses_a_database_without_tables_and_says_to_migrate(tmp_path: Path, pg: Cluster) -> None:
    cfg = _config(tmp_path, pg.url)
    run = subprocess.run([sys.executable, "-m", "relayd", "-c", str(cfg), "run"],
                         capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 1
    assert ("shared_state: the database has no relayd tables yet: run 'relayd shared-state "
            "migrate'") in run.stderr


def test_suppress_commands_act_on_the_fleets_list_from_any_node(tmp_path: Path, pg: Cluster) -> None:
    a = _config(tmp_path / "a", pg.url, node="relay-a")
    b = _config(tmp_path / "b", pg.url, node="relay-b")
    assert run_cli(a, "shared-state", "migrate").code == 0
    added = run_cli(a, "suppress", "add", "Bob@Example.com", "carol@example.com")
    assert (added.code, added.out) == (0, "added 2, already listed 0\n")
    assert run_cli(b, "suppress", "list", "--json").out == '["bob@example.com", "carol@example.com"]\n'
    assert run_cli(b, "suppress", "add", "bob@example.com").out == "added 0, already listed 1\n"
    assert run_cli(b, "suppress", "remove", "carol@example.com").out == "removed 1, not listed 0\n"
    (tmp_path / "list.txt").write_text("dave@example.com\nnot an address\n# comment\n")
    imported = run_cli(b, "suppress", "import", str(tmp_path / "list.txt"))
    assert imported.out == "imported 1 new, 0 already listed, 1 invalid lines skipped\n"
    assert run_cli(a, "suppress", "list").out == "bob@example.com\ndave@example.com\n"
    # who listed what, why: the reason, the node and the time are kept
    assert pg.psql("SELECT address, reason, node FROM relayd_suppressions ORDER BY address") == (
        "bob@example.com|manual|relay-a\ndave@example.com|import|relay-b")
    # the embedded list of either node was never touched
    assert not (tmp_path / "a" / "state" / "suppressions.sqlite3").exists() or \
        (tmp_path / "a" / "state" / "suppressions.sqlite3").stat().st_size == 0


def test_suppress_fails_plainly_while_the_database_is_down(tmp_path: Path) -> None:
    cfg = _config(tmp_path, f"postgresql://relayd@127.0.0.1:{free_port()}/relayd")
    result = run_cli(cfg, "suppress", "add", "bob@example.com")
    assert result.code == 1
    assert result.err.startswith("relayd: cannot reach postgresql://relayd@127.0.0.1:")
    _no_password(result.err)


def test_import_keeps_every_address_and_the_counters_once(tmp_path: Path, pg: Cluster) -> None:
    single = write_config(tmp_path, [{"name": "s", "host": "127.0.0.1", "port": 9}], port=free_port())
    assert run_cli(single, "suppress", "add", "a@example.com", "b@example.com").code == 0
    (tmp_path / "list.txt").write_text("".join(f"user{i}@example.org\n" for i in range(500)))
    assert run_cli(single, "suppress", "import", str(tmp_path / "list.txt")).code == 0
    # The single relay's daily cap counter, as relayd.delivery.limits.DailyCap keeps it.
    import sqlite3
    now = time.time()
    db = sqlite3.connect(tmp_path / "state" / "daily_cap.sqlite3")
    db.execute("CREATE TABLE IF NOT EXISTS deliveries (at REAL NOT NULL, n INTEGER NOT NULL)")
    db.executemany("INSERT INTO deliveries VALUES (?, ?)",
                   [(now - 3600, 3), (now - 60, 4), (now - 2 * 86400, 50)])
    db.commit()
    db.close()
    fleet = _config(tmp_path, pg.url, node="relay-a")  # the same node, now with shared_state
    assert run_cli(fleet, "shared-state", "migrate").code == 0
    result = run_cli(fleet, "shared-state", "import")
    assert result.code == 0, result.err
    assert result.out == (
        f"imported 502 do-not-email addresses (502 new) from {tmp_path / 'state'} as node relay-a\n"
        "daily cap counters: 7 recipients delivered in the last 24 h now count against the "
        "fleet's cap\n")
    listed = run_cli(fleet, "suppress", "list").out.split()
    assert len(listed) == 502 and {"a@example.com", "user499@example.org"} <= set(listed)
    assert pg.psql("SELECT reason, count(*) FROM relayd_suppressions GROUP BY reason ORDER BY 1") == (
        "import|500\nmanual|2")
    assert pg.psql("SELECT sum(n) FROM relayd_cap_minutes WHERE node = 'relay-a'") == "7"
    again = run_cli(fleet, "shared-state", "import")
    assert again.code == 0
    assert "(0 new)" in again.out and "was imported before; not counted again" in again.out
    assert pg.psql("SELECT sum(n) FROM relayd_cap_minutes") == "7"
    _no_password(result.out, result.err, again.out)
