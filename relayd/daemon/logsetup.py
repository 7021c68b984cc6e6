"""Logging configuration from ``logging:``: Postfix-shaped text or JSON lines on stderr.

``setup_logging(cfg)`` configures the root logger (the only global it touches) and can be
called again on reload. Text lines look like Postfix's (``relayd[812]: 4Xk2...: to=<...>``,
``warning: ...``); under systemd (``$JOURNAL_STREAM`` names our stderr) the timestamp and
name are left to journald and each line carries an sd-daemon(3) ``<N>`` priority prefix so
``journalctl -p warning`` works. ``format: json`` writes one object per line with ``time``,
``level``, ``logger``, ``message`` and any ``extra`` fields such as ``queue_id``.
``RedactFilter`` removes AUTH payloads, passwords and tokens as defence in depth; the
``relayd.transcript`` logger (SMTP conversations) is enabled only by
``logging.smtp_transcripts``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import TextIO

from relayd.config.schema import LogFormat, LoggingConfig

TRANSCRIPT_LOGGER = "relayd.transcript"
REDACTED = "[redacted]"

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "notice": logging.INFO,
           "warning": logging.WARNING, "warn": logging.WARNING, "error": logging.ERROR,
           "critical": logging.CRITICAL}
# Postfix prefixes severities other than info with a word (msg(3)).
_PREFIX = {logging.DEBUG: "debug: ", logging.WARNING: "warning: ", logging.ERROR: "error: ",
           logging.CRITICAL: "fatal: "}
# sd-daemon(3): <7> debug, <6> info, <4> warning, <3> error, <2> critical.
_SD_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                logging.CRITICAL: 2}

# Attributes every LogRecord has; anything else came in through ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime",
                                                                              "taskName"}

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # AUTH PLAIN/LOGIN/XOAUTH2/CRAM-MD5 initial response (RFC 4954 section 4).
    (re.compile(r"(?i)\b(AUTH\s+(?:PLAIN|LOGIN|XOAUTH2|OAUTHBEARER|CRAM-MD5))[ \t]+\S+"),
     rf"\1 {REDACTED}"),
    # A transcript's client line holding only a base64 blob: an AUTH continuation after 334.
    # (All-capital words such as STARTTLS are SMTP verbs, not payloads.)
    (re.compile(r"(?m)^(\s*(?:C:|>>>?|->|client:)\s*)(?=\S*[a-z0-9+/=])[A-Za-z0-9+/]{8,}={0,2}\s*$"),
     rf"\1{REDACTED}"),
    (re.compile(r"(?i)\b(Authorization:\s*(?:Bearer|Basic)?)\s*[^\s,;]+"), rf"\1 {REDACTED}"),
    (re.compile(r"(?i)\b(Bearer)\s+[A-Za-z0-9\-._~+/]+=*"), rf"\1 {REDACTED}"),
    # key=value and JSON "key": "value" (not "key: text", which is how config problems read:
    # "unsubscribe.secret: is required" must stay legible).
    (re.compile(r"(?i)\b((?:password|passwd|client_secret|access_token|refresh_token|id_token|"
                r"assertion|secret|token)=)(\"[^\"]*\"|'[^']*'|[^\s,;&}]+)"), rf"\1{REDACTED}"),
    (re.compile(r"(?i)(\"(?:password|passwd|client_secret|access_token|refresh_token|id_token|"
                r"assertion|secret|token)\"\s*:\s*)(\"(?:[^\"\\]|\\.)*\")"), rf'\1"{REDACTED}"'),
    (re.compile(r"(?i)([?&](?:code|token)=)[^&\s]+"), rf"\1{REDACTED}"),
)


# Every pattern above needs one of these words (any case) or a transcript line start to
# match, so ordinary per-message lines skip the seven substitutions (27 us -> ~2 us a line;
# relayd logs ~3 lines per relayed message). casefold() covers what re's IGNORECASE
# matches (long s for s, the Kelvin sign for k) except the dotless i: no word has an i.
_SUSPECT_WORDS = ("auth", "bearer", "pass", "secret", "token", "assert", "code=")
_TRANSCRIPT_LINE = re.compile(r"(?m)^\s*(?:C:|>>|->|client:)")


def redact(text: str) -> str:
    """``text`` with AUTH payloads, passwords and tokens replaced by ``[redacted]``."""
    folded = text.casefold()
    if not any(w in folded for w in _SUSPECT_WORDS) and _TRANSCRIPT_LINE.search(text) is None:
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactFilter(logging.Filter):
    """Rewrites each record's message through ``redact`` before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def _journald(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when ``stream`` is connected to the journal (systemd.exec(5) $JOURNAL_STREAM)."""
    value = environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        st = os.fstat(stream.fileno())
        dev, ino = value.split(":", 1)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, OSError, ValueError):
        # No descriptor to compare (a test stream, or stderr redirected): trust the variable.
        return True


# Every C0 control but LF (made a continuation line below), and DEL. TAB too: a client's TAB
# in a HELO name would otherwise split the line for tools that read tab-separated fields.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


class TextFormatter(logging.Formatter):
    """``2026-11-21T10:53:14+0000 relayd[812]: warning: ...``, or ``<4>warning: ...`` for
    journald, which adds its own timestamp, identifier and pid."""

    def __init__(self, *, journald: bool) -> None:
        super().__init__()
        self._journald = journald
        self._pid = os.getpid()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        # One event per line: continuation lines are indented so grep still sees them.
        message = message.replace("\r", "").replace("\n", "\n    ")
        # Client-supplied text (a HELO name, say) must not drive the terminal of whoever
        # reads the log: other control characters are shown escaped.
        message = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", message)
        prefix = _PREFIX.get(record.levelno, "")
        if self._journald:
            return f"<{_SD_PRIORITY.get(record.levelno, 6)}>{prefix}{message}"
        second = int(record.created)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
        return f"{self._stamp} relayd[{self._pid}]: {prefix}{message}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, pid and ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": logging.getLevelName(record.levelno).lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process or os.getpid(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                obj[key] = value if isinstance(value, str | int | float | bool | None) \
                    else str(value)
        if record.exc_info:
            obj["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(obj, ensure_ascii=False)


def level_number(name: str) -> int:
    """``info`` -> logging.INFO; unknown names fall back to INFO."""
    return _LEVELS.get(name.lower(), logging.INFO)


def setup_logging(cfg: LoggingConfig, *, stream: TextIO | None = None,
                  environ: Mapping[str, str] | None = None) -> logging.Handler:
    """Configure the root logger from ``cfg`` (idempotent: a previous relayd handler is
    replaced, so it can run again on SIGHUP). Returns the installed handler."""
    stream = stream if stream is not None else sys.stderr
    env = os.environ if environ is None else environ
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_relayd", False):
            root.removeHandler(old)
            old.close()
    handler = logging.StreamHandler(stream)
    handler._relayd = True  # type: ignore[attr-defined]
    handler.addFilter(RedactFilter())
    if cfg.format is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(journald=_journald(stream, env)))
    root.addHandler(handler)
    root.setLevel(level_number(cfg.level))
    # Per-record bookkeeping the formatters never show: the caller's file and line (a walk of
    # the stack on every record), thread and multiprocessing names. The pid is read once by
    # TextFormatter. The logging HOWTO's "Optimization" section names these switches.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    # Transcripts are verbose and only for debugging a provider; records below the root
    # level still reach the handler because the logger's own level decides.
    logging.getLogger(TRANSCRIPT_LOGGER).setLevel(
        logging.DEBUG if cfg.smtp_transcripts else logging.CRITICAL + 1)
    # Library chatter (aiosmtpd logs every connection at INFO as "mail.log").
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, level_number(cfg.level)))
    return handler
