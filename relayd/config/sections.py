"""Builders for each section of the config file, one function per top-level key.

Each builder reads its slice with a ``Reader`` (which records problems under the key path)
and returns the frozen record from ``relayd.config``.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import SplitResult, urlsplit

from relayd.config.reader import MAX_CREDENTIAL, Reader
from relayd.config.schema import (
    ALERT_EVENTS,
    AUTO_ADD_KINDS,
    DEFAULT_SPOOL_PATH,
    AddressRewrite,
    AlertsConfig,
    AuthConfig,
    AuthMethod,
    DkimAlgorithm,
    DkimKey,
    DoNotEmailConfig,
    HeadersConfig,
    LimitsConfig,
    LogFormat,
    LoggingConfig,
    MetricsConfig,
    OAuthConfig,
    OAuthGrant,
    OAuthProvider,
    PriorityRule,
    RetryConfig,
    RewriteMode,
    SecretsConfig,
    SenderConfig,
    SharedStateConfig,
    Smarthost,
    SpoolConfig,
    SslMode,
    SubmissionListener,
    SuppressAction,
    TlsMode,
    UnsubscribeConfig,
)
from relayd.units import check_header_name

_DEFAULT_PORTS = {TlsMode.STARTTLS: 587, TlsMode.IMPLICIT: 465, TlsMode.NONE: 25}
_LOOPBACK_HOSTS = ("localhost", "::1")


def _split(url: str) -> SplitResult:
    """urlsplit, but a malformed URL ("http://[") reads as one without a scheme, so the
    caller reports it as a config problem instead of raising ValueError."""
    try:
        return urlsplit(url)
    except ValueError:
        return urlsplit("")


def secrets_section(r: Reader, value: Any) -> SecretsConfig:
    m = r.section("secrets", value, {"key_file"})
    if not m or m.get("key_file") is None:
        return SecretsConfig()
    return SecretsConfig(key_file=r.path("secrets.key_file", m["key_file"]))


def spool_section(r: Reader, value: Any) -> SpoolConfig:
    m = r.section("spool", value, {"path", "max_age", "retry"}) or {}
    retry = r.section("spool.retry", m.get("retry"), {"initial", "max_interval"}) or {}
    initial = r.duration("spool.retry.initial", retry.get("initial"), 60.0)
    max_interval = r.duration("spool.retry.max_interval", retry.get("max_interval"), 3600.0)
    if initial <= 0:
        r.fail("spool.retry.initial", "must be longer than 0s")
    if max_interval < initial:
        r.fail("spool.retry.max_interval",
               "must be at least spool.retry.initial")
    return SpoolConfig(
        path=r.path("spool.path", m.get("path", str(DEFAULT_SPOOL_PATH))),
        max_age=r.duration("spool.max_age", m.get("max_age"), 4 * 86400.0),
        retry=RetryConfig(initial=initial, max_interval=max_interval),
    )


def smarthosts_section(r: Reader, value: Any) -> tuple[Smarthost, ...]:
    items = r.sequence("smarthosts", value)
    if items is not None and not items:
        r.fail("smarthosts", "needs at least one smarthost (host or outbox)")
    out: list[Smarthost] = []
    names: set[str] = set()
    for i, item in enumerate(items or []):
        sh = _smarthost(r, f"smarthosts[{i}]", item, i)
        if sh is None:
            continue
        if sh.name in names:
            r.fail(f"smarthosts[{i}].name", f"{sh.name!r} is used twice; names must be unique")
        names.add(sh.name)
        out.append(sh)
    return tuple(out)


def _smarthost(r: Reader, p: str, value: Any, index: int) -> Smarthost | None:
    known = {"name", "host", "port", "tls", "verify_certificate", "ca_file", "helo", "timeout",
             "max_connections", "pipelining", "auth", "outbox", "daily_cap", "rate"}
    m = r.section(p, value, known)
    if m is None:
        return None
    name = r.string(f"{p}.name", m.get("name"), max_len=64) or f"smarthost{index}"
    if not re.match(r"^[A-Za-z0-9_.-]+$", name):
        r.fail(f"{p}.name", f"may only use letters, digits, '_', '.', '-' (got {name!r})")
    host = r.string(f"{p}.host", m.get("host"))
    outbox = r.optional_path(f"{p}.outbox", m.get("outbox"))
    # Scripts parse "path.to.key: message", so these name the key to set, not the item.
    if host is None and outbox is None:
        r.fail(f"{p}.host", "is required (or set outbox: DIR to write .eml files instead)")
    if host is not None and outbox is not None:
        r.fail(f"{p}.outbox", "cannot be used together with host: give either host (an SMTP "
               "server) or outbox (a directory for .eml files)")
    tls = r.choice(f"{p}.tls", m.get("tls"), TlsMode, TlsMode.STARTTLS)
    port = r.port(f"{p}.port", m["port"]) if m.get("port") is not None else _DEFAULT_PORTS[tls]
    helo = r.hostname(f"{p}.helo", m.get("helo"))
    return Smarthost(
        name=name,
        host=host,
        port=port,
        tls=tls,
        verify_certificate=r.boolean(f"{p}.verify_certificate", m.get("verify_certificate"), True),
        ca_file=r.optional_path(f"{p}.ca_file", m.get("ca_file")),
        helo=helo,
        timeout=r.duration(f"{p}.timeout", m.get("timeout"), 30.0),
        max_connections=(r.integer(f"{p}.max_connections", m["max_connections"], 1, 100)
                         if m.get("max_connections") is not None else 4),
        pipelining=r.boolean(f"{p}.pipelining", m.get("pipelining"), True),
        auth=_auth(r, f"{p}.auth", m.get("auth")),
        outbox=outbox,
        daily_cap=(r.integer(f"{p}.daily_cap", m["daily_cap"], 1, 10**9)
                   if m.get("daily_cap") is not None else None),
        rate=r.rate(f"{p}.rate", m.get("rate")),
    )


def _auth(r: Reader, p: str, value: Any) -> AuthConfig:
    known = {"method", "username", "password", "password_file", "password_env", "oauth"}
    m = r.section(p, value, known)
    if not m:
        return AuthConfig()
    method = r.choice(f"{p}.method", m.get("method"), AuthMethod,
                      AuthMethod.AUTO if m.get("username") is not None else AuthMethod.NONE)
    username = r.string(f"{p}.username", m.get("username"), max_len=MAX_CREDENTIAL)
    password = r.secret(p, m, "password", max_len=MAX_CREDENTIAL)
    oauth = _oauth(r, f"{p}.oauth", m.get("oauth")) if m.get("oauth") is not None else None
    basic = method in (AuthMethod.PLAIN, AuthMethod.LOGIN, AuthMethod.CRAM_MD5)
    if basic and username is None:
        r.fail(f"{p}.username", f"is required for method {method.value}")
    given = any(m.get(k) is not None for k in ("password", "password_file", "password_env"))
    if (basic or (method is AuthMethod.AUTO and username is not None)) and not given:
        r.fail(f"{p}.password", f"is required for method {method.value} "
               "(or password_file / password_env)")
    if method is AuthMethod.XOAUTH2:
        if username is None:
            r.fail(f"{p}.username", "is required for xoauth2 (the mailbox to send as)")
        if oauth is None:
            r.fail(f"{p}.oauth", "is required for method xoauth2")
    elif oauth is not None:
        r.fail(f"{p}.oauth", "is only used with method: xoauth2")
    return AuthConfig(method=method, username=username, password=password, oauth=oauth)


def _oauth(r: Reader, p: str, value: Any) -> OAuthConfig | None:
    known = {"provider", "tenant_id", "client_id", "client_secret", "client_secret_file",
             "client_secret_env", "token_url", "scope", "grant", "refresh_token_file",
             "service_account_file", "subject", "authority"}
    m = r.section(p, value, known)
    if m is None:
        return None
    if m.get("provider") is None:
        r.fail(f"{p}.provider", "is required: azure | google | generic")
    provider = r.choice(f"{p}.provider", m.get("provider"), OAuthProvider, OAuthProvider.GENERIC)
    token_url = r.string(f"{p}.token_url", m.get("token_url"))
    if token_url is not None:
        parts = _split(token_url)
        loopback = (parts.hostname or "") in _LOOPBACK_HOSTS or (parts.hostname or "").startswith("127.")
        if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
            r.fail(f"{p}.token_url", "must be an https:// URL (http only on a loopback address)")
    grant = (r.choice(f"{p}.grant", m.get("grant"), OAuthGrant, OAuthGrant.CLIENT_CREDENTIALS)
             if m.get("grant") is not None else None)
    cfg = OAuthConfig(
        provider=provider,
        tenant_id=r.string(f"{p}.tenant_id", m.get("tenant_id"), max_len=MAX_CREDENTIAL),
        client_id=r.string(f"{p}.client_id", m.get("client_id"), max_len=MAX_CREDENTIAL),
        client_secret=r.secret(p, m, "client_secret"),
        token_url=token_url,
        scope=r.string(f"{p}.scope", m.get("scope")),
        grant=grant,
        refresh_token_file=r.optional_path(f"{p}.refresh_token_file", m.get("refresh_token_file")),
        service_account_file=r.optional_path(f"{p}.service_account_file",
                                             m.get("service_account_file")),
        subject=r.address(f"{p}.subject", m.get("subject")),
        authority=r.string(f"{p}.authority", m.get("authority")),
    )
    if provider is OAuthProvider.GENERIC and cfg.token_url is None:
        r.fail(f"{p}.token_url", "is required for provider generic")
    if provider is OAuthProvider.AZURE and cfg.client_id is None:
        r.fail(f"{p}.client_id", "is required for provider azure")
    if (provider is OAuthProvider.AZURE and cfg.client_secret is not None
            and cfg.grant is not OAuthGrant.REFRESH_TOKEN and not cfg.tenant_id and not cfg.authority):
        # App-only tokens need the tenant; MSAL calls /common "unreliable" for them.
        r.fail(f"{p}.tenant_id", "is required for provider azure with client_secret (app-only)")
    return cfg


def _rewrite(r: Reader, p: str, value: Any) -> AddressRewrite | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = {"address": value}
    m = r.section(p, value, {"address", "name", "mode"})
    if m is None:
        return None
    address = r.address(f"{p}.address", m.get("address"))
    if address is None:
        if m.get("address") is None:
            r.fail(f"{p}.address", "is required")
        return None
    return AddressRewrite(
        address=address,
        name=r.string(f"{p}.name", m.get("name"), max_len=MAX_CREDENTIAL, header=True),
        mode=r.choice(f"{p}.mode", m.get("mode"), RewriteMode, RewriteMode.MISSING),
    )


def sender_section(r: Reader, value: Any) -> SenderConfig:
    m = r.section("sender", value, {"from", "reply_to", "envelope_from"}) or {}
    return SenderConfig(
        from_=_rewrite(r, "sender.from", m.get("from")),
        reply_to=_rewrite(r, "sender.reply_to", m.get("reply_to")),
        envelope_from=r.address("sender.envelope_from", m.get("envelope_from")),
    )


def headers_section(r: Reader, value: Any) -> HeadersConfig:
    m = r.section("headers", value, {"add", "remove"}) or {}
    added: list[tuple[str, str]] = []
    add = r.mapping("headers.add", m.get("add")) or {}
    for name, v in add.items():
        try:
            check_header_name(name)
        except ValueError as exc:
            r.fail(f"headers.add.{name}", str(exc))
            continue
        text = r.string(f"headers.add.{name}", v, header=True, max_len=998)
        if text is not None:
            added.append((name, text))
    removed: list[str] = []
    for i, v in enumerate(r.sequence("headers.remove", m.get("remove")) or []):
        text = r.string(f"headers.remove[{i}]", v, header=True)
        if text is None:
            continue
        try:
            removed.append(check_header_name(text))
        except ValueError as exc:
            r.fail(f"headers.remove[{i}]", str(exc))
    return HeadersConfig(add=tuple(added), remove=tuple(removed))


def priority_section(r: Reader, value: Any) -> tuple[PriorityRule, ...]:
    rules: list[PriorityRule] = []
    for i, item in enumerate(r.sequence("priority", value) or []):
        p = f"priority[{i}]"
        m = r.section(p, item, {"header", "pattern", "subject", "sender"})
        if m is None:
            continue
        for key in ("pattern", "subject", "sender"):
            if m.get(key) is not None:
                try:
                    re.compile(str(m[key]))
                except re.error as exc:
                    r.fail(f"{p}.{key}", f"is not a valid regular expression: {exc}")
        if m.get("header") is not None and m.get("pattern") is None:
            r.fail(f"{p}.pattern", "is required with header")
        if not any(m.get(k) is not None for k in ("header", "subject", "sender")):
            r.fail(f"{p}.header", "is required (with pattern) unless subject or sender is given")
        rules.append(PriorityRule(
            header=r.string(f"{p}.header", m.get("header"), header=True),
            pattern=r.string(f"{p}.pattern", m.get("pattern")),
            subject=r.string(f"{p}.subject", m.get("subject")),
            sender=r.string(f"{p}.sender", m.get("sender")),
        ))
    return tuple(rules)


def do_not_email_section(r: Reader, value: Any) -> DoNotEmailConfig:
    p = "do_not_email"
    m = r.section(p, value, {"action", "priority_bypass", "bypass_all", "auto_add"}) or {}
    auto: list[str] = []
    for i, v in enumerate(r.sequence(f"{p}.auto_add", m.get("auto_add")) or []):
        if v not in AUTO_ADD_KINDS:
            r.fail(f"{p}.auto_add[{i}]", f"must be one of {' | '.join(AUTO_ADD_KINDS)} (got {v!r})")
        else:
            auto.append(v)
    return DoNotEmailConfig(
        action=r.choice(f"{p}.action", m.get("action"), SuppressAction, SuppressAction.DROP),
        priority_bypass=r.boolean(f"{p}.priority_bypass", m.get("priority_bypass"), True),
        bypass_all=r.boolean(f"{p}.bypass_all", m.get("bypass_all"), False),
        auto_add=tuple(auto),
    )


def unsubscribe_section(r: Reader, value: Any) -> UnsubscribeConfig | None:
    p = "unsubscribe"
    known = {"url", "mailto", "secret", "secret_file", "secret_env", "footer_text",
             "footer_html", "skip_priority", "http_listen"}
    m = r.section(p, value, known)
    if not m:
        return None
    url = r.string(f"{p}.url", m.get("url"), header=True)
    if url is not None and _split(url).scheme not in ("https", "http"):
        r.fail(f"{p}.url", "must be an https:// URL")
    secret = r.secret(p, m, "secret")
    uses_token = any("{token}" in str(m.get(k) or "") for k in ("url", "footer_text", "footer_html"))
    secret_given = any(m.get(k) is not None for k in ("secret", "secret_file", "secret_env"))
    if uses_token and not secret_given:
        r.fail(f"{p}.secret", "is required when {token} is used")
    if m.get("http_listen") is not None:
        # The endpoint only unsubscribes an address that a signed token proves. Mail clients
        # such as Gmail tell the recipient "unsubscribed" whatever it answers, so an endpoint
        # that must refuse every click would lose unsubscribes the recipient believes made.
        if m.get("url") is None:
            r.fail(f"{p}.url", "is required with http_listen (the one-click endpoint serves "
                   "the path of url)")
        elif url is not None and "{token}" not in url:
            r.fail(f"{p}.url", "must contain {token} with http_listen (the one-click endpoint "
                   "only unsubscribes an address its signed token proves)")
    return UnsubscribeConfig(
        url=url,
        mailto=r.address(f"{p}.mailto", m.get("mailto")),
        secret=secret,
        footer_text=r.string(f"{p}.footer_text", m.get("footer_text")),
        footer_html=r.string(f"{p}.footer_html", m.get("footer_html")),
        skip_priority=r.boolean(f"{p}.skip_priority", m.get("skip_priority"), True),
        http_listen=(r.hostport(f"{p}.http_listen", m.get("http_listen"))
                     if m.get("http_listen") is not None else None),
    )


def check_unsubscribes_take_effect(r: Reader, dne: DoNotEmailConfig,
                                   unsub: UnsubscribeConfig | None) -> None:
    """Refuse settings under which an unsubscribe that the one-click endpoint acknowledges
    (and records, always) would still not stop the mail."""
    if unsub is None or unsub.http_listen is None:
        return
    if dne.bypass_all:
        r.fail("do_not_email.bypass_all", "cannot be true while unsubscribe.http_listen "
               "acknowledges unsubscribes: listed addresses would still get every message")


def limits_section(r: Reader, value: Any) -> LimitsConfig:
    m = r.section("limits", value, {"daily_cap", "rate", "priority_exempt"}) or {}
    cap = (r.integer("limits.daily_cap", m["daily_cap"], 1, 10**9)
           if m.get("daily_cap") is not None else None)
    return LimitsConfig(
        daily_cap=cap,
        rate=r.rate("limits.rate", m.get("rate")),
        priority_exempt=r.boolean("limits.priority_exempt", m.get("priority_exempt"), True),
    )


def alerts_section(r: Reader, value: Any) -> AlertsConfig:
    p = "alerts"
    m = r.section(p, value, {"webhook", "email", "queue_age", "events"}) or {}
    webhook = r.string(f"{p}.webhook", m.get("webhook"))
    if webhook is not None and _split(webhook).scheme not in ("http", "https"):
        r.fail(f"{p}.webhook", "must be an http:// or https:// URL")
    events: list[str] = []
    raw_events = m.get("events", list(ALERT_EVENTS))
    for i, v in enumerate(r.sequence(f"{p}.events", raw_events) or []):
        if v not in ALERT_EVENTS:
            r.fail(f"{p}.events[{i}]", f"must be one of {', '.join(ALERT_EVENTS)} (got {v!r})")
        else:
            events.append(v)
    return AlertsConfig(
        webhook=webhook,
        email=r.address(f"{p}.email", m.get("email")),
        queue_age=r.duration(f"{p}.queue_age", m.get("queue_age"), 7200.0),
        events=tuple(events),
    )


def dkim_section(r: Reader, value: Any) -> tuple[DkimKey, ...]:
    keys: list[DkimKey] = []
    for i, item in enumerate(r.sequence("dkim", value) or []):
        p = f"dkim[{i}]"
        m = r.section(p, item, {"domain", "selector", "private_key_file", "algorithm"})
        if m is None:
            continue
        missing = [k for k in ("domain", "selector", "private_key_file") if m.get(k) is None]
        for k in missing:
            r.fail(f"{p}.{k}", "is required")
        if missing:
            continue
        domain = r.hostname(f"{p}.domain", m["domain"])
        selector = r.string(f"{p}.selector", m["selector"], header=True)
        key_file = r.path(f"{p}.private_key_file", m["private_key_file"])
        algorithm = r.choice(f"{p}.algorithm", m.get("algorithm"), DkimAlgorithm,
                             DkimAlgorithm.RSA_SHA256)
        if domain and selector:
            keys.append(DkimKey(domain=domain.lower(), selector=selector, private_key_file=key_file,
                                algorithm=algorithm))
    return tuple(keys)


def metrics_section(r: Reader, value: Any) -> MetricsConfig:
    m = r.section("metrics", value, {"listen"}) or {}
    if m.get("listen") is None:
        return MetricsConfig()
    return MetricsConfig(listen=r.hostport("metrics.listen", m["listen"]))


def logging_section(r: Reader, value: Any) -> LoggingConfig:
    m = r.section("logging", value, {"level", "format", "smtp_transcripts"}) or {}
    level = str(m.get("level", "info")).lower()
    if level not in ("debug", "info", "warning", "error"):
        r.fail("logging.level", f"must be one of debug | info | warning | error (got {level!r})")
        level = "info"
    return LoggingConfig(
        level=level,
        format=r.choice("logging.format", m.get("format"), LogFormat, LogFormat.TEXT),
        smtp_transcripts=r.boolean("logging.smtp_transcripts", m.get("smtp_transcripts"), False),
    )


def submission_section(r: Reader, value: Any) -> tuple[SubmissionListener, ...]:
    """``submission:`` listeners. RFC 8314 §3.3 and Postfix's master.cf: 465 with implicit
    TLS, 587 with STARTTLS (RFC 6409, RFC 3207). There is no ``tls: none``: AUTH is never
    offered over clear text (RFC 4954 §4), on any address."""
    out: list[SubmissionListener] = []
    known = {"listen", "tls", "cert_file", "key_file", "allowed_clients", "auth_failure_delay",
             "auth_failure_limit", "auth_failure_window", "auth_lockout"}
    for i, item in enumerate(r.sequence("submission", value) or []):
        p = f"submission[{i}]"
        m = r.section(p, item, known)
        if m is None:
            continue
        if m.get("tls") == "none":
            r.fail(f"{p}.tls", "must be starttls or implicit: a submission listener takes "
                   "passwords, which never travel in clear text (use listen: for "
                   "unauthenticated loopback mail)")
            continue
        tls = r.choice(f"{p}.tls", m.get("tls"), TlsMode, TlsMode.STARTTLS)
        port = _DEFAULT_PORTS[tls]
        listen = r.hostport(f"{p}.listen", m.get("listen", f"0.0.0.0:{port}"), port,
                            allow_zero=True)
        for name in ("cert_file", "key_file"):
            if m.get(name) is None:
                r.fail(f"{p}.{name}", "is required (the TLS certificate and its key, PEM)")
        cert = r.path(f"{p}.cert_file", m.get("cert_file") or ".")
        key = r.path(f"{p}.key_file", m.get("key_file") or ".")
        allowed: list[Any] = []
        for j, v in enumerate(r.sequence(f"{p}.allowed_clients",
                                         m.get("allowed_clients", ["0.0.0.0/0", "::/0"])) or []):
            net = r.network(f"{p}.allowed_clients[{j}]", v)
            if net is not None:
                allowed.append(net)
        if listen is None:
            continue
        out.append(SubmissionListener(
            listen=listen, tls=tls, cert_file=cert, key_file=key, allowed_clients=tuple(allowed),
            auth_failure_delay=r.duration(f"{p}.auth_failure_delay",
                                          m.get("auth_failure_delay"), 1.0),
            auth_failure_limit=(r.integer(f"{p}.auth_failure_limit", m["auth_failure_limit"], 1,
                                          1000) if m.get("auth_failure_limit") is not None else 5),
            auth_failure_window=r.duration(f"{p}.auth_failure_window",
                                           m.get("auth_failure_window"), 600.0),
            auth_lockout=r.duration(f"{p}.auth_lockout", m.get("auth_lockout"), 900.0)))
    return tuple(out)


def check_submission_users(r: Reader, listeners: tuple[SubmissionListener, ...],
                           users_file: Any) -> None:
    """A submission listener authenticates against ``users_file``: it must be named."""
    if listeners and users_file is None:
        r.fail("users_file", "is required with submission (the users that may authenticate; "
               "create it with `relayd user add NAME`)")


_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_LOOPBACK = ("", "localhost", "127.0.0.1", "::1")


def shared_state_section(r: Reader, value: Any, hostname: str) -> SharedStateConfig | None:
    """``shared_state`` (absent: the embedded SQLite store). The password never sits in the
    URL, where it would be printed with it; sslmode defaults to verify-full except for a
    database on this machine (a loopback address or a Unix socket), where it is disable."""
    p = "shared_state"
    if value is None:
        return None
    known = {"url", "password", "password_file", "password_env", "sslmode", "ca_file", "node"}
    m = r.section(p, value, known)
    if m is None:
        return None
    url = r.string(f"{p}.url", m.get("url"))
    host = ""
    if url is None:
        if m.get("url") is None:
            r.fail(f"{p}.url", "is required (postgresql://USER@HOST:PORT/DBNAME)")
    else:
        parts = _split(url)
        if parts.scheme not in ("postgresql", "postgres"):
            r.fail(f"{p}.url", "must be a postgresql://USER@HOST:PORT/DBNAME URL")
        elif parts.password is not None or "password=" in parts.query:
            r.fail(f"{p}.url", "must not hold the password: use shared_state.password_file, "
                   "password_env or an enc: password")
        elif parts.path.strip("/") == "":
            r.fail(f"{p}.url", "must name the database (postgresql://USER@HOST:PORT/DBNAME)")
        elif "sslmode=" in parts.query or "sslrootcert=" in parts.query:
            r.fail(f"{p}.url", "must not set sslmode or sslrootcert: use shared_state.sslmode "
                   "and shared_state.ca_file")
        else:
            try:
                host = parts.hostname or ""
                _ = parts.port
            except ValueError:
                r.fail(f"{p}.url", "has an invalid port")
    default_mode = SslMode.DISABLE if host in _LOOPBACK else SslMode.VERIFY_FULL
    node = m.get("node", hostname[:63])
    if "node" in m and (not isinstance(node, str) or not _NODE.match(node)):
        r.fail(f"{p}.node", "must be 1 to 63 letters, digits, '.', '_' or '-' "
               f"(got {node!r})")
        node = hostname
    return SharedStateConfig(
        url=url or "",
        password=r.secret(p, m, "password", max_len=MAX_CREDENTIAL),
        sslmode=r.choice(f"{p}.sslmode", m.get("sslmode"), SslMode, default_mode),
        ca_file=r.optional_path(f"{p}.ca_file", m.get("ca_file")),
        node=node,
    )
