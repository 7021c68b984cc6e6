"""Pure classification of smarthost replies and delivery errors into outcomes (SPEC
"Delivery outcome rules").

No I/O and no clock: the forwarder asks these functions what a reply or an exception means
(sent, deferred, failed; whether the smarthost itself is at fault; whether the address does
not exist) and the queue manager acts on the answer.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Sequence
from dataclasses import replace

from relayd.config.schema import ReplyAction, ReplyRule
from relayd.errors import OAuthError
from relayd.model import DeliveryResult, Reply, Status
from relayd.routing.rules import Verdict, judge

# Provider quota and throttling replies: temporary whatever their code, because the message
# is fine and only has to wait for the quota window (Gmail 550 5.4.5, SES "Daily message
# quota exceeded", Exchange 5.2.251-255 "continuous error" throttling, 454 throttling).
_QUOTA_TEXT = re.compile(
    r"quota exceeded|sending quota|daily (?:user )?sending|daily smtp relay limit|relay limit"
    r"|rate limit|too many messages|maximum sending rate|throttl|concurrent connections limit"
    r"|message submission rate|sending limit",
    re.IGNORECASE,
)
_QUOTA_DSN = frozenset({"5.4.5", "5.2.251", "5.2.253", "5.2.254", "5.2.255", "4.3.2", "4.7.28"})

# RFC 3463 X.1.x address-status codes meaning "this mailbox does not exist" (not 5.1.7/5.1.8,
# which are about the sender, nor 5.1.4 ambiguous).
_HARD_BOUNCE_DSN = frozenset({"5.1.0", "5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10"})
_NO_SUCH_USER_TEXT = re.compile(
    r"user unknown|unknown user|no such user|mailbox unavailable|mailbox not found"
    r"|does not exist|recipient address rejected|invalid recipient|no mailbox",
    re.IGNORECASE,
)
# RFC 3463 X.3.4 "message too big for system" and X.2.3 "message length exceeds administrative
# limit": a 552 at RCPT with one of these is about the message's size, not the recipient count.
_TOO_BIG_DSN = frozenset({"3.4", "2.3"})
# Replies that concern the account rather than one message: authentication refused, required
# or disabled (RFC 4954 §6, Office 365's 5.7.57/5.7.139). Not the generic 4.7.0 "security or
# policy" code, which greylisting and content filters also use for a single message.
_FAULT_DSN = frozenset({"5.7.8", "5.7.139", "5.7.3", "5.7.57", "4.7.12", "5.7.12"})


def is_quota(reply: Reply) -> bool:
    """A provider quota / throttling reply: the message must wait, whatever the code."""
    if reply.code < 400:
        return False
    return reply.dsn in _QUOTA_DSN or bool(_QUOTA_TEXT.search(reply.text))


def classify_reply(reply: Reply) -> Status:
    """2xx sent, 4xx deferred, 5xx failed, except quota 5xx (deferred).

    Codes that are not SMTP replies (aiosmtplib reports ``-1`` for a malformed reply, 0 for
    none) are temporary: a garbled answer is no proof the message was refused (RFC 5321
    §4.2.4 leaves the outcome unknown).
    """
    if 200 <= reply.code < 300:
        return Status.SENT
    if 500 <= reply.code < 600 and not is_quota(reply):
        return Status.FAILED
    return Status.DEFERRED


def rcpt_reply(reply: Reply) -> Reply:
    """A reply to RCPT TO as relayd reads it: ``552`` becomes ``452`` (and its enhanced code
    4.x.y), with the server's words kept, so the recipient waits for another transaction
    or a later attempt instead of failing.

    RFC 5321 §4.5.3.1.10: servers have used 552 for "too many recipients" and clients SHOULD
    treat it as temporary. A 552 whose enhanced code says the message is too big (X.3.4,
    X.2.3) stays permanent: retrying would meet the same limit for days (the reason Postfix
    keeps every 552 permanent; smtp_proto.c).
    """
    if reply.code != 552:
        return reply
    dsn = reply.dsn
    if dsn.split(".", 1)[1] in _TOO_BIG_DSN:
        return reply
    text = reply.text
    if text.startswith(dsn):  # the server gave an enhanced code: 5.5.3 -> 4.5.3
        text = "4" + text[1:]
    note = "552 treated as 452, RFC 5321 section 4.5.3.1.10"
    return Reply(452, f"{text} ({note})" if text else f"({note})")


def is_hard_bounce(reply: Reply) -> bool:
    """The recipient does not exist (5.1.1-class): a candidate for the do-not-email list."""
    if not 500 <= reply.code < 600 or is_quota(reply):
        return False
    dsn = reply.dsn
    if dsn in _HARD_BOUNCE_DSN:
        return True
    # Servers without enhanced codes: "550 User unknown", "550 No such user here".
    return dsn == "5.0.0" and reply.code in (550, 551, 553) and bool(
        _NO_SUCH_USER_TEXT.search(reply.text))


def is_smarthost_fault(reply: Reply | None, exc: BaseException | None) -> bool:
    """True when a failure concerns the smarthost (or our account there), not the message.

    Connection refused, timeouts, lost connections, TLS and authentication failures, a
    missing token, ``421`` (service closing, RFC 5321 §3.8) and provider quota replies all
    pause the smarthost at once: every queued message would meet the same failure. Any other
    4xx in a transaction ("451 4.3.0 Try again later" after the final dot, greylisting at
    RCPT) is about that message and defers only it, as Postfix does.
    """
    if exc is not None and _exception_is_fault(exc):
        return True
    if reply is None:
        return False
    if reply.code == 421 or reply.code <= 0:
        return True
    if reply.code in (530, 534, 535, 538, 454) or reply.dsn in _FAULT_DSN:
        return True
    return is_quota(reply)


def _exception_is_fault(exc: BaseException) -> bool:
    # aiosmtplib wraps the real cause (ssl.SSLCertVerificationError under SMTPConnectError for
    # implicit TLS), so look along the __cause__ chain too.
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (OSError, ssl.SSLError, TimeoutError, asyncio.TimeoutError,
                             ConnectionError, OAuthError)):
            return True
        if type(seen).__module__.startswith("aiosmtplib"):
            # SMTPServerDisconnected, SMTPConnectError, SMTPTimeoutError, SMTPNotSupported,
            # SMTPAuthenticationError, SMTPResponseException(-1) ...
            return True
        seen = seen.__cause__
    return False


def local_reply(dsn: str, text: str) -> Reply:
    """A reply made up locally for a failure the server never answered (RFC 3463 DSN
    first, as Postfix logs ``dsn=4.4.1`` for a refused connection)."""
    code = 451 if dsn.startswith("4") else 554
    return Reply(code, f"{dsn} {text}")


def apply_rules(result: DeliveryResult,
                rules: Sequence[ReplyRule]) -> tuple[DeliveryResult, Verdict | None]:
    """``result`` as the reply rules (the operator's ``reply_rules``, then the shipped provider
    rules of relayd/routing/rules.py) read it, and the first rule's verdict.

    ``fail`` fails the recipient whatever the code; ``defer``, ``slow_down`` and
    ``pause_smarthost`` defer it. ``pause_smarthost`` makes it the smarthost's fault (the next
    smarthost of the route takes the mail); ``slow_down`` does not: the smarthost works, only
    slower (its rate is lowered by the queue manager, not paused with backoff).
    """
    verdict: Verdict | None = None
    outcomes = []
    for o in result.outcomes:
        v = None if o.status is Status.SENT else judge(rules, o.reply)
        if v is None:
            outcomes.append(o)
            continue
        verdict = verdict or v
        status = Status.FAILED if v.action is ReplyAction.FAIL else Status.DEFERRED
        outcomes.append(replace(o, status=status))
    if verdict is None:
        return result, None
    fault = result.smarthost_fault
    if verdict.action is ReplyAction.PAUSE_SMARTHOST:
        fault = True
    elif verdict.action in (ReplyAction.SLOW_DOWN, ReplyAction.FAIL):
        fault = False
    return replace(result, outcomes=tuple(outcomes), smarthost_fault=fault), verdict
