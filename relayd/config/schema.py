"""The configuration's schema: the frozen records one YAML file becomes.

``relayd.config.load`` builds them (or reports every problem at once). Components receive
only their own slice (``SpoolConfig``, ``Smarthost`` ...), never the whole tree.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from relayd.secrets import Secret
from relayd.units import HostPort, Rate

DEFAULT_CONFIG_PATH = Path("/etc/relayd/relayd.yaml")
# Defaults that a missing key takes, named here because more than one reader applies them
# (``load_config`` and ``load_client_config``) and they must not drift apart.
DEFAULT_LISTEN = ("127.0.0.1:25", "[::1]:25")
DEFAULT_SPOOL_PATH = Path("/var/spool/relayd")
DEFAULT_STATE_DIR = Path("/var/lib/relayd")


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


class DkimAlgorithm(enum.StrEnum):
    """The a= of a DKIM signature: RSA (RFC 6376) or Ed25519 (RFC 8463)."""

    RSA_SHA256 = "rsa-sha256"
    ED25519_SHA256 = "ed25519-sha256"


class SuppressAction(enum.StrEnum):
    DROP = "drop"
    REJECT = "reject"


class SslMode(enum.StrEnum):
    DISABLE = "disable"
    REQUIRE = "require"
    VERIFY_CA = "verify-ca"
    VERIFY_FULL = "verify-full"


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


class OnCap(enum.StrEnum):
    """What a route does when one of its smarthosts is at its own ``daily_cap``."""

    WAIT = "wait"
    NEXT = "next"


class ReplyAction(enum.StrEnum):
    """What a ``reply_rules`` entry makes of a matching reply."""

    DEFER = "defer"
    PAUSE_SMARTHOST = "pause_smarthost"
    SLOW_DOWN = "slow_down"
    FAIL = "fail"


ALERT_EVENTS = ("smarthost_down", "auth_failed", "token_refresh_failed",
                "daily_cap_reached", "message_failed", "queue_age", "user_limit_reached",
                # fires only where shared_state is configured (SPEC)
                "shared_state_down",
                # the spool cannot store mail: every message is answered 451
                "spool_unwritable")
AUTO_ADD_KINDS = ("hard_bounce", "unsubscribe")


@dataclass(frozen=True)
class RetryConfig:
    initial: float = 60.0
    max_interval: float = 3600.0


@dataclass(frozen=True)
class SpoolConfig:
    path: Path = DEFAULT_SPOOL_PATH
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
    # This provider account's own quota, besides the global ``limits`` (routing).
    daily_cap: int | None = None
    rate: Rate | None = None

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
    algorithm: DkimAlgorithm = DkimAlgorithm.RSA_SHA256


@dataclass(frozen=True)
class RouteMatch:
    """What a route matches; every key given must match (none given: every message).

    ``from_`` holds lower-cased addresses and ``@domain`` entries; the domains are lower-cased.
    ``priority`` None means either."""

    from_: tuple[str, ...] = ()
    from_header_domain: tuple[str, ...] = ()
    to_domain: tuple[str, ...] = ()
    user: tuple[str, ...] = ()
    priority: bool | None = None

    @property
    def catch_all(self) -> bool:
        return not (self.from_ or self.from_header_domain or self.to_domain or self.user
                    or self.priority is not None)


@dataclass(frozen=True)
class Route:
    """One ``routes`` entry: which mail (``match``) leaves through which smarthosts, in order.

    ``sender`` holds the route's ``sender.from`` / ``reply_to`` / ``envelope_from`` overrides
    (None: the global ``sender``); ``dkim`` names the ``dkim`` entry that signs the route's
    mail ("" : none signs; None: the From domain's entry, as without routes)."""

    name: str
    match: RouteMatch
    smarthosts: tuple[str, ...]
    on_cap: OnCap = OnCap.WAIT
    sender: SenderConfig | None = None
    dkim: str | None = None

    @property
    def changes_content(self) -> bool:
        return self.sender is not None or self.dkim is not None


DEFAULT_ROUTE = "default"


@dataclass(frozen=True)
class ReplyRule:
    """One ``reply_rules`` entry (or a shipped provider rule): every match key given must fit.

    ``duration``: how long a pause or slow-down lasts, or a ``defer``'s wait when the reply
    names none. ``rate``: the slowed-down rate (default: half the smarthost's, at most 1/s).
    ``name`` and ``source`` say where a shipped rule comes from (``route test``, docs)."""

    action: ReplyAction
    code: int | None = None
    dsn: str | None = None
    text: str | None = None
    duration: float | None = None
    rate: Rate | None = None
    name: str = ""
    source: str = ""


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
class SubmissionListener:
    """One ``submission:`` listener: AUTH always required, offered only after TLS (RFC 4954
    §4, RFC 8314). The certificate files are read again on SIGHUP. ``auth_*``: failed AUTH is
    answered after ``auth_failure_delay``; ``auth_failure_limit`` failures from one address
    within ``auth_failure_window`` lock it out (421 4.7.0) for ``auth_lockout``."""

    listen: HostPort
    tls: TlsMode
    cert_file: Path
    key_file: Path
    allowed_clients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    auth_failure_delay: float = 1.0
    auth_failure_limit: int = 5
    auth_failure_window: float = 600.0
    auth_lockout: float = 900.0


@dataclass(frozen=True)
class SharedStateConfig:
    """``shared_state``: the PostgreSQL database a fleet of relays shares (docs/fleet.md)."""

    url: str
    password: Secret | None = None
    sslmode: SslMode = SslMode.VERIFY_FULL
    ca_file: Path | None = None
    node: str = ""


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
    state_dir: Path = DEFAULT_STATE_DIR
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    shared_state: SharedStateConfig | None = None
    max_sessions: int = 100
    submission: tuple[SubmissionListener, ...] = ()
    users_file: Path | None = None
    routes: tuple[Route, ...] = ()
    reply_rules: tuple[ReplyRule, ...] = ()
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


@dataclass(frozen=True)
class ClientConfig:
    """What a local client of the running daemon (``relayd sendmail``) needs: where the daemon
    listens, the names bare addresses are qualified with, and the spool (``-bp``, ``-q``).

    Each field has the name, type and value the same file gives in ``Config``; built by
    ``relayd.config.load.load_client_config``.
    """

    hostname: str
    local_domain: str
    listen: tuple[HostPort, ...]
    spool: SpoolConfig
