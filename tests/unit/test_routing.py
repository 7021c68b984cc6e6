"""Routing as pure functions: which route each recipient takes (a table), how an accepted
message is split by route (rewrites, priority, per-route sender and DKIM), what each shipped
provider rule makes of its reply, and how a throttled attempt settles."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from relayd.config.schema import DEFAULT_ROUTE, ReplyAction, ReplyRule, RetryConfig, Route, RouteMatch
from relayd.delivery.backoff import backoff_delay
from relayd.delivery.outcomes import apply_rules
from relayd.delivery.records import Delays, Tally
from relayd.delivery.transition import Requeue, settle
from relayd.model import DeliveryResult, Envelope, Message, RecipientOutcome, Reply, State, Status
from relayd.policy.by_route import route_policy, split_by_route
from relayd.policy.pipeline import build_policy, run_pipeline
from relayd.policy.records import PolicyContext
from relayd.routing import rules
from relayd.routing.match import Facts, choose, header_from_domain, split
from relayd.spool.records import Entry, Meta
from tests.support.policy_helpers import config, dkim_keypair

ROUTES = (
    Route("billing", RouteMatch(from_=("@billing.example.com", "invoices@example.com")),
          ("ses-billing", "primary")),
    Route("internal", RouteMatch(to_domain=("corp.example.com", "lab.example.com")), ("exchange",)),
    Route("urgent", RouteMatch(priority=True), ("primary",)),
    Route("marketing", RouteMatch(from_header_domain=("news.example.com",)), ("mailgun",)),
    Route("partner", RouteMatch(user=("partner-app",)), ("primary",)),
    Route("both", RouteMatch(from_=("@shop.example.com",), to_domain=("corp.example.com",)),
          ("exchange",)),
)


@dataclass(frozen=True)
class Case:
    facts: Facts
    rcpt: str
    route: str


CASES = {
    "sender domain": Case(Facts("a@billing.example.com"), "x@gmail.com", "billing"),
    "sender domain, any case": Case(Facts("A@Billing.Example.COM"), "x@gmail.com", "billing"),
    "sender address": Case(Facts("invoices@example.com"), "x@gmail.com", "billing"),
    "other address of that domain": Case(Facts("sales@example.com"), "x@gmail.com", DEFAULT_ROUTE),
    "subdomain is not the domain": Case(Facts("a@eu.billing.example.com"), "x@gmail.com",
                                        DEFAULT_ROUTE),
    "recipient domain": Case(Facts("app@example.com"), "bob@lab.example.com", "internal"),
    "first match wins": Case(Facts("a@billing.example.com"), "bob@corp.example.com", "billing"),
    "priority": Case(Facts("app@example.com", priority=True), "x@gmail.com", "urgent"),
    "not priority": Case(Facts("app@example.com"), "x@gmail.com", DEFAULT_ROUTE),
    "From header domain": Case(Facts("app@example.com", "news.example.com"), "x@gmail.com",
                               "marketing"),
    "authenticated user": Case(Facts("app@example.com", user="partner-app"), "x@gmail.com",
                               "partner"),
    "no user: local mail never matches user": Case(Facts("app@example.com"), "x@gmail.com",
                                                   DEFAULT_ROUTE),
    "all keys must match": Case(Facts("a@shop.example.com"), "x@gmail.com", DEFAULT_ROUTE),
    "all keys match": Case(Facts("a@shop.example.com"), "b@corp.example.com", "internal"),
    "null sender": Case(Facts(""), "x@gmail.com", DEFAULT_ROUTE),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_choose(case: Case) -> None:
    assert choose(ROUTES, case.facts, case.rcpt).name == case.route


def test_choose_says_why() -> None:
    assert choose(ROUTES, Facts("a@billing.example.com"), "x@y.z").why == \
        "routes[0] (billing): from <a@billing.example.com>"
    assert "no route matches" in choose(ROUTES, Facts("a@b.c"), "x@y.z").why


def test_catch_all_route_takes_everything() -> None:
    catch = (Route("all", RouteMatch(), ("primary",)),)
    assert choose(catch, Facts(""), "x@y.z").name == "all"


def test_split_groups_recipients_by_route_in_order() -> None:
    groups = split(ROUTES, Facts("app@example.com"),
                   ["a@gmail.com", "b@corp.example.com", "c@yahoo.com", "d@lab.example.com"])
    assert [(c.name, r) for c, r in groups] == [
        (DEFAULT_ROUTE, ("a@gmail.com", "c@yahoo.com")),
        ("internal", ("b@corp.example.com", "d@lab.example.com"))]


@pytest.mark.parametrize("content, domain", [
    (b"From: App <app@Billing.Example.com>\r\nTo: x@y\r\n\r\nhi\r\n", "billing.example.com"),
    (b"Subject: s\r\nfrom: app@news.example.com\r\n\r\n", "news.example.com"),
    (b"From: \"a, b\" <x@folded.example>\r\n\r\n", "folded.example"),
    (b"From:\r\n <x@folded.example>\r\n\r\n", "folded.example"),
    (b"To: x@y\r\n\r\nFrom: body@not.header\r\n", None),
])
def test_header_from_domain(content: bytes, domain: str | None) -> None:
    assert header_from_domain(content) == domain


# -- the split at acceptance ----------------------------------------------------------------

MAIL = (b"From: App <app@billing.example.com>\r\nTo: a@gmail.com\r\nSubject: invoice\r\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@x>\r\n\r\nhi\r\n")


def _accept(snippet: str, mail_from: str, rcpts: tuple[str, ...], content: bytes = MAIL,
            keys: dict[str, bytes] | None = None) -> list[Message]:
    cfg = config(snippet)
    policy = build_policy(cfg, keys or {})
    ctx = PolicyContext(now=1_800_000_000.0)
    msg = Message(Envelope(mail_from, rcpts), content)
    result = run_pipeline(policy, msg, ctx)
    policies = {r.name: route_policy(policy, r) for r in cfg.routes if r.changes_content}
    return list(split_by_route(cfg.routes, policies, msg, ctx, result).outputs)


SPLIT = """
smarthosts: [{name: preview, outbox: ./outbox}, {name: other, outbox: ./other}]
routes:
  - {name: internal, match: {to_domain: [corp.example.com]}, smarthosts: [other]}
  - {name: billing, match: {from: ["@billing.example.com"]}, smarthosts: [preview],
     envelope_from: bounces@billing.example.com}
"""


def test_a_message_to_two_routes_is_split_with_own_envelopes() -> None:
    outs = _accept(SPLIT, "app@billing.example.com",
                   ("a@gmail.com", "b@corp.example.com", "c@gmail.com"))
    assert [(m.envelope.route, m.envelope.rcpt_tos, m.envelope.mail_from) for m in outs] == [
        ("billing", ("a@gmail.com", "c@gmail.com"), "bounces@billing.example.com"),
        ("internal", ("b@corp.example.com",), "app@billing.example.com")]


def test_routes_match_the_sender_after_rewriting() -> None:
    snippet = SPLIT + "sender: {envelope_from: app@billing.example.com}\n"
    (out,) = _accept(snippet, "cron@host.example.com", ("a@gmail.com",))
    assert out.envelope.route == "billing"


def test_priority_route_and_unmatched_default() -> None:
    snippet = """
smarthosts: [{name: preview, outbox: ./outbox}]
priority: [{subject: "(?i)password reset"}]
routes: [{name: urgent, match: {priority: true}, smarthosts: [preview]}]
"""
    urgent = MAIL.replace(b"Subject: invoice", b"Subject: Password reset")
    (out,) = _accept(snippet, "app@example.com", ("a@gmail.com",), urgent)
    assert (out.envelope.route, out.envelope.priority) == ("urgent", True)
    (plain,) = _accept(snippet, "app@example.com", ("a@gmail.com",))
    assert plain.envelope.route == DEFAULT_ROUTE


def test_route_sender_from_and_dkim_choice(tmp_path: object) -> None:
    pem, _ = dkim_keypair()
    snippet = """
smarthosts: [{name: preview, outbox: ./outbox}]
dkim:
  - {domain: example.com, selector: s1, private_key_file: /dev/null}
  - {domain: billing.example.com, selector: s2, private_key_file: /dev/null}
routes:
  - name: billing
    match: {to_domain: [gmail.com]}
    smarthosts: [preview]
    sender: {from: {address: billing@billing.example.com, mode: always}}
    dkim: billing.example.com
"""
    keys = {"example.com": pem, "billing.example.com": pem}
    content = MAIL.replace(b"app@billing.example.com", b"app@example.com")
    outs = _accept(snippet, "app@example.com", ("a@gmail.com", "b@yahoo.com"), content, keys)
    routed = next(m for m in outs if m.envelope.route == "billing")
    other = next(m for m in outs if m.envelope.route == DEFAULT_ROUTE)
    assert b"From: billing@billing.example.com" in routed.content
    assert b"d=billing.example.com" in routed.content
    assert b"d=example.com;" in other.content and b"From: App <app@example.com>" in other.content


# -- reply rules ------------------------------------------------------------------------------

SHIPPED = {
    "ses-max-send-rate": Reply(454, "Throttling failure: Maximum sending rate exceeded."),
    "ses-daily-quota": Reply(454, "Throttling failure: Daily message quota exceeded."),
    "ses-temporary-failure": Reply(454, "Temporary service failure"),
    "o365-submission-quota": Reply(554, "5.2.0 STOREDRV.Submission.Exception:"
                                        "SubmissionQuotaExceededException; Failed to process"),
    "o365-sender-thread-limit": Reply(432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit "
                                           "exceeded"),
    "o365-send-as-denied": Reply(554, "5.2.252 SendAsDenied; app@example.com not allowed to send "
                                      "as billing@example.com; STOREDRV.Submission.Exception"),
    "gmail-rate-limited": Reply(421, "4.7.28 Gmail has detected an unusual rate of mail"),
    "gmail-daily-sending-quota": Reply(550, "5.4.5 Daily user sending quota exceeded."),
    "gmail-daily-relay-limit": Reply(550, "5.4.5 Daily SMTP relay limit exceeded for customer."),
    "gmail-peak-relay-limit": Reply(450, "4.2.1 Peak SMTP relay limit exceeded for customer."),
    "gmail-too-many-logins": Reply(454, "4.7.0 Too many login attempts, please try again later."),
    "sendgrid-credits-exceeded": Reply(451, "Authentication failed: Maximum credits exceeded"),
    "sendgrid-sender-identity": Reply(550, "The from address does not match a verified Sender "
                                           "Identity."),
    "mailgun-not-allowed-to-send": Reply(421, "Domain example.com is not allowed to send: "
                                              "Free accounts are for test purposes only."),
    "mailgun-rate-limit": Reply(421, "Too many requests"),
    "postmark-inactive-recipient": Reply(550, "Inactive recipient"),
    "postmark-account-pending": Reply(451, "Account is pending approval"),
    "brevo-unauthorized-ip": Reply(525, "5.7.1 Unauthorized IP address"),
    "brevo-rate-limit": Reply(421, "4.7.0 Rate limit exceeded"),
    "try-again-in": Reply(451, "4.7.1 Please try again in 30 seconds"),
}


def test_every_shipped_rule_has_a_case_and_a_source() -> None:
    assert {r.name for r in rules.SHIPPED} == set(SHIPPED)
    assert all(r.source for r in rules.SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_rule_matches_its_reply(name: str) -> None:
    verdict = rules.judge((), SHIPPED[name])
    assert verdict is not None and verdict.rule.name == name


def test_user_rules_come_first_and_success_is_never_judged() -> None:
    mine = ReplyRule(ReplyAction.FAIL, code=454, name="reply_rules[0]")
    verdict = rules.judge((mine,), SHIPPED["ses-max-send-rate"])
    assert verdict is not None and verdict.rule is mine
    assert rules.judge((mine,), Reply(250, "Throttling failure")) is None
    assert rules.judge((), Reply(451, "4.3.0 Try again later")) is None


@pytest.mark.parametrize("text, seconds", [
    ("try again in 30 seconds", 30.0), ("Try again in 2 seconds", 2.0), ("retry in 5 minutes", 300.0),
    ("in 1 min", 60.0), ("in 9999 minutes", rules.MAX_SAID_DELAY), ("in 0 seconds", 1.0),
    ("later", None)])
def test_said_delay(text: str, seconds: float | None) -> None:
    assert rules.said_delay(text) == seconds


def _result(reply: Reply, fault: bool = False) -> DeliveryResult:
    return DeliveryResult("ses", "ses[h]:587", (RecipientOutcome("a@x", Status.FAILED if
                                                                 reply.code >= 500 else Status.DEFERRED,
                                                                 reply, reply.dsn),),
                          smarthost_fault=fault)


def test_apply_rules_turns_replies_into_actions() -> None:
    slowed, v = apply_rules(_result(SHIPPED["ses-max-send-rate"], fault=True), ())
    assert v is not None and v.action is ReplyAction.SLOW_DOWN
    assert slowed.outcomes[0].status is Status.DEFERRED and not slowed.smarthost_fault
    paused, v = apply_rules(_result(SHIPPED["o365-submission-quota"]), ())
    assert v is not None and paused.smarthost_fault and paused.outcomes[0].status is Status.DEFERRED
    failed, v = apply_rules(_result(SHIPPED["postmark-inactive-recipient"]), ())
    assert failed.outcomes[0].status is Status.FAILED
    same, v = apply_rules(_result(Reply(451, "4.3.0 busy")), ())
    assert v is None and same == _result(Reply(451, "4.3.0 busy"))


def test_rules_for_names_the_provider_rules() -> None:
    from relayd.config.schema import Smarthost

    ses = Smarthost("ses", host="email-smtp.eu-west-1.amazonaws.com")
    assert rules.rules_for((), ses) == ("ses-max-send-rate", "ses-daily-quota",
                                        "ses-temporary-failure", "try-again-in")
    assert rules.rules_for((), Smarthost("x", host="mx.example.net")) == ("try-again-in",)


# -- a throttled attempt ------------------------------------------------------------------

NOW = 2_000_000.0
RETRY = RetryConfig(initial=60, max_interval=3600)


def _entry(attempts: int = 0, throttled: int = 0) -> Entry:
    return Entry("00000F4240ABCDEF", State.ACTIVE, Envelope("a@b", ("a@x",), route="billing"), 10,
                 NOW - 100, Meta(attempts=attempts, throttled=throttled))


def _deferred_tally(**kw: object) -> Tally:
    throttle = SHIPPED["ses-max-send-rate"]
    result = DeliveryResult("ses", "ses[h]:587", (RecipientOutcome("a@x", Status.DEFERRED, throttle,
                                                                   throttle.dsn),))
    tally = Tally(("a@x",)).add(result, Delays(0, 0, 0, 0), NOW)
    from dataclasses import replace
    return replace(tally, **kw)  # type: ignore[arg-type]


def test_a_throttled_attempt_counts_but_waits_as_told_and_keeps_the_backoff() -> None:
    t = settle(_entry(attempts=3, throttled=2), _deferred_tally(throttled=True, wait_until=NOW + 2),
               now=NOW, retry=RETRY, max_age=86400, hosts_available_at=NOW, route="billing")
    assert isinstance(t, Requeue)
    assert (t.due, t.meta.attempts, t.meta.throttled) == (NOW + 2, 4, 3)
    assert "relay=ses[h]:587, route=billing, delay=" in t.lines[0]
    assert "attempts=4" in t.lines[0]
    # The next ordinary deferral backs off as after its one unthrottled attempt, not four.
    nxt = settle(_entry(attempts=4, throttled=3), _deferred_tally(), now=NOW, retry=RETRY,
                 max_age=86400, hosts_available_at=NOW, rng=random.Random(1))
    assert isinstance(nxt, Requeue)
    assert nxt.due == NOW + backoff_delay(2, RETRY, random.Random(1))
