"""Header and command injection through configuration values (catalogue T46): a CR, LF or
NUL in any value that can reach a header, an SMTP command or a log line is refused when
the file is loaded, with a ConfigError naming the key, never another exception.

The config is SPEC.md's full example (every section), with plain-text secrets.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from relayd.config.load import parse_config
from relayd.errors import ConfigError

FULL = """
hostname: relay.example.com
local_domain: example.com
listen: ["127.0.0.1:25", "[::1]:25"]
allowed_clients: ["127.0.0.0/8", "::1/128"]
max_message_size: 25MB
max_recipients: 100
spool: {path: /var/spool/relayd, max_age: 4d, retry: {initial: 1m, max_interval: 1h}}
smarthosts:
  - name: primary
    host: email-smtp.eu-west-1.amazonaws.com
    port: 587
    tls: starttls
    verify_certificate: true
    helo: relay.example.com
    timeout: 30s
    max_connections: 4
    auth: {method: plain, username: AKIAEXAMPLE, password: plain-secret}
  - name: m365
    host: smtp.office365.com
    port: 587
    tls: starttls
    auth:
      method: xoauth2
      username: relay@example.com
      oauth: {provider: azure, tenant_id: tenant, client_id: client, client_secret: plain-secret}
  - name: preview
    outbox: /var/lib/relayd/outbox
sender:
  from: {address: noreply@example.com, name: "Example", mode: missing}
  reply_to: {address: support@example.com, name: "Support", mode: missing}
  envelope_from: bounces@example.com
headers:
  add: {X-SES-CONFIGURATION-SET: transactional}
  remove: [X-Mailer]
priority:
  - {header: X-Priority, pattern: "^1"}
  - {subject: "(?i)password reset|verification code"}
do_not_email: {action: drop, priority_bypass: true, bypass_all: false, auto_add: [hard_bounce, unsubscribe]}
unsubscribe:
  url: "https://example.com/unsubscribe?token={token}"
  mailto: unsubscribe@example.com
  secret: plain-secret
  footer_text: "Unsubscribe: {url}"
  footer_html: '<p><a href="{url}">Unsubscribe</a></p>'
  skip_priority: true
  http_listen: 127.0.0.1:8025
limits: {daily_cap: 10000, rate: 14/s, priority_exempt: true}
alerts:
  webhook: https://hooks.example.com/relayd
  email: ops@example.com
  queue_age: 2h
  events: [smarthost_down, auth_failed, token_refresh_failed, daily_cap_reached, message_failed, queue_age]
state_dir: /var/lib/relayd
secrets: {key_file: /etc/relayd/secret.key}
metrics: {listen: 127.0.0.1:9325}
logging: {level: info, format: text, smtp_transcripts: false}
"""

# Regular expressions are matched against headers, never written anywhere.
PATTERNS = {("priority", 0, "pattern"), ("priority", 1, "subject")}
INJECTIONS = ["\r\nBcc: evil@example.org", "\nBcc: evil@example.org", "\rX: y", "a\x00b"]


def string_leaves(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Paths to every string value, and ("key", path) for every string mapping key."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield ("key", *path, k)
            yield from string_leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from string_leaves(v, (*path, i))
    elif isinstance(node, str):
        yield path


def inject(data: Any, leaf: tuple[Any, ...], evil: str) -> Any:
    if leaf[0] == "key":
        *parents, key = leaf[1:]
        node = data
        for p in parents:
            node = node[p]
        node[key + evil] = node.pop(key)
        return data
    *parents, last = leaf
    node = data
    for p in parents:
        node = node[p]
    node[last] = node[last] + evil
    return data


def test_the_full_example_is_valid() -> None:
    parse_config(FULL)


def test_control_characters_in_any_value_or_key_are_refused_at_load() -> None:
    """Every string value and mapping key of the full example (footers included), each with
    one of the injections in turn (one parse per key keeps this fast)."""
    leaves = [leaf for leaf in string_leaves(yaml.safe_load(FULL)) if leaf not in PATTERNS]
    assert len(leaves) > 70
    accepted = []
    for n, leaf in enumerate(leaves):
        evil = INJECTIONS[n % len(INJECTIONS)]
        text = yaml.safe_dump(inject(yaml.safe_load(FULL), leaf, evil))
        try:
            parse_config(text)
        except ConfigError as exc:
            assert "plain-secret" not in str(exc)  # the message never echoes a secret
        else:
            accepted.append((leaf, evil))
    assert accepted == []


@pytest.mark.parametrize("evil", INJECTIONS)
def test_header_values_and_names_with_every_injection(evil: str) -> None:
    for leaf in [("hostname",), ("headers", "add", "X-SES-CONFIGURATION-SET"),
                 ("key", "headers", "add", "X-SES-CONFIGURATION-SET"), ("sender", "from", "name"),
                 ("sender", "envelope_from"), ("smarthosts", 0, "helo"), ("smarthosts", 0, "auth", "username")]:
        with pytest.raises(ConfigError):
            parse_config(yaml.safe_dump(inject(yaml.safe_load(FULL), leaf, evil)))
