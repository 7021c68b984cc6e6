"""Loading the configuration: one YAML file -> a ``Config``, or every problem at once.

``load_config(path)`` returns ``Config`` or raises ``ConfigError`` whose problems each name the
key path (``smarthosts[0].port: must be between 1 and 65535 (got 70000)``). Unknown keys are
problems, so a typo never silently falls back to a default.

``load_client_config(path)`` reads only what a local client of the daemon needs (``relayd
sendmail``), by the same rules and with the same defaults: the two share each key's reader
below, so they cannot disagree about where the daemon listens or how ``root`` is qualified.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from relayd.config import route_sections
from relayd.config import sections as s
from relayd.config.reader import Reader
from relayd.config.schema import DEFAULT_LISTEN, DEFAULT_STATE_DIR, ClientConfig, Config
from relayd.errors import ConfigError, Problem
from relayd.units import HostPort

T = TypeVar("T")


def load_config(path: Path | str, environ: dict[str, str] | None = None) -> Config:
    """Read and validate the YAML file at ``path``; raises ConfigError listing every problem."""
    p = Path(path)
    return parse_config(_read(p), source=p, environ=environ)


def load_client_config(path: Path | str) -> ClientConfig:
    """``hostname``, ``local_domain``, ``listen`` and the ``spool`` section of the file at
    ``path``, with exactly the values ``load_config`` would give them.

    Only these keys are read and validated; raises ConfigError naming problems in them (or
    an unreadable file, invalid YAML). Not ``load_config``, for two reasons: that reads every
    secret (password files, the ``enc:`` key file), which only the relayd user may read, while
    sendmail runs as www-data or any user with a crontab; and it refuses the whole file for a
    mistake in any section, while the running daemon keeps its last good settings (a reload
    is refused) and goes on accepting the mail sendmail hands it.
    """
    p = Path(path)
    reader = Reader(base_dir=p.parent, file_label=file_label(p))
    root = reader.mapping("", _parse_yaml(_read(p), p))
    if root is None:
        raise ConfigError(reader.problems)
    hostname, local_domain = _names(reader, root)
    settings = ClientConfig(hostname=hostname, local_domain=local_domain,
                            listen=_listen(reader, root),
                            spool=s.spool_section(reader, root.get("spool")))
    if reader.problems:
        raise ConfigError(reader.problems)
    return settings


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(file_label(path), f"cannot read the file: "
                                                     f"{exc.strerror or exc}")]) from exc


def file_label(source: Path | None) -> str:
    """What problems with the file as a whole (unreadable, not YAML, not a mapping) start
    with, where other problems name a key: the file's absolute path. It begins with "/",
    which no key path does, so a script reading ``path: message`` lines can tell them apart.
    Text without a file (``parse_config`` in tests) has no label."""
    return str(source.absolute()) if source is not None else ""


def parse_config(text: str, *, source: Path | None = None,
                 environ: dict[str, str] | None = None) -> Config:
    """Validate YAML text; relative paths are resolved against the file's directory."""
    data = _parse_yaml(text, source)
    base = source.parent if source is not None else Path.cwd()
    reader = Reader(base_dir=base, environ=environ, file_label=file_label(source))
    config = _build(reader, data, source)
    if reader.problems or config is None:
        raise ConfigError(reader.problems)
    return replace(config, text=text)


def _parse_yaml(text: str, source: Path | None) -> Any:
    """The YAML document (an empty one is an empty mapping); ConfigError if it is not YAML."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([Problem(file_label(source), f"invalid YAML{where}: {problem}")]) \
            from exc
    return {} if data is None else data


def _default_hostname() -> str:
    name = socket.getfqdn()
    if not name or name.startswith("localhost"):
        name = socket.gethostname() or "relayd.invalid"
    return name


def _build(r: Reader, data: Any, source: Path | None) -> Config | None:
    root = r.mapping("", data)
    if root is None:
        return None
    known = {"hostname", "local_domain", "listen", "allowed_clients", "max_message_size",
             "max_recipients", "max_sessions", "spool", "smarthosts", "sender", "headers",
             "priority", "do_not_email", "unsubscribe", "limits", "alerts", "dkim", "state_dir",
             "secrets", "metrics", "logging", "submission", "users_file",
             "routes", "reply_rules", "shared_state"}
    r.unknown_keys("", root, known)
    secrets = s.secrets_section(r, root.get("secrets"))
    r.set_key_file(secrets.key_file)
    hostname, local_domain = _names(r, root)
    listen = _listen(r, root)
    allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
        _list(r, "allowed_clients", root.get("allowed_clients", ["127.0.0.0/8", "::1/128"]),
              r.network))
    smarthosts = s.smarthosts_section(r, root.get("smarthosts"))
    spool = s.spool_section(r, root.get("spool"))
    limits = s.limits_section(r, root.get("limits"))
    dkim = s.dkim_section(r, root.get("dkim"))
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
        dkim=dkim,
        state_dir=r.path("state_dir", root.get("state_dir", str(DEFAULT_STATE_DIR))),
        secrets=secrets,
        metrics=s.metrics_section(r, root.get("metrics")),
        logging=s.logging_section(r, root.get("logging")),
        submission=s.submission_section(r, root.get("submission")),
        users_file=r.optional_path("users_file", root.get("users_file")),
        routes=route_sections.routes_section(r, root.get("routes"), smarthosts, dkim, listen),
        reply_rules=route_sections.reply_rules_section(r, root.get("reply_rules")),
        shared_state=s.shared_state_section(r, root.get("shared_state"), hostname),
        source=source,
    )
    s.check_unsubscribes_take_effect(r, cfg.do_not_email, cfg.unsubscribe)
    s.check_submission_users(r, cfg.submission, cfg.users_file)
    # Last, so that the warnings of every section (routes' unreachable entries too) are in.
    return replace(cfg, warnings=tuple(r.warnings))


def _names(r: Reader, root: dict[str, Any]) -> tuple[str, str]:
    """``hostname`` (default: the FQDN, never localhost) and ``local_domain`` (default: the
    hostname), which qualifies bare recipients like ``root`` (SPEC)."""
    hostname = r.hostname("hostname", root.get("hostname")) or _default_hostname()
    if hostname.lower() == "localhost" or hostname.lower().startswith("localhost."):
        r.warn("hostname", "is 'localhost': providers reject HELO localhost; "
               "set hostname to this machine's FQDN")
    local_domain = r.hostname("local_domain", root.get("local_domain")) or hostname
    return hostname, local_domain


def _listen(r: Reader, root: dict[str, Any]) -> tuple[HostPort, ...]:
    """Where the daemon accepts mail, and so where sendmail hands it over."""
    return tuple(_list(r, "listen", root.get("listen", list(DEFAULT_LISTEN)),
                       # port 0 = any free port (tests, ephemeral set-ups)
                       lambda p, v: r.hostport(p, v, allow_zero=True)))


def _list(r: Reader, path: str, value: Any, item: Callable[[str, Any], T | None]) -> list[T]:
    items = r.sequence(path, value)
    out: list[T] = []
    for i, v in enumerate(items or []):
        parsed = item(f"{path}[{i}]", v)
        if parsed is not None:
            out.append(parsed)
    return out
