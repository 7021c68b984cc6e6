"""The configuration: one YAML file -> a tree of frozen dataclasses, or every problem at once.

``load_config(path)`` returns ``Config`` or raises ``ConfigError`` whose problems each name the
key path (``smarthosts[0].port: must be between 1 and 65535 (got 70000)``). Unknown keys are
problems, so a typo never silently falls back to a default. Components receive only their own
slice (``SpoolConfig``, ``Smarthost`` ...), never the whole tree.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from relayd.config_reader import Reader
from relayd.errors import ConfigError, Problem
from relayd.secrets import Secret
from relayd.units import HostPort, Rate

DEFAULT_CONFIG_PATH = Path("/etc/relayd/relayd.yaml")
T = TypeVar("T")


class TlsMode(enum.StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


class AuthMethod(enum.StrEnum):
    AUTO = "auto"
    NONE = "none"
    PLAIN = "plain"
    LOGIN = "login"
    CRAM_MD5 = "cram-md5"
    XOAUTH2 = "xoauth2"


class OAuthProvider(enum.StrEnum):
    AZURE = "azure"
    GOOGLE = "google"
    GENERIC = "generic"


class OAuthGrant(enum.StrEnum):
    CLIENT_CREDENTIALS = "client_credentials"
    REFRESH_TOKEN = "refresh_token"


class RewriteMode(enum.StrEnum):
    MISSING = "missing"
    ALWAYS = "always"


class SuppressAction(enum.StrEnum):
    DROP = "drop"
    REJECT = "reject"


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


ALERT_EVENTS = ("smarthost_down", "auth_failed", "token_refresh_failed",
                "daily_cap_reached", "message_failed", "queue_age")
AUTO_ADD_KINDS = ("hard_bounce", "unsubscribe")


@dataclass(frozen=True)
class RetryConfig:
    initial: float = 60.0
    max_interval: float = 3600.0


@dataclass(frozen=True)
class SpoolConfig:
    path: Path = Path("/var/spool/relayd")
    max_age: float = 4 * 86400.0
    retry: RetryConfig = field(default_factory=RetryConfig)


@dataclass(frozen=True)
class OAuthConfig:
    provider: OAuthProvider
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: Secret | None = None
    token_url: str | None = None
    scope: str | None = None
    grant: OAuthGrant | None = None
    refresh_token_file: Path | None = None
    service_account_file: Path | None = None
    subject: str | None = None
    authority: str | None = None


@dataclass(frozen=True)
class AuthConfig:
    method: AuthMethod = AuthMethod.NONE
    username: str | None = None
    password: Secret | None = None
    oauth: OAuthConfig | None = None


@dataclass(frozen=True)
class Smarthost:
    name: str
    host: str | None = None
    port: int = 587
    tls: TlsMode = TlsMode.STARTTLS
    verify_certificate: bool = True
    ca_file: Path | None = None
    helo: str | None = None
    timeout: float = 30.0
    max_connections: int = 4
    pipelining: bool = True
    auth: AuthConfig = field(default_factory=AuthConfig)
    outbox: Path | None = None

    @property
    def relay(self) -> str:
        """``name[host]:port`` as in the log line's ``relay=`` field."""
        if self.outbox is not None:
            return f"{self.name}[outbox]"
        return f"{self.name}[{self.host}]:{self.port}"


@dataclass(frozen=True)
class AddressRewrite:
    address: str
    name: str | None = None
    mode: RewriteMode = RewriteMode.MISSING


@dataclass(frozen=True)
class SenderConfig:
    from_: AddressRewrite | None = None
    reply_to: AddressRewrite | None = None
    envelope_from: str | None = None


@dataclass(frozen=True)
class HeadersConfig:
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class PriorityRule:
    """Matches when ``header`` matches ``pattern``, the Subject matches ``subject``,
    or the envelope sender matches ``sender`` (all regexes, Python syntax)."""

    header: str | None = None
    pattern: str | None = None
    subject: str | None = None
    sender: str | None = None


@dataclass(frozen=True)
class DoNotEmailConfig:
    action: SuppressAction = SuppressAction.DROP
    priority_bypass: bool = True
    bypass_all: bool = False
    auto_add: tuple[str, ...] = ()


@dataclass(frozen=True)
class UnsubscribeConfig:
    url: str | None = None
    mailto: str | None = None
    secret: Secret | None = None
    footer_text: str | None = None
    footer_html: str | None = None
    skip_priority: bool = True
    http_listen: HostPort | None = None


@dataclass(frozen=True)
class LimitsConfig:
    daily_cap: int | None = None
    rate: Rate | None = None
    priority_exempt: bool = True


@dataclass(frozen=True)
class AlertsConfig:
    webhook: str | None = None
    email: str | None = None
    queue_age: float = 7200.0
    events: tuple[str, ...] = ALERT_EVENTS


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    private_key_file: Path


@dataclass(frozen=True)
class SecretsConfig:
    key_file: Path = Path("/etc/relayd/secret.key")


@dataclass(frozen=True)
class MetricsConfig:
    listen: HostPort | None = None


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: LogFormat = LogFormat.TEXT
    smtp_transcripts: bool = False


@dataclass(frozen=True)
class Config:
    """The whole validated configuration. ``warnings`` are non-fatal notes for check-config."""

    hostname: str
    local_domain: str
    listen: tuple[HostPort, ...]
    allowed_clients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    max_message_size: int
    max_recipients: int
    spool: SpoolConfig
    smarthosts: tuple[Smarthost, ...]
    sender: SenderConfig = field(default_factory=SenderConfig)
    headers: HeadersConfig = field(default_factory=HeadersConfig)
    priority: tuple[PriorityRule, ...] = ()
    do_not_email: DoNotEmailConfig = field(default_factory=DoNotEmailConfig)
    unsubscribe: UnsubscribeConfig | None = None
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    dkim: tuple[DkimKey, ...] = ()
    state_dir: Path = Path("/var/lib/relayd")
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    max_sessions: int = 100
    source: Path | None = None
    warnings: tuple[str, ...] = ()
    # The YAML text this was read from: the delivery process is given exactly this text, so
    # that it runs the settings the accepting process accepted, never a file refused since.
    # Not in repr (it may hold plain-text secrets).
    text: str = field(default="", repr=False, compare=False)

    def smarthost(self, name: str) -> Smarthost:
        """The smarthost called ``name``; KeyError lists the known names."""
        for s in self.smarthosts:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.smarthosts)
        raise KeyError(f"no smarthost named {name!r} (known: {known})")


def load_config(path: Path | str, environ: dict[str, str] | None = None) -> Config:
    """Read and validate the YAML file at ``path``; raises ConfigError listing every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(file_label(p), f"cannot read the file: "
                                                  f"{exc.strerror or exc}")]) from exc
    return parse_config(text, source=p, environ=environ)


def file_label(source: Path | None) -> str:
    """What problems with the file as a whole (unreadable, not YAML, not a mapping) start
    with, where other problems name a key: the file's absolute path. It begins with "/",
    which no key path does, so a script reading ``path: message`` lines can tell them apart.
    Text without a file (``parse_config`` in tests) has no label."""
    return str(source.absolute()) if source is not None else ""


def parse_config(text: str, *, source: Path | None = None,
                 environ: dict[str, str] | None = None) -> Config:
    """Validate YAML text; relative paths are resolved against the file's directory."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([Problem(file_label(source), f"invalid YAML{where}: {problem}")]) \
            from exc
    if data is None:
        data = {}
    base = source.parent if source is not None else Path.cwd()
    reader = Reader(base_dir=base, environ=environ, file_label=file_label(source))
    config = _build(reader, data, source)
    if reader.problems or config is None:
        raise ConfigError(reader.problems)
    return replace(config, text=text)


def _default_hostname() -> str:
    name = socket.getfqdn()
    if not name or name.startswith("localhost"):
        name = socket.gethostname() or "relayd.invalid"
    return name


def _build(r: Reader, data: Any, source: Path | None) -> Config | None:
    from relayd import config_sections as s

    root = r.mapping("", data)
    if root is None:
        return None
    known = {"hostname", "local_domain", "listen", "allowed_clients", "max_message_size",
             "max_recipients", "max_sessions", "spool", "smarthosts", "sender", "headers",
             "priority", "do_not_email", "unsubscribe", "limits", "alerts", "dkim", "state_dir",
             "secrets", "metrics", "logging"}
    r.unknown_keys("", root, known)
    secrets = s.secrets_section(r, root.get("secrets"))
    r.set_key_file(secrets.key_file)
    hostname = r.hostname("hostname", root.get("hostname")) or _default_hostname()
    if hostname.lower() == "localhost" or hostname.lower().startswith("localhost."):
        r.warn("hostname", "is 'localhost': providers reject HELO localhost; "
               "set hostname to this machine's FQDN")
    local_domain = r.hostname("local_domain", root.get("local_domain")) or hostname
    listen = tuple(_list(r, "listen", root.get("listen", ["127.0.0.1:25", "[::1]:25"]),
                         # port 0 = any free port (tests, ephemeral set-ups)
                         lambda p, v: r.hostport(p, v, allow_zero=True)))
    allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
        _list(r, "allowed_clients", root.get("allowed_clients", ["127.0.0.0/8", "::1/128"]),
              r.network))
    smarthosts = s.smarthosts_section(r, root.get("smarthosts"))
    spool = s.spool_section(r, root.get("spool"))
    limits = s.limits_section(r, root.get("limits"))
    cfg = Config(
        hostname=hostname,
        local_domain=local_domain,
        listen=listen,
        allowed_clients=allowed,
        max_message_size=r.size("max_message_size", root.get("max_message_size", "25MB")),
        max_recipients=r.integer("max_recipients", root.get("max_recipients", 100), 1, 100000),
        max_sessions=r.integer("max_sessions", root.get("max_sessions", 100), 1, 100000),
        spool=spool,
        smarthosts=smarthosts,
        sender=s.sender_section(r, root.get("sender")),
        headers=s.headers_section(r, root.get("headers")),
        priority=s.priority_section(r, root.get("priority")),
        do_not_email=s.do_not_email_section(r, root.get("do_not_email")),
        unsubscribe=s.unsubscribe_section(r, root.get("unsubscribe")),
        limits=limits,
        alerts=s.alerts_section(r, root.get("alerts")),
        dkim=s.dkim_section(r, root.get("dkim")),
        state_dir=r.path("state_dir", root.get("state_dir", "/var/lib/relayd")),
        secrets=secrets,
        metrics=s.metrics_section(r, root.get("metrics")),
        logging=s.logging_section(r, root.get("logging")),
        source=source,
        warnings=tuple(r.warnings),
    )
    s.check_unsubscribes_take_effect(r, cfg.do_not_email, cfg.unsubscribe)
    return cfg


def _list(r: Reader, path: str, value: Any, item: Callable[[str, Any], T | None]) -> list[T]:
    items = r.sequence(path, value)
    out: list[T] = []
    for i, v in enumerate(items or []):
        parsed = item(f"{path}[{i}]", v)
        if parsed is not None:
            out.append(parsed)
    return out
