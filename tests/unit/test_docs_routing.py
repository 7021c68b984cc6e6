"""docs/routing.md's worked example is a valid config, and routes the way the page says."""

from __future__ import annotations

import re
from pathlib import Path

from relayd.config.load import parse_config
from relayd.routing.match import Facts, choose

DOC = Path(__file__).resolve().parents[2] / "docs" / "routing.md"
BASE = """
hostname: relay.example.com
listen: ["127.0.0.1:2525"]
spool: {path: %(root)s/spool}
state_dir: %(root)s/state
secrets: {key_file: %(root)s/secret.key}
"""


def test_worked_example_loads_and_routes_as_documented(tmp_path: Path) -> None:
    (block,) = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    text = block.replace("/etc/relayd/", f"{tmp_path}/")
    for name in ("ses.password", "mailgun.password", "billing.pem", "example.pem"):
        (tmp_path / name).write_text("x\n")
    cfg = parse_config(BASE % {"root": tmp_path} + text)
    assert cfg.warnings == ()
    assert [r.name for r in cfg.routes] == ["internal", "billing", "marketing"]
    billing = Facts("pay@billing.example.com", "billing.example.com")
    assert choose(cfg.routes, billing, "x@gmail.com").name == "billing"
    assert choose(cfg.routes, billing, "y@corp.example.com").name == "internal"
    assert choose(cfg.routes, Facts("a@x.example", "news.example.com"), "z@b.example").name == \
        "marketing"
    assert choose(cfg.routes, Facts("app@shop.example.com"), "z@yahoo.com").name == "default"


def test_providers_page_lists_every_shipped_rule_with_its_source() -> None:
    from relayd.routing.rules import SHIPPED

    page = (DOC.parent / "providers.md").read_text().split("## Reply rules", 1)[1]
    for rule in SHIPPED:
        row = next(line for line in page.splitlines() if line.startswith(f"| `{rule.name}` |"))
        assert rule.source in row and rule.action.value in row
