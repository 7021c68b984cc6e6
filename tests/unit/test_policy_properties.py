"""Property tests: the pipeline never loses a MIME part, always yields a parseable message and
never lets CR/LF from config values or addresses start a new header field."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import re
from email.message import EmailMessage

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.config.schema import AddressRewrite, HeadersConfig, RewriteMode, SenderConfig, UnsubscribeConfig
from relayd.model import Envelope, Message
from relayd.policy import _mime
from relayd.policy.pipeline import build_policy, run_pipeline
from relayd.policy.records import Policy, PolicyContext
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


# -- random MIME trees -----------------------------------------------------------------------

TEXT = st.text(alphabet=st.sampled_from(list("abc xyz\n.=-äöé€☃</body>")), max_size=120)


@st.composite
def leaves(draw: st.DrawFn) -> EmailMessage:
    part = EmailMessage()
    kind = draw(st.sampled_from(["plain", "html", "attachment", "binary"]))
    if kind in ("plain", "html"):
        charset = draw(st.sampled_from(["utf-8", "iso-8859-1", "us-ascii"]))
        text = draw(TEXT)
        text = text.encode(charset, "replace").decode(charset) if charset != "us-ascii" else \
            text.encode("ascii", "replace").decode("ascii")
        if kind == "html":
            text = f"<html><body>{text}</body></html>"
        cte = draw(st.sampled_from(["quoted-printable", "base64", "8bit", "7bit"]))
        if cte == "7bit" and not text.isascii():
            cte = "quoted-printable"
        part.set_content(text, subtype=kind, charset=charset, cte=cte)
    else:
        data = draw(st.binary(max_size=200))
        part.set_content(data, maintype="application", subtype="octet-stream",
                         disposition="attachment", filename="f.bin")
    return part


def trees() -> st.SearchStrategy[EmailMessage]:
    def extend(children: st.SearchStrategy[EmailMessage]) -> st.SearchStrategy[EmailMessage]:
        @st.composite
        def multipart(draw: st.DrawFn) -> EmailMessage:
            msg = EmailMessage()
            msg.set_type("multipart/" + draw(st.sampled_from(["mixed", "alternative", "related"])))
            for child in draw(st.lists(children, min_size=1, max_size=3)):
                msg.attach(child)
            return msg
        return multipart()
    return st.recursive(leaves(), extend, max_leaves=6)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees())
def test_random_mime_trees_keep_every_part_and_their_text(tree: EmailMessage) -> None:
    msg = EmailMessage()
    msg["From"] = "App <app@example.com>"
    msg["To"] = "alice@example.net"
    msg["Subject"] = "random"
    # single leaves are covered by the corpus; here the top level is always a multipart
    msg.set_type(tree.get_content_type() if tree.is_multipart() else "multipart/mixed")
    for p in tree.iter_parts() if tree.is_multipart() else [tree]:
        msg.attach(p)
    original = msg.as_bytes(policy=email.policy.SMTP)
    cfg = dataclasses.replace(config(), unsubscribe=UnsubscribeConfig(
        mailto="u@example.com", footer_text="UNSUB {url}", footer_html="<i>UNSUB-H</i>"))
    out = run_pipeline(build_policy(cfg, {}), Message(Envelope("a@example.com", ("b@example.net",)),
                                                      original), PolicyContext(now=0.0))
    content = out.outputs[0].content
    assert _leaf_types(content) == _leaf_types(original)
    before = [p for p in email.message_from_bytes(original, policy=email.policy.default).walk()
              if not p.is_multipart()]
    after = [p for p in email.message_from_bytes(content, policy=email.policy.default).walk()
             if not p.is_multipart()]
    for old, new in zip(before, after, strict=True):
        old_raw, new_raw = old.get_payload(decode=True), new.get_payload(decode=True)
        assert isinstance(old_raw, bytes) and isinstance(new_raw, bytes)
        if old.get_content_disposition() == "attachment" or old.get_content_maintype() != "text":
            assert old_raw == new_raw
        elif old.get_content_type() == "text/plain":
            old_text = old_raw.decode(old.get_content_charset("us-ascii"))
            new_text = new_raw.decode(new.get_content_charset("us-ascii"))
            assert new_text.startswith(old_text) and new_text.count("UNSUB mailto:") == 1
        else:
            new_text = new_raw.decode(new.get_content_charset("us-ascii"))
            assert new_text.count("UNSUB-H") == 1
