"""etc/relayd.yaml, the commented reference config: it loads, it documents every key the
loader accepts (and no key it does not), its stated defaults are the loader's defaults, and
docs/configuration.md is generated from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from relayd.config.load import parse_config
from relayd.config.schema import AuthMethod, OAuthProvider, SuppressAction, TlsMode
from relayd.errors import ConfigError
from tools import config_doc

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "etc" / "relayd.yaml"
SECRET_FILES = ("ses-smtp.password", "m365-client.secret", "unsubscribe.secret")

# Every key of SPEC.md's configuration section, plus the forms the loader also accepts
# (max_sessions, oauth authority, the _file/_env secret forms, priority sender rules).
# "[]" marks keys of list items.
ALL_KEYS = {
    "hostname", "local_domain", "listen", "allowed_clients", "max_message_size",
    "max_recipients", "max_sessions",
    "spool", "spool.path", "spool.max_age", "spool.retry", "spool.retry.initial",
    "spool.retry.max_interval",
    "smarthosts", "smarthosts[].name", "smarthosts[].host", "smarthosts[].port",
    "smarthosts[].tls", "smarthosts[].verify_certificate", "smarthosts[].ca_file",
    "smarthosts[].helo", "smarthosts[].timeout", "smarthosts[].max_connections",
    "smarthosts[].pipelining",
    "smarthosts[].outbox", "smarthosts[].auth", "smarthosts[].auth.method",
    "smarthosts[].auth.username", "smarthosts[].auth.password",
    "smarthosts[].auth.password_file", "smarthosts[].auth.password_env",
    "smarthosts[].auth.oauth", "smarthosts[].auth.oauth.provider",
    "smarthosts[].auth.oauth.tenant_id", "smarthosts[].auth.oauth.client_id",
    "smarthosts[].auth.oauth.client_secret", "smarthosts[].auth.oauth.client_secret_file",
    "smarthosts[].auth.oauth.client_secret_env", "smarthosts[].auth.oauth.authority",
    "smarthosts[].auth.oauth.token_url", "smarthosts[].auth.oauth.scope",
    "smarthosts[].auth.oauth.grant", "smarthosts[].auth.oauth.refresh_token_file",
    "smarthosts[].auth.oauth.service_account_file", "smarthosts[].auth.oauth.subject",
    "sender", "sender.from", "sender.from.address", "sender.from.name", "sender.from.mode",
    "sender.reply_to", "sender.envelope_from",
    "headers", "headers.add", "headers.remove",
    "priority", "priority[].header", "priority[].pattern", "priority[].subject",
    "priority[].sender",
    "do_not_email", "do_not_email.action", "do_not_email.priority_bypass",
    "do_not_email.bypass_all", "do_not_email.auto_add",
    "unsubscribe", "unsubscribe.url", "unsubscribe.mailto", "unsubscribe.secret",
    "unsubscribe.secret_file", "unsubscribe.secret_env", "unsubscribe.footer_text",
    "unsubscribe.footer_html", "unsubscribe.skip_priority", "unsubscribe.http_listen",
    "limits", "limits.daily_cap", "limits.rate", "limits.priority_exempt",
    "alerts", "alerts.webhook", "alerts.email", "alerts.queue_age", "alerts.events",
    "dkim", "dkim[].domain", "dkim[].selector", "dkim[].private_key_file", "dkim[].algorithm",
    "state_dir", "secrets", "secrets.key_file", "metrics", "metrics.listen",
    "logging", "logging.level", "logging.format", "logging.smtp_transcripts",
    "submission", "submission[].listen", "submission[].tls", "submission[].cert_file",
    "submission[].key_file", "submission[].allowed_clients", "submission[].auth_failure_delay",
    "submission[].auth_failure_limit", "submission[].auth_failure_window",
    "submission[].auth_lockout", "users_file",
    "smarthosts[].daily_cap", "smarthosts[].rate",
    "routes", "routes[].name", "routes[].match", "routes[].match.from",
    "routes[].match.from_header_domain", "routes[].match.to_domain", "routes[].match.user",
    "routes[].match.priority", "routes[].smarthosts", "routes[].on_cap",
    "routes[].envelope_from", "routes[].sender", "routes[].dkim",
    "reply_rules", "reply_rules[].match", "reply_rules[].action", "reply_rules[].duration",
    "reply_rules[].rate",
    "shared_state", "shared_state.url", "shared_state.password", "shared_state.password_file",
    "shared_state.password_env", "shared_state.sslmode", "shared_state.ca_file",
    "shared_state.node",
}

# Defaults written as words ("the value of hostname") rather than a YAML value.
DESCRIBED_DEFAULTS = {"hostname", "local_domain", "alerts.events", "do_not_email.auto_add",
                      "smarthosts[].name", "smarthosts[].port", "smarthosts[].ca_file",
                      "smarthosts[].helo", "smarthosts[].auth.method",
                      "shared_state.sslmode", "shared_state.node"}

def _installed_text(tmp_path: Path) -> str:
    """The example with /etc/relayd, /var/spool/relayd and /var/lib/relayd moved under
    tmp_path and the secret files it names created there."""
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in SECRET_FILES:
        (etc / name).write_text(f"value-of-{name}\n")
    return (EXAMPLE.read_text(encoding="utf-8")
            .replace("/etc/relayd/", f"{etc}/")
            .replace("/var/spool/relayd", str(tmp_path / "spool"))
            .replace("/var/lib/relayd", str(tmp_path / "state")))


def test_example_loads_without_problems_or_warnings(tmp_path: Path) -> None:
    cfg = parse_config(_installed_text(tmp_path), source=tmp_path / "relayd.yaml")
    assert cfg.warnings == ()  # no plain-text secret in the example
    primary, m365 = cfg.smarthosts
    assert (primary.host, primary.port, primary.tls) == (
        "email-smtp.eu-west-1.amazonaws.com", 587, TlsMode.STARTTLS)
    assert primary.auth.method is AuthMethod.AUTO
    assert primary.auth.password is not None
    assert primary.auth.password.reveal() == "value-of-ses-smtp.password"
    assert m365.auth.method is AuthMethod.XOAUTH2
    assert m365.auth.oauth is not None and m365.auth.oauth.provider is OAuthProvider.AZURE
    assert cfg.do_not_email.action is SuppressAction.DROP
    assert cfg.unsubscribe is not None and cfg.unsubscribe.secret is not None
    assert cfg.limits.daily_cap == 10000 and cfg.limits.rate is not None
    assert [k.domain for k in cfg.dkim] == ["example.com"]
    assert len(cfg.priority) == 3


def test_example_as_shipped_only_misses_the_secret_files() -> None:
    """check-config on the untouched file names exactly the three secret files to create."""
    with pytest.raises(ConfigError) as info:
        parse_config(EXAMPLE.read_text(encoding="utf-8"), source=EXAMPLE)
    assert sorted(str(p) for p in info.value.problems) == [
        "smarthosts[0].auth.password_file: cannot read the file: No such file or directory",
        "smarthosts[1].auth.oauth.client_secret_file: cannot read the file: No such file or directory",
        "unsubscribe.secret_file: cannot read the file: No such file or directory",
    ]


def test_check_config_command_accepts_the_example(tmp_path: Path) -> None:
    cfg = tmp_path / "relayd.yaml"
    cfg.write_text(_installed_text(tmp_path))
    run = subprocess.run([sys.executable, "-m", "relayd", "-c", str(cfg), "check-config"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (run.returncode, run.stdout) == (0, "config OK\n"), run.stderr


def test_every_key_is_documented_exactly_once() -> None:
    docs = config_doc.parse(EXAMPLE.read_text(encoding="utf-8"))
    paths = [d.path for d in docs]
    assert len(paths) == len(set(paths)), "a key is documented twice"
    assert set(paths) == ALL_KEYS


def test_every_leaf_key_has_allowed_default_and_example() -> None:
    for d in config_doc.parse(EXAMPLE.read_text(encoding="utf-8")):
        if "Allowed" in d.fields or "Default" in d.fields:
            assert set(d.fields) == {"Allowed", "Default", "Example"}, d.path
            assert d.prose, f"{d.path} says what it does"
            example_key = d.path.rsplit(".", 1)[-1].removesuffix("[]")
            assert example_key in d.fields["Example"], d.path


def _merge(into: dict[str, Any], path: str, value: Any) -> None:
    head, _, rest = path.partition(".")
    if rest:
        _merge(into.setdefault(head, {}), rest, value)
    else:
        into[head] = value


def _stated_defaults() -> list[tuple[str, str]]:
    out = []
    for d in config_doc.parse(EXAMPLE.read_text(encoding="utf-8")):
        default = d.fields.get("Default", "none")
        if default.startswith("none") or d.path in DESCRIBED_DEFAULTS:
            continue
        if d.path.startswith(("priority", "dkim", "smarthosts[].auth.oauth.", "submission",
                              "routes", "reply_rules")):
            continue  # list items that need other keys; oauth needs a whole xoauth2 set-up
                      # (the submission keys' defaults: tests/unit/test_submission_config.py)
        out.append((d.path, default))
    return out


def _base() -> dict[str, Any]:
    return {"smarthosts": [{"name": "a", "host": "smtp.example.com"}],
            "sender": {"from": {"address": "app@example.com"}},
            "unsubscribe": {"mailto": "unsubscribe@example.com"}}


@pytest.mark.parametrize(("path", "default"), _stated_defaults())
def test_stated_default_is_the_loaders_default(path: str, default: str) -> None:
    """Writing a key with its documented default changes nothing."""
    with_key = _base()
    value = yaml.safe_load(default)
    if path.startswith("smarthosts[]."):
        _merge(with_key["smarthosts"][0], path.removeprefix("smarthosts[]."), value)
    else:
        _merge(with_key, path, value)
    assert parse_config(yaml.safe_dump(with_key)) == parse_config(yaml.safe_dump(_base()))


def test_stated_defaults_are_checked_for_the_scalar_keys() -> None:
    checked = {p for p, _ in _stated_defaults()}
    assert len(checked) >= 25
    assert {"max_message_size", "spool.retry.initial", "smarthosts[].tls", "smarthosts[].timeout",
            "sender.from.mode", "alerts.queue_age", "logging.level", "secrets.key_file"} <= checked


def test_configuration_reference_is_generated_from_the_example() -> None:
    expected = config_doc.render(config_doc.parse(EXAMPLE.read_text(encoding="utf-8")))
    assert (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8") == expected, (
        "docs/configuration.md is stale: python3 tools/config_doc.py > docs/configuration.md")
