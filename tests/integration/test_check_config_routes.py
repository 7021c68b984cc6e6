"""``relayd check-config`` on every wrong shape of ``routes``, ``reply_rules`` and the
smarthosts' own limits, run as a process: each problem is one ``routes[i].key: message``
line and exit 1; an unreachable route is a warning (exit 0)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAD = """hostname: relay.example.com
listen: ["127.0.0.1:2525"]
smarthosts:
  - {name: ses, host: email-smtp.eu-west-1.amazonaws.com}
  - {name: mg, host: smtp.mailgun.org}
  - {name: self, host: 127.0.0.1, port: 2525, tls: none}
# A key not installed yet: check-config checks key files that exist (an empty /dev/null is no
# key, and check-config says so since DKIM keys are checked there).
dkim: [{domain: example.com, selector: s, private_key_file: /nonexistent/relayd-test-dkim.pem}]
"""

BROKEN = [
    ("routes: {name: x}", "routes: must be a list"),
    ("routes: [42]", "routes[0]: must be a mapping of keys"),
    ("routes: [{match: {}, smarthosts: [ses]}]", "routes[0].name: is required"),
    ("routes: [{name: 'a b', match: {}, smarthosts: [ses]}]", "routes[0].name: may only use"),
    ("routes: [{name: default, match: {}, smarthosts: [ses]}]", "routes[0].name: 'default' is reserved"),
    ("routes: [{name: a, match: {}, smarthosts: [ses]}, {name: a, match: {to_domain: x.com}, smarthosts: [mg]}]",
     "routes[1].name: 'a' is used twice"),
    ("routes: [{name: a, smarthosts: [ses]}]", "routes[0].match: is required"),
    ("routes: [{name: a, match: [x], smarthosts: [ses]}]", "routes[0].match: must be a mapping"),
    ("routes: [{name: a, match: {form: x@y.z}, smarthosts: [ses]}]",
     "routes[0].match.form: unknown key (did you mean 'from'?)"),
    ("routes: [{name: a, match: {from: ['not an address']}, smarthosts: [ses]}]",
     "routes[0].match.from[0]: is not a valid email address"),
    ("routes: [{name: a, match: {from: ['@bad domain']}, smarthosts: [ses]}]",
     "routes[0].match.from[0]: is not a valid host name"),
    ("routes: [{name: a, match: {to_domain: [{x: 1}]}, smarthosts: [ses]}]",
     "routes[0].match.to_domain[0]: must be a string"),
    ("routes: [{name: a, match: {priority: yes please}, smarthosts: [ses]}]",
     "routes[0].match.priority: must be true or false"),
    ("routes: [{name: a, match: {}}]", "routes[0].smarthosts: needs at least one name"),
    ("routes: [{name: a, match: {}, smarthosts: []}]", "routes[0].smarthosts: needs at least one name"),
    ("routes: [{name: a, match: {}, smarthosts: [nope]}]",
     "routes[0].smarthosts[0]: no smarthost named 'nope' (known: ses, mg, self)"),
    ("routes: [{name: a, match: {}, smarthosts: [ses, mg, ses]}]",
     "routes[0].smarthosts[2]: 'ses' is listed twice: a loop"),
    ("routes: [{name: a, match: {}, smarthosts: [self]}]",
     "routes[0].smarthosts[0]: 'self' is relayd's own listen address: mail would loop"),
    ("routes: [{name: a, match: {}, smarthosts: [ses], on_cap: later}]",
     "routes[0].on_cap: must be one of wait | next (got 'later')"),
    ("routes: [{name: a, match: {}, smarthosts: [ses], envelope_from: 'x y'}]",
     "routes[0].envelope_from: is not a valid email address"),
    ("routes: [{name: a, match: {}, smarthosts: [ses], envelope_from: a@b.c, sender: {envelope_from: d@e.f}}]",
     "routes[0].envelope_from: give only one of"),
    ("routes: [{name: a, match: {}, smarthosts: [ses], sender: {form: x}}]",
     "routes[0].sender.form: unknown key"),
    ("routes: [{name: a, match: {}, smarthosts: [ses], dkim: other.example}]",
     "routes[0].dkim: no dkim entry for domain 'other.example'"),
    ("routes: [{name: a, match: {}, smarthosts: [ses], color: red}]", "routes[0].color: unknown key"),
    ("reply_rules: {action: fail}", "reply_rules: must be a list"),
    ("reply_rules: [{action: fail}]", "reply_rules[0].match: needs at least one of code, dsn, text"),
    ("reply_rules: [{match: {code: 250}, action: fail}]", "reply_rules[0].match.code: must be between 400 and 599"),
    ("reply_rules: [{match: {dsn: '4.7'}, action: fail}]", "reply_rules[0].match.dsn: must be an enhanced status code"),
    ("reply_rules: [{match: {text: '(unclosed'}, action: fail}]",
     "reply_rules[0].match.text: is not a valid regular expression"),
    ("reply_rules: [{match: {code: 454, reply: x}, action: fail}]", "reply_rules[0].match.reply: unknown key"),
    ("reply_rules: [{match: {code: 454}}]", "reply_rules[0].action: is required"),
    ("reply_rules: [{match: {code: 454}, action: retry}]",
     "reply_rules[0].action: must be one of defer | pause_smarthost | slow_down | fail"),
    ("reply_rules: [{match: {code: 454}, action: pause_smarthost}]",
     "reply_rules[0].duration: is required for action pause_smarthost"),
    ("reply_rules: [{match: {code: 454}, action: defer, duration: soon}]", "reply_rules[0].duration: "),
    ("reply_rules: [{match: {code: 554}, action: fail, duration: 5m}]",
     "reply_rules[0].duration: is not used with action fail"),
    ("reply_rules: [{match: {code: 454}, action: defer, rate: 1/s}]",
     "reply_rules[0].rate: is only used with action slow_down"),
    ("reply_rules: [{match: {code: 454}, action: slow_down, rate: fast}]",
     "reply_rules[0].rate: must be a rate like"),
]


def _check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "relayd.yaml"
    path.write_text(text)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "relayd", "-c", str(path), "check-config"],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("snippet, problem", BROKEN, ids=[p for _, p in BROKEN])
def test_wrong_shape_is_one_keyed_line(tmp_path: Path, snippet: str, problem: str) -> None:
    run = _check(tmp_path, HEAD + snippet + "\n")
    assert run.returncode == 1, run.stdout + run.stderr
    lines = (run.stdout + run.stderr).splitlines()
    assert any(problem in line for line in lines), lines


@pytest.mark.parametrize("snippet, problem", [
    ("{name: ses, host: h, daily_cap: 0}", "smarthosts[0].daily_cap: must be between 1 and"),
    ("{name: ses, host: h, rate: lots}", "smarthosts[0].rate: must be a rate like"),
])
def test_smarthost_limits(tmp_path: Path, snippet: str, problem: str) -> None:
    run = _check(tmp_path, f"hostname: relay.example.com\nsmarthosts:\n  - {snippet}\n")
    assert run.returncode == 1 and problem in run.stdout + run.stderr


def test_a_shadowed_route_is_a_warning(tmp_path: Path) -> None:
    run = _check(tmp_path, HEAD + """routes:
  - {name: everything, match: {}, smarthosts: [ses]}
  - {name: billing, match: {from: ["@billing.example.com"]}, smarthosts: [mg]}
  - {name: same, match: {to_domain: [x.com]}, smarthosts: [mg]}
  - {name: again, match: {to_domain: [x.com]}, smarthosts: [ses]}
""")
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout + run.stderr
    assert "routes[1]: is never used: routes[0] (everything) matches every message and comes first" in out
    assert "routes[3]: is never used: routes[0] (everything)" in out


def test_a_good_routes_block_is_ok(tmp_path: Path) -> None:
    run = _check(tmp_path, HEAD + """routes:
  - {name: billing, match: {from: ["@billing.example.com", invoices@example.com], priority: true},
     smarthosts: [ses, mg], on_cap: next, envelope_from: bounces@billing.example.com, dkim: example.com}
  - {name: internal, match: {to_domain: corp.example.com, user: [app]}, smarthosts: [mg], dkim: false}
reply_rules:
  - {match: {code: 454, dsn: 4.7.0, text: "(?i)throttl"}, action: slow_down, duration: 10m, rate: 1/s}
""")
    assert (run.returncode, run.stdout) == (0, "config OK\n"), run.stderr
