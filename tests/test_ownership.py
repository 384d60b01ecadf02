"""Every state has an owner and a way out (issue 19, finding 4, and the rule behind it):
an entry in active/ that no delivery owns goes back to the queue within seconds, a claim
that cannot read its entry puts it back, and an attempt whose outcome cannot be recorded
is set aside in failed/ rather than retried blindly."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from conftest import holds_for, relay_config, wait_for
from upstream import Upstream

from relay.entry import Queue
from relay.errors import SpoolError
from relay.spool import Spool, new_id

BODY = b"Subject: owners\r\nMessage-ID: <owners@example.com>\r\n\r\nbody\r\n"


def stored(spool: Spool) -> str:
    entry_id = new_id(time.time())
    spool.store(entry_id, "a@example.com", ["b@example.com"], [BODY], time.time(), False)
    return entry_id


@pytest.mark.plan(110)
def test_a_claim_that_cannot_read_its_entry_puts_it_back(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """EMFILE between the claim's rename and its read: SpoolError, and the entry is back
    in incoming/, not left in active/ without an owner."""
    entry_id = stored(spool)

    def no_descriptors(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(spool, "load", no_descriptors)
    with pytest.raises(SpoolError, match="Too many open files"):
        spool.claim(entry_id, time.time())
    assert spool.queue_ids(Queue.INCOMING) == [entry_id]
    assert spool.queue_ids(Queue.ACTIVE) == []


@pytest.mark.plan(110)
def test_an_entry_left_in_active_goes_back_within_seconds(
        tmp_path: Path, make_relay, upstream: Upstream, ca_file: Path) -> None:
    """An entry in active/ that no delivery owns (left by an error, or put there) is back
    in deferred/ within seconds, without a restart, and `relay queue hold` works on it."""
    upstream.stop()
    relay = make_relay(relay_config(tmp_path, upstream, ca_file,
                                    delivery={"retry_min": "1h", "retry_max": "2h"}))
    entry_id = relay.send("app@example.com", ["user@example.com"], BODY)
    wait_for(lambda: relay.files("deferred") == [entry_id], what="the deferral")
    os.rename(relay.spool / "deferred" / entry_id, relay.spool / "active" / entry_id)
    wait_for(lambda: relay.files("deferred") == [entry_id], what="the sweep")
    # The sweep logs after its rename: wait for the line rather than read the log at once.
    wait_for(lambda: f"{entry_id}: event=sweep, status=deferred" in relay.log(),
             what="the sweep's log line")
    held = relay.cli("queue", "hold", entry_id)
    assert held.returncode == 0, held.stderr
    assert relay.files("hold") == [entry_id]


@pytest.mark.plan(110)
def test_an_entry_that_cannot_even_be_set_aside_is_set_aside_once_the_disk_allows(
        tmp_path: Path, make_relay, upstream: Upstream, ca_file: Path) -> None:
    """Neither state/ nor failed/ can be written: the entry stays in active/, is never
    sent again, and once failed/ is back a sweep moves it there, without a restart."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file,
                                    delivery={"retry_min": "100ms"}))
    for name in ("state", "failed"):
        (relay.spool / name).rename(relay.spool / f"{name}.moved")
        (relay.spool / name).write_text("not a directory")
    entry_id = relay.send("app@example.com", ["ok@example.com", "tempfail@example.com"], BODY)
    wait_for(lambda: f"{entry_id}: status=stuck" in relay.log(), what="the entry stuck")
    holds_for(lambda: relay.files("active") == [entry_id]
              and len(upstream.delivered_to("ok@example.com")) == 1, 2.5,
              what="stuck in active/, through a sweep, not sent again")
    (relay.spool / "failed").unlink()
    (relay.spool / "failed.moved").rename(relay.spool / "failed")
    wait_for(lambda: relay.files("failed") == [entry_id], what="the entry set aside")
    assert f"{entry_id}: status=failed, reason=set aside:" in relay.log()
    assert len(upstream.delivered_to("ok@example.com")) == 1


@pytest.mark.plan(107, 110)
def test_an_attempt_whose_outcome_cannot_be_saved_is_set_aside_not_retried(
        tmp_path: Path, make_relay, upstream: Upstream, ca_file: Path) -> None:
    """The state record cannot be written (state/ is not a directory any more): the entry
    goes to failed/ with the reason logged, and the recipient the upstream accepted is
    not sent again, where a blind retry every retry_min would have."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file,
                                    delivery={"retry_min": "100ms"}))
    state = relay.spool / "state"
    state.rename(relay.spool / "state.moved")
    state.write_text("not a directory")
    entry_id = relay.send("app@example.com", ["ok@example.com", "tempfail@example.com"], BODY)
    wait_for(lambda: relay.files("failed") == [entry_id], what="the entry set aside")
    holds_for(lambda: len(upstream.delivered_to("ok@example.com")) == 1, 1.5,
              what="one copy for the accepted recipient")
    assert f"{entry_id}: status=failed, reason=set aside:" in relay.log()
    assert f"{entry_id}: to=<ok@example.com>" in relay.log()
    assert relay.files("active") == [] and relay.files("deferred") == []
