"""The rolling daily cap and the rate limiter, driven by an injected clock."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from relayd.config.schema import LimitsConfig, Smarthost
from relayd.delivery.limits import FENCE, WINDOW, DailyCap, RateLimiter, limited
from relayd.delivery.per_host import HostLimits
from relayd.units import Rate
from relayd.users.limits import UserLimits, _Bucket
from relayd.users.store import User, hash_password, write_users
from tests.support.clock import FakeClock
from tests.support.waiting import wait_until_sync

T0 = 1_800_000_000.0


def test_cap_holds_exactly_n_and_releases_later(tmp_path: Path) -> None:
    cap = DailyCap(5, tmp_path)
    sent = 0
    for i in range(8):  # 8 single-recipient messages, one a minute
        now = T0 + 60 * i
        if cap.acquire(1, now):
            cap.settle(1, 1, now)
            sent += 1
    assert sent == 5
    assert cap.remaining(T0 + 600) == 0
    assert cap.next_free_at(T0 + 600) == T0 + WINDOW
    assert cap.remaining(T0 + WINDOW - 1) == 0
    assert cap.remaining(T0 + WINDOW) == 1      # the first delivery left the window
    assert cap.remaining(T0 + WINDOW + 240) == 5


def test_cap_counts_recipients_and_grants_partially(tmp_path: Path) -> None:
    cap = DailyCap(4, tmp_path)
    assert cap.acquire(3, T0) == 3
    assert cap.acquire(3, T0) == 1              # in-flight recipients already count
    cap.settle(3, 3, T0)
    cap.settle(1, 0, T0)                        # that attempt failed: nothing delivered
    assert cap.remaining(T0) == 1
    assert cap.next_free_at(T0, 2) == T0 + WINDOW


class CountingLock:
    """The cap's lock, counting how often it is taken."""

    def __init__(self) -> None:
        self.inner = threading.Lock()
        self.taken = 0

    def __enter__(self) -> CountingLock:
        self.inner.acquire()
        self.taken += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.release()


@pytest.mark.parametrize("state", [False, True])
def test_settle_gives_the_reservation_back_and_counts_in_one_step(tmp_path: Path, state: bool) -> None:
    # Between two steps another delivery would find the reservation's room free while its
    # recipient is not counted yet, and a cap of 1 would let two through.
    cap = DailyCap(1, tmp_path if state else None)
    lock = CountingLock()
    cap._lock = lock  # type: ignore[assignment]
    assert cap.acquire(1, T0) == 1
    lock.taken = 0
    cap.settle(1, 1, T0)
    assert lock.taken == 1
    assert cap.remaining(T0) == 0 and cap.acquire(1, T0) == 0


def test_cap_survives_restart(tmp_path: Path) -> None:
    cap = DailyCap(10, tmp_path)
    cap.record(3, T0)
    cap.record(4, T0 + 3600)
    cap.close()
    again = DailyCap(10, tmp_path)
    assert again.remaining(T0 + 7200) == 3
    assert again.remaining(T0 + WINDOW + 1) == 6
    ro = DailyCap(10, tmp_path, readonly=True)
    assert ro.used(T0 + 7200) == 7
    assert DailyCap(10, tmp_path / "absent", readonly=True).used(T0) == 0


def test_cap_counts_a_long_day_and_prunes_its_file_once_a_minute(tmp_path: Path) -> None:
    """The window's count is kept as deliveries come and leave (not summed again per message),
    and rows that left the window leave the file at the next delivery a minute later."""
    import sqlite3

    cap = DailyCap(10**6, tmp_path)
    for i in range(3000):                        # one delivery every 40 s: 33 h
        cap.record(1, T0 + 40 * i)
    end = T0 + 40 * 2999
    in_window = sum(1 for i in range(3000) if T0 + 40 * i > end - WINDOW)
    assert cap.used(end) == in_window == 2160
    assert cap.remaining(end) == 10**6 - 2160
    cap.close()
    rows = sqlite3.connect(tmp_path / "daily_cap.sqlite3").execute(
        "SELECT count(*), min(at) FROM deliveries").fetchone()
    # pruned at the last delivery at most a minute (two deliveries) before the end
    assert in_window <= rows[0] <= in_window + 2
    assert DailyCap(10**6, tmp_path).used(end) == in_window


def test_reservations_do_not_wait_for_a_commit_and_concurrent_counts_all_land(
        tmp_path: Path) -> None:
    """A delivery's count is on disk when settle returns; while one commit waits for the
    disk, other deliveries still reserve, and their counts join the next commit."""
    import sqlite3
    import threading

    cap = DailyCap(1000, tmp_path)
    rows = cap._rows
    assert rows is not None
    real_commit = rows._commit
    entered, release = threading.Event(), threading.Event()
    commits: list[int] = []

    def slow_commit(batch: list[tuple[float, int]]) -> None:
        commits.append(len(batch))
        if len(commits) == 1:
            entered.set()
            release.wait(10)
        real_commit(batch)

    rows._commit = slow_commit  # type: ignore[method-assign,assignment]
    first = threading.Thread(target=cap.settle, args=(cap.acquire(1, T0), 1, T0))
    first.start()
    assert entered.wait(10)
    # The first commit hangs: reservations and the count in memory go on meanwhile.
    assert cap.acquire(5, T0) == 5
    assert cap.remaining(T0) == 1000 - 1 - 5
    others = [threading.Thread(target=cap.settle, args=(1, 1, T0)) for _ in range(5)]
    for t in others:
        t.start()
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert commits[0] == 1 and sum(commits) == 6 and len(commits) <= 6
    cap.close()
    assert sqlite3.connect(tmp_path / "daily_cap.sqlite3").execute(
        "SELECT sum(n) FROM deliveries").fetchone() == (6,)
    assert DailyCap(1000, tmp_path).used(T0) == 6


def test_priority_exempt() -> None:
    assert limited(LimitsConfig(priority_exempt=True), priority=False)
    assert not limited(LimitsConfig(priority_exempt=True), priority=True)
    assert limited(LimitsConfig(priority_exempt=False), priority=True)


def test_rate_allows_one_second_burst_then_paces(clock: FakeClock) -> None:
    rl = RateLimiter(Rate(14, 1), clock=clock)
    delays = [rl.reserve() for _ in range(16)]
    assert delays[:14] == [0.0] * 14
    assert delays[14] == pytest.approx(1 / 14)
    assert delays[15] == pytest.approx(2 / 14)
    clock.advance(10.0)                          # long idle: bucket full again, not more
    assert [rl.reserve() for _ in range(14)] == [0.0] * 14
    assert rl.reserve() > 0


async def test_rate_wait_sleeps_through_injected_sleep(clock: FakeClock) -> None:
    slept: list[float] = []

    async def sleep(d: float) -> None:
        slept.append(d)
        clock.advance(d)

    rl = RateLimiter(Rate(60, 60), clock=clock, sleep=sleep)  # 1/s, burst 1
    for _ in range(3):
        await rl.wait()
    assert slept == [pytest.approx(1.0), pytest.approx(1.0)]


# -- wall-clock jumps (T17/T18/T87) -------------------------------------------------------------
DAY = 86400.0


def stamps(state_dir: Path, name: str = "daily_cap.sqlite3") -> list[tuple[float, int]]:
    """The rows of a cap file, oldest first."""
    import sqlite3

    db = sqlite3.connect(state_dir / name)
    try:
        return [(float(at), int(n)) for at, n in db.execute("SELECT at, n FROM deliveries ORDER BY at")]
    finally:
        db.close()


@pytest.mark.parametrize("jump_days", [-3.0, 5.0])
def test_shift_keeps_a_full_cap_on_real_time_in_memory_and_in_its_file(
        tmp_path: Path, jump_days: float) -> None:
    """A jump moves every stamp by as much, so the cap frees after the real 24 h: not three
    days later (clock set back), not at once (clock forward); a restart reads the same."""
    ticks = FakeClock(0.0)
    cap = DailyCap(2, tmp_path, monotonic=ticks)
    cap.record(1, T0)
    cap.record(1, T0 + 60)
    jump = jump_days * DAY
    cap.shift(jump, T0 + 120 + jump)        # noticed two real minutes after the first delivery
    ticks.advance(FENCE)                     # past the fence: readings count as given
    now = T0 + 120 + FENCE + jump
    assert cap.remaining(now) == 0
    assert cap.next_free_at(now) == T0 + jump + WINDOW
    cap.close()                              # writes the shift no delivery wrote yet
    assert stamps(tmp_path) == [(T0 + jump, 1), (T0 + 60 + jump, 1)]
    for again in (DailyCap(2, tmp_path), DailyCap(2, tmp_path, readonly=True)):  # restart, explain
        assert again.remaining(now) == 0
        assert again.remaining(T0 + jump + WINDOW - 1) == 0
        assert again.remaining(T0 + jump + WINDOW) == 1
        again.close()


def test_a_reading_from_before_the_jump_neither_empties_the_cap_nor_stamps_days_off(
        tmp_path: Path) -> None:
    """A worker thread may still use a reading taken before the queue manager noticed the
    jump: for a minute the cap counts on the time it was noticed plus the real time since."""
    ticks = FakeClock(0.0)
    cap = DailyCap(2, tmp_path, monotonic=ticks)
    cap.record(2, T0)
    back = -3 * DAY
    cap.shift(back, T0 + 10 + back)
    ticks.advance(5)
    stale = T0 + 12                          # three days ahead of the moved stamps
    assert cap.acquire(1, stale) == 0        # still full: the window was not emptied
    assert cap.next_free_at(stale) == stale + WINDOW - 15   # as far from the caller's reading
    cap.record(1, stale)                     # exempt priority mail: stamped at the real time
    ticks.advance(FENCE)
    assert cap.remaining(T0 + back + WINDOW - 1) == 0       # then readings count as given
    assert cap.remaining(T0 + back + WINDOW) == 1
    assert cap.remaining(T0 + 15 + back + WINDOW) == 2
    cap.close()
    assert stamps(tmp_path) == [(T0 + back, 2), (T0 + 15 + back, 1)]


def test_rows_queued_before_a_shift_move_with_it(tmp_path: Path) -> None:
    """The file's rows and shifts are committed in the order they were queued: a delivery
    counted before the jump was noticed, still waiting for a commit, moves with it."""
    import threading

    cap = DailyCap(10, tmp_path, monotonic=FakeClock(0.0))
    rows = cap._rows
    assert rows is not None
    real_commit = rows._commit
    entered, release = threading.Event(), threading.Event()
    batches: list[int] = []

    def slow_commit(ops: list[Any]) -> None:
        batches.append(len(ops))
        if len(batches) == 1:
            entered.set()
            release.wait(10)
        real_commit(ops)

    rows._commit = slow_commit  # type: ignore[method-assign]
    first = threading.Thread(target=cap.record, args=(1, T0))
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=cap.record, args=(2, T0 + 1))
    second.start()
    wait_until_sync(lambda: len(rows._pending) == 1, what="the second row queued")
    cap.shift(-DAY, T0 + 2 - DAY)            # queued behind it
    release.set()
    for t in (first, second):
        t.join(10)
    cap.flush()
    assert batches == [1, 2]
    assert cap.used(T0 + 2 - DAY) == 3
    cap.close()
    assert stamps(tmp_path) == [(T0 - DAY, 1), (T0 + 1 - DAY, 2)]


def test_host_limits_shift_their_caps_and_slow_downs(tmp_path: Path) -> None:
    """Per-smarthost caps and reply-rule slow-downs keep their real length across a jump."""
    ses = Smarthost("ses", host="email-smtp.example.com", daily_cap=1)
    limits = HostLimits(tmp_path, clock=lambda: T0)
    limits.apply([ses])
    grant = limits.reserve("ses", 1, T0)
    limits.settle("ses", grant.count, 1, T0)
    limits.slow_down(ses, Rate(1, 60), 600, T0)
    back = -3 * DAY
    limits.shift(back, T0 + 10 + back)
    assert limits.current_rate("ses", T0 + back + 599) == Rate(1, 60)
    assert limits.current_rate("ses", T0 + back + 601) is None   # its own rate: none
    limits.flush()
    limits.close()
    again = HostLimits(tmp_path, clock=lambda: T0)
    again.apply([ses])
    assert again.reserve("ses", 1, T0 + back + WINDOW - 1).free_at == T0 + back + WINDOW
    assert again.reserve("ses", 1, T0 + back + WINDOW).count == 1
    again.close()


def test_users_caps_shift_and_their_rate_is_not_in_debt_after_the_clock_is_set_back(
        tmp_path: Path) -> None:
    users_file = tmp_path / "users.yaml"
    write_users(users_file, {"alice": User("alice", hash_password("pw"), ("*",), daily_cap=1)})
    users = UserLimits(users_file, tmp_path, window=WINDOW)
    assert users.hold("q1", "alice", 1, T0) == (0.0, "")
    users.delivered("q1", 1, T0)
    back = -3 * DAY
    users.shift(back, T0 + 10 + back)
    users.flush()
    users.close()
    again = UserLimits(users_file, tmp_path, window=WINDOW)
    assert again.hold("q2", "alice", 1, T0 + back + WINDOW - 1)[0] > 0
    assert again.hold("q2", "alice", 1, T0 + back + WINDOW) == (0.0, "")
    again.close()
    bucket = _Bucket(Rate(1, 1))             # the users' rate reads the wall clock
    assert bucket.take(1, T0) == 0.0
    assert bucket.take(1, T0 + back) == pytest.approx(1.0)   # not three days of debt
    assert bucket.take(1, T0 + back + 1) == 0.0
