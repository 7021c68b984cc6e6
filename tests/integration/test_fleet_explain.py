"""`relayd explain` on a node of a fleet: the daily cap it reports is the fleet's (what every
node delivered and holds, from the shared database), the do-not-email list is the fleet's,
and an unreachable database is said plainly; run as the operator runs it."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.operator import run_cli
from tests.support.postgres import PASSWORD, Cluster
from tests.support.relay import free_port, write_config

MESSAGE = "From: app@example.com\nTo: x@example.net\nSubject: hi\n\nbody\n"


def _config(tmp_path: Path, url: str) -> Path:
    (tmp_path / "pg.password").write_text(PASSWORD + "\n")
    shared = {"url": url, "password_file": str(tmp_path / "pg.password"), "node": "relay-a"}
    return write_config(tmp_path, [{"name": "s", "host": "127.0.0.1", "port": 9}],
                        port=free_port(), shared_state=shared, limits={"daily_cap": 5})


def test_explain_reports_the_fleets_cap_and_list(tmp_path: Path, pg: Cluster) -> None:
    cfg = _config(tmp_path, pg.url)
    assert run_cli(cfg, "shared-state", "migrate").code == 0
    # What other nodes did: relay-b delivered 3 an hour ago, relay-c holds 1 for a delivery.
    pg.psql("INSERT INTO relayd_cap_minutes (minute, node, n) "
            f"VALUES ({int((time.time() - 3600) // 60)}, 'relay-b', 3)")
    pg.psql(f"INSERT INTO relayd_cap_in_flight (node, n, since) VALUES ('relay-c', 1, {time.time()})")
    assert run_cli(cfg, "suppress", "add", "listed@example.net").code == 0

    one = run_cli(cfg, "explain", "--to", "x@example.net", stdin=MESSAGE)
    assert one.code == 0, one.err
    assert ("daily cap: 3 of 5 used by the fleet in the last 24 h, 1 held for deliveries under "
            "way, 1 remaining (shared_state, node relay-a); these 1 recipient(s) would go now") in one.out
    two = run_cli(cfg, "explain", "--to", "x@example.net", "y@example.net", stdin=MESSAGE)
    assert ("1 remaining (shared_state, node relay-a); would wait in the spool until about "
            in two.out)
    listed = run_cli(cfg, "explain", "--to", "listed@example.net", stdin=MESSAGE)
    assert "do_not_email: suppressed (never delivered): listed@example.net" in listed.out
    for result in (one, two, listed):
        assert PASSWORD not in result.out + result.err


def test_explain_says_when_the_fleets_database_cannot_be_reached(tmp_path: Path) -> None:
    cfg = _config(tmp_path, f"postgresql://relayd@127.0.0.1:{free_port()}/relayd")
    result = run_cli(cfg, "explain", "--to", "x@example.net", stdin=MESSAGE)
    assert result.code == 0, result.err
    assert ("daily cap: 5 for the fleet (shared_state: cannot reach postgresql://relayd@127.0.0.1:"
            in result.out)
    assert "deliveries that need the cap would wait in the spool until the database answers" in result.out
    assert "warning: do-not-email list: shared_state: cannot reach" in result.out
    assert PASSWORD not in result.out + result.err
