"""Clock jumps (docs/RELIABILITY-PLAN.md row 85): a step of the system clock neither expires the
queue at once nor pushes retries out of reach, and it is logged."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from conftest import relay_config, wait_for
from upstream import Upstream

from relay.clock import SteadyClock
from relay.config import DeliveryConfig, load_config
from relay.daemon import Daemon
from relay.entry import Entry, Queue, Recipient
from relay.outcome import AttemptResult, Disposition, Reply, Stage
from relay.policy import settle

DAY = 86400.0


class FakeClocks:
    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.monotonic = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.monotonic += seconds


@pytest.mark.plan(85)
def test_steady_clock_ignores_steps_of_the_wall_clock_and_measures_them() -> None:
    clocks = FakeClocks()
    clock = SteadyClock(lambda: clocks.wall, lambda: clocks.monotonic)
    start = clock()
    clocks.advance(10)
    assert clock() == start + 10 and clock.skew() == 0
    clocks.wall += 30 * DAY  # a step forward
    assert clock() == start + 10 and clock.skew() == 30 * DAY
    clocks.wall -= 31 * DAY  # then a step back, past where it started
    assert clock() == start + 10 and clock.skew() == -DAY


@pytest.mark.plan(85)
def test_forward_jump_does_not_expire_a_young_entry() -> None:
    """The entry arrived a minute ago by the relay's clock; the system clock says 30 days."""
    clocks = FakeClocks()
    clock = SteadyClock(lambda: clocks.wall, lambda: clocks.monotonic)
    entry = Entry(id="0" * 21, queue=Queue.ACTIVE, sender="a@example.com",
                  recipients=(Recipient("b@example.com"),), arrived=clock(), size=1)
    clocks.advance(60)
    clocks.wall += 30 * DAY
    config = DeliveryConfig(retry_min=60, retry_max=3600, max_age=5 * DAY, max_attempts=None)
    result = AttemptResult("up:587", error=Reply(451, "4.3.0 later"), stage=Stage.DATA)
    settled = settle(entry, result, clock(), clock(), config, 0.5)
    assert settled.disposition is Disposition.DEFERRED
    assert settled.entry.next_attempt is not None
    assert settled.entry.next_attempt - clock() <= config.retry_max


@pytest.mark.plan(85)
def test_jump_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config_path = tmp_path / "relay.yaml"
    config_path.write_text(f"spool: {{path: {tmp_path / 'spool'}}}\n")
    daemon = Daemon(load_config(str(config_path)))
    clocks = FakeClocks()
    daemon.clock = SteadyClock(lambda: clocks.wall, lambda: clocks.monotonic)
    with caplog.at_level(logging.WARNING):
        daemon.check_clock()
        assert "clock" not in caplog.text
        clocks.wall += 30 * DAY
        daemon.check_clock()
        daemon.check_clock()
    assert caplog.text.count("the system clock jumped") == 1
    assert "skew=+2592000s" in caplog.text


@pytest.mark.plan(85)
def test_retry_set_before_the_clock_went_back_comes_due_within_retry_max(
        tmp_path: Path, make_relay, upstream: Upstream, ca_file: Path) -> None:
    """A deferred entry whose next attempt lies a day ahead (stamped before the clock was
    set back a day, then the relay restarted) is tried within retry_max, and a warning
    says why."""
    config = relay_config(tmp_path, upstream, ca_file)
    upstream.stop()
    relay = make_relay(config)
    entry_id = relay.send("app@example.com", ["user@example.com"], b"Subject: x\r\n\r\nx\r\n")
    wait_for(lambda: entry_id in relay.files("deferred"), what="the deferral")
    relay.stop()
    a_day_ahead = relay.spool / "deferred" / entry_id
    os.utime(a_day_ahead, (a_day_ahead.stat().st_atime, a_day_ahead.stat().st_mtime + DAY))
    upstream.start()
    restarted = make_relay(config)
    wait_for(lambda: upstream.delivered_to("user@example.com"), what="delivery within retry_max")
    assert "event=clock, deferred=1" in restarted.log()
