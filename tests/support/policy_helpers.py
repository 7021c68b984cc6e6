"""Helpers for the policy tests: config from YAML snippets, the .eml corpus, DKIM keys."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from functools import cache
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relayd.config.schema import Config
from relayd.model import Envelope, Message
from relayd.policy.pipeline import build_policy, run_pipeline
from relayd.policy.records import PipelineResult, PolicyContext
from tests.support.config_builder import ConfigBuilder

DATA = Path(__file__).resolve().parent.parent / "data"
PREVIEW = [{"name": "preview", "outbox": "./outbox"}]


def config(snippet: str = "", *, source: Path | None = None) -> Config:
    """The Config of a YAML ``snippet`` (policy settings) over one outbox smarthost, in memory."""
    return ConfigBuilder(smarthosts=PREVIEW).parse(source=source, **(yaml.safe_load(snippet) or {}))


def eml(name: str) -> bytes:
    return (DATA / name).read_bytes()


def corpus() -> list[str]:
    return sorted(p.name for p in DATA.glob("*.eml"))


def message(content: bytes, mail_from: str = "app@example.com",
            rcpts: tuple[str, ...] = ("alice@example.net",), priority: bool = False) -> Message:
    return Message(Envelope(mail_from, rcpts, priority=priority), content)


def run(cfg: Config, msg: Message, suppressed: frozenset[str] = frozenset(),
        keys: dict[str, bytes] | None = None, now: float = 1_800_000_000.0) -> PipelineResult:
    return run_pipeline(build_policy(cfg, keys or {}), msg,
                        PolicyContext(now=now, suppressed=suppressed))


def parse(content: bytes) -> EmailMessage:
    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def text_parts(msg: EmailMessage) -> list[EmailMessage]:
    """Decoratable parts: text/plain|html, not attachments, not inside signed/encrypted."""
    out: list[EmailMessage] = []

    def visit(part: EmailMessage) -> None:
        ctype = part.get_content_type()
        if ctype in ("multipart/signed", "multipart/encrypted"):
            return
        if part.is_multipart():
            for sub in part.iter_parts():
                visit(sub)  # type: ignore[arg-type]
            return
        if ctype in ("text/plain", "text/html") and part.get_content_disposition() != "attachment":
            out.append(part)

    visit(msg)
    return out


def decoded(part: EmailMessage) -> str:
    raw = part.get_payload(decode=True)
    assert isinstance(raw, bytes)
    return raw.decode(part.get_content_charset("us-ascii"), "replace")


@cache
def dkim_keypair() -> tuple[bytes, bytes]:
    """(private PEM, DNS TXT record value) for a fresh 2048-bit RSA key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    import base64

    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(pub)
