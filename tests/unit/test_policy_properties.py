"""Property tests: the pipeline never loses a MIME part, always yields a parseable message and
never lets CR/LF from config values or addresses start a new header field."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.config import (
    AddressRewrite,
    HeadersConfig,
    RewriteMode,
    SenderConfig,
    UnsubscribeConfig,
)
from relayd.model import Envelope, Message
from relayd.policy import _mime
from relayd.policy.pipeline import Policy, PolicyContext, build_policy, run_pipeline
from relayd.secrets import Secret
from tests.support.policy_helpers import config, corpus, eml

NASTY = st.text(alphabet=st.sampled_from(list("abc XYZ,\"'<>@:;\r\n\x00é€=?")), max_size=30)
ADDRESS = st.builds(lambda local, dom: f"{local}@{dom}.example",
                    st.text(alphabet=st.sampled_from(list("abcxyz.+-\r\n")), min_size=1, max_size=10),
                    st.text(alphabet=st.sampled_from(list("abcxyz-\r\n")), min_size=1, max_size=8))
FOOTER = st.text(alphabet=st.sampled_from(list("ab {}url<>&é€\n")), max_size=40)


def _leaf_types(content: bytes) -> list[str]:
    msg = email.message_from_bytes(content, policy=email.policy.default)
    return [p.get_content_type() for p in msg.walk()]


def _policy(name: str | None, value: str, footer: str, url_tail: str, mode: RewriteMode) -> Policy:
    cfg = config()
    cfg = dataclasses.replace(
        cfg,
        sender=SenderConfig(from_=AddressRewrite("noreply@example.com", name, mode),
                            reply_to=AddressRewrite("help@example.com", name, RewriteMode.ALWAYS)),
        headers=HeadersConfig(add=(("X-Tag", value),), remove=("X-Mailer",)),
        unsubscribe=UnsubscribeConfig(url="https://example.com/u?t={token}&e={email}&x=" + url_tail,
                                      mailto="u@example.com", secret=Secret("k"),
                                      footer_text=footer, footer_html=footer),
    )
    return build_policy(cfg, {})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(corpus()), display=st.none() | NASTY, value=NASTY, footer=FOOTER,
       url_tail=NASTY, rcpts=st.lists(ADDRESS, min_size=1, max_size=3, unique=True),
       mode=st.sampled_from(list(RewriteMode)))
def test_pipeline_keeps_parts_parses_and_never_injects(name: str, display: str | None, value: str,
                                                       footer: str, url_tail: str, rcpts: list[str],
                                                       mode: RewriteMode) -> None:
    original = eml(name)
    policy = _policy(display, value, footer, url_tail, mode)
    msg = Message(Envelope("app@example.com", tuple(rcpts)), original)
    result = run_pipeline(policy, msg, PolicyContext(now=0.0))
    assert result.outputs
    expected_types = _leaf_types(original)
    original_from = [_mime.field_name(f) for f in
                     _mime.Headers.parse(_mime.split_message(original)[0]).fields].count("from")
    for out in result.outputs:
        # never loses (or adds) a MIME part
        assert _leaf_types(out.content) == expected_types
        # parseable, and the body of untouched parts is still there
        parsed = email.message_from_bytes(out.content, policy=email.policy.default)
        assert not [d for d in parsed.defects if "Missing" in type(d).__name__]
        header, _ = _mime.split_message(out.content)
        # no injected field: every header line is a field start or a folded continuation
        for line in header.split(b"\r\n")[:-1]:
            assert line[:1] in (b" ", b"\t") or re.match(rb"^[!-9;-~]+:", line), line
        assert b"\n" not in header.replace(b"\r\n", b"") and b"\r" not in header.replace(b"\r\n", b"")
        names = [_mime.field_name(f) for f in _mime.Headers.parse(header).fields]
        assert names.count("x-tag") == 1
        assert names.count("from") == (1 if mode is RewriteMode.ALWAYS else max(1, original_from))
        assert names.count("reply-to") == 1
