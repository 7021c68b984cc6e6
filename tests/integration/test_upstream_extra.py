"""Upstream faults not covered by test_forwarder.py: a 554 greeting from a smarthost and a
server that answers garbage (catalogue T62, T79). Both concern the smarthost, not the
message: deferred, the smarthost paused, nothing bounced."""

from __future__ import annotations

import pytest

from relayd.model import Status
from tests.integration.test_forwarder import deliver
from tests.support.upstream import FakeUpstream


@pytest.mark.parametrize("greeting", [
    "554 5.7.1 service unavailable for your IP",   # RFC 5321 §3.1: no service here
    "garbage without any reply code",               # aiosmtplib reports code -1
    "99 too short",
    "250-continued forever",
])
async def test_greeting_failures_defer_and_pause_the_smarthost(greeting: str) -> None:
    async with FakeUpstream(replies={"greeting": greeting}) as up:
        result = await deliver(up.smarthost(), rcpts=("a@example.net", "b@example.net"))
    assert [o.status for o in result.outcomes] == [Status.DEFERRED, Status.DEFERRED]
    assert result.smarthost_fault
    assert up.messages == []


@pytest.mark.parametrize("stage", ["ehlo", "mail", "data", "dot"])
@pytest.mark.parametrize("reply", ["garbage", "2", "999 what"])
async def test_garbage_reply_at_any_stage_is_not_a_bounce(stage: str, reply: str) -> None:
    async with FakeUpstream(replies={stage: reply}) as up:
        result = await deliver(up.smarthost(), rcpts=("a@example.net",))
    assert [o.status for o in result.outcomes] == [Status.DEFERRED]
