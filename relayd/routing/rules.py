"""Reply rules: what a provider's reply means (defer, pause the smarthost, slow down, fail).

The operator's ``reply_rules`` are tried first, then ``SHIPPED``: one rule per provider reply
that a generic classifier (relayd/delivery/outcomes.py) gets wrong or too bluntly, each with
the page it comes from (docs/providers.md lists them). Pure: no I/O, no clock.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from relayd.config.schema import ReplyAction, ReplyRule, Smarthost
from relayd.model import Reply

_MIN = 60.0
_HOUR = 3600.0

SES = "https://docs.aws.amazon.com/ses/latest/dg/troubleshoot-smtp.html"
O365 = ("https://learn.microsoft.com/en-us/office365/servicedescriptions/"
        "exchange-online-service-description/exchange-online-limits")
O365_SEND_AS = ("https://learn.microsoft.com/en-us/exchange/mail-flow/non-delivery-reports-and-"
                "bounce-messages/non-delivery-reports-in-exchange-online")
GMAIL = "https://support.google.com/a/answer/3726730"
GMAIL_RELAY = "https://support.google.com/a/answer/6140680"
SENDGRID = ("https://www.twilio.com/docs/sendgrid/for-developers/sending-email/"
            "smtp-errors-and-troubleshooting")
MAILGUN = "https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/"
POSTMARK = "https://postmarkapp.com/developer/api/overview#error-codes"
BREVO = "https://help.brevo.com/hc/en-us/articles/7959631848850"

# Each provider's rules, with the smarthost host names they are written for (``route test``
# shows a smarthost the rules of its provider). Every shipped rule is tried for every
# smarthost: their texts are specific enough, and a relay in front of a provider passes its
# replies on unchanged.
SHIPPED: tuple[ReplyRule, ...] = (
    ReplyRule(ReplyAction.SLOW_DOWN, code=454, duration=10 * _MIN, name="ses-max-send-rate",
              text=r"(?i)throttling failure: maximum sending rate exceeded", source=SES),
    ReplyRule(ReplyAction.PAUSE_SMARTHOST, code=454, duration=_HOUR, name="ses-daily-quota",
              text=r"(?i)throttling failure: daily message quota exceeded", source=SES),
    ReplyRule(ReplyAction.DEFER, code=454, duration=_MIN, name="ses-temporary-failure",
              text=r"(?i)temporary service failure", source=SES),
    ReplyRule(ReplyAction.PAUSE_SMARTHOST, duration=_HOUR, name="o365-submission-quota",
              text=r"(?i)SubmissionQuotaExceededException", source=O365),
    ReplyRule(ReplyAction.SLOW_DOWN, duration=5 * _MIN, name="o365-sender-thread-limit",
              text=r"(?i)sender thread limit exceeded", source=O365),
    # The login may not send as this From (an Exchange permission, not the message): every
    # message would fail alike, and Exchange throttles accounts that keep failing, so hold.
    ReplyRule(ReplyAction.PAUSE_SMARTHOST, duration=_HOUR, name="o365-send-as-denied",
              text=r"(?i)SendAsDenied|\b5\.7\.60\b", source=O365_SEND_AS),
    ReplyRule(ReplyAction.SLOW_DOWN, dsn="4.7.28", duration=30 * _MIN, name="gmail-rate-limited",
              source=GMAIL),
    ReplyRule(ReplyAction.PAUSE_SMARTHOST, dsn="5.4.5", duration=_HOUR,
              name="gmail-daily-sending-quota",
              text=r"(?i)daily user sending (?:quota|limit) exceeded", source=GMAIL),
    ReplyRule(ReplyAction.PAUSE_SMARTHOST, duration=_HOUR, name="gmail-daily-relay-limit",
              text=r"(?i)daily smtp relay limit exceeded", source=GMAIL_RELAY),
    ReplyRule(ReplyAction.SLOW_DOWN, duration=10 * _MIN, name="gmail-peak-relay-limit",
              text=r"(?i)peak smtp relay limit exceeded", source=GMAIL_RELAY),
    ReplyRule(ReplyAction.PAUSE_SMARTHOST, code=454, duration=10 * _MIN,
              name="gmail-too-many-logins", text=r"(?i)too many login attempts", source=GMAIL),
    ReplyRule(ReplyAction.PAUSE_SMARTHOST, duration=_HOUR, name="sendgrid-credits-exceeded",
              text=r"(?i)maximum credits exceeded", source=SENDGRID),
    ReplyRule(ReplyAction.FAIL, code=550, name="sendgrid-sender-identity",
              text=r"(?i)does not match a verified sender identity", source=SENDGRID),
    ReplyRule(ReplyAction.PAUSE_SMARTHOST, duration=_HOUR, name="mailgun-not-allowed-to-send",
              text=r"(?i)is not allowed to send", source=MAILGUN),
    ReplyRule(ReplyAction.SLOW_DOWN, duration=10 * _MIN, name="mailgun-rate-limit",
              text=r"(?i)too many (?:requests|messages)", source=MAILGUN),
    ReplyRule(ReplyAction.FAIL, name="postmark-inactive-recipient",
              text=r"(?i)inactive recipient", source=POSTMARK),
    ReplyRule(ReplyAction.PAUSE_SMARTHOST, duration=_HOUR, name="postmark-account-pending",
              text=r"(?i)account (?:is )?(?:pending|suspended)|sending (?:has been )?paused",
              source=POSTMARK),
    ReplyRule(ReplyAction.PAUSE_SMARTHOST, duration=_HOUR, name="brevo-unauthorized-ip",
              code=525, text=r"(?i)unauthori[sz]ed ip", source=BREVO),
    ReplyRule(ReplyAction.SLOW_DOWN, duration=10 * _MIN, name="brevo-rate-limit",
              text=r"(?i)rate limit(?:ed)?(?: (?:exceeded|reached))?|limit of \d+ (?:emails|messages)",
              source=BREVO),
    # Any provider: "try again in 30 seconds" is honoured as said (RFC 5321 §4.5.4.1 leaves the
    # retry interval to the client; the server's own figure is the best one there is).
    ReplyRule(ReplyAction.DEFER, name="try-again-in",
              text=r"(?i)\bin \d+ ?(?:s|sec|secs|seconds?|m|min|mins|minutes?)\b",
              source="RFC 5321 §4.5.4.1"),
)

PROVIDER_HOSTS: dict[str, tuple[str, ...]] = {
    "ses": ("amazonaws.com",),
    "o365": ("office365.com", "outlook.com", "protection.outlook.com"),
    "gmail": ("gmail.com", "google.com", "googlemail.com"),
    "sendgrid": ("sendgrid.net",),
    "mailgun": ("mailgun.org", "mailgun.net"),
    "postmark": ("postmarkapp.com",),
    "brevo": ("brevo.com", "sendinblue.com"),
}

_DELAY = re.compile(r"\bin (\d+) ?(s|sec|secs|seconds?|m|min|mins|minutes?)\b", re.IGNORECASE)
# A server's own figure is honoured, within reason: a typo of "in 99999 minutes" must not park
# a message for months.
MAX_SAID_DELAY = 6 * _HOUR


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a rule makes of one reply: the rule, and the wait the reply itself asked for
    ("try again in 30 seconds"), if it did."""

    rule: ReplyRule
    said: float | None = None

    @property
    def action(self) -> ReplyAction:
        return self.rule.action

    @property
    def delay(self) -> float | None:
        """The reply's own figure, else the rule's ``duration``."""
        return self.said if self.said is not None else self.rule.duration


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def fits(rule: ReplyRule, reply: Reply) -> bool:
    """Every match key of ``rule`` that is given fits ``reply``."""
    if rule.code is not None and rule.code != reply.code:
        return False
    if rule.dsn is not None and rule.dsn != reply.dsn:
        return False
    return rule.text is None or bool(_compiled(rule.text).search(reply.text))


def said_delay(text: str) -> float | None:
    """The wait a reply asks for ("try again in 30 seconds", "in 5 minutes"), or None."""
    m = _DELAY.search(text)
    if m is None:
        return None
    seconds = int(m.group(1)) * (_MIN if m.group(2).lower().startswith("m") else 1.0)
    return min(max(1.0, seconds), MAX_SAID_DELAY)


def judge(user_rules: Sequence[ReplyRule], reply: Reply) -> Verdict | None:
    """The first rule (the operator's, then the shipped ones) that fits a non-2xx ``reply``."""
    if 200 <= reply.code < 300:
        return None
    for rule in (*user_rules, *SHIPPED):
        if fits(rule, reply):
            return Verdict(rule, said_delay(reply.text) if rule.action is not ReplyAction.FAIL
                           else None)
    return None


def provider_of(sh: Smarthost) -> str | None:
    """The provider whose shipped rules were written for ``sh``'s host, if one is known."""
    host = (sh.host or "").lower().rstrip(".")
    for provider, suffixes in PROVIDER_HOSTS.items():
        if any(host == s or host.endswith("." + s) for s in suffixes):
            return provider
    return None


def rules_for(user_rules: Sequence[ReplyRule], sh: Smarthost) -> tuple[str, ...]:
    """The names of the rules ``route test`` shows for ``sh``: the operator's, the shipped
    ones of its provider, and the ones for any provider."""
    provider = provider_of(sh)
    shipped = tuple(r.name for r in SHIPPED
                    if (provider is not None and r.name.startswith(provider + "-"))
                    or r.name == "try-again-in")
    return (*(r.name for r in user_rules), *shipped)
