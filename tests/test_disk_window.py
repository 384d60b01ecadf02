"""While a few client sessions are open, a delivery worker starts on its entry when a
batch of stores begins its fsyncs (the moment the loop would otherwise be idle), or
after a bound; with no session open, or many, it starts at once. In process: a real
spool, spool writer, delivery workers and upstream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import PASSWORD_ENV, relay_config
from upstream import PASSWORD, Upstream

import relay.tuning
from relay.config import parse_config
from relay.delivery import Delivery
from relay.entry import NewEntry
from relay.spool import Spool, new_id
from relay.tuning import QUIET_SESSIONS
from relay.writer import SpoolWriter

CONTENT = b"Subject: window\r\n\r\nbody\r\n"


def new_entry(recipient: str) -> NewEntry:
    return NewEntry(new_id(time.time()), "app@example.com", (recipient,), (CONTENT,),
                    time.time(), False)


async def until(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether `condition` became true within `seconds`, polled on the loop."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def run_delivery(tmp_path: Path, upstream: Upstream, ca_file: Path, sessions: int,
                 scenario: Callable[[SpoolWriter, Delivery], object]) -> object:
    config = parse_config(yaml.safe_dump(relay_config(tmp_path, upstream, ca_file)),
                          {PASSWORD_ENV: PASSWORD})
    spool = Spool(config.spool.path)
    spool.open()

    async def main() -> object:
        writer = SpoolWriter(spool)
        writer.start()
        delivery = Delivery(spool, writer, config, client_sessions=lambda: sessions)
        delivery.start()
        try:
            return await scenario(writer, delivery)  # type: ignore[misc]
        finally:
            await delivery.stop(grace=5)
            await writer.close()
    return asyncio.run(main())


@pytest.fixture(autouse=True)
def no_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a store (or no session) may let a worker go in these tests."""
    monkeypatch.setattr(relay.tuning, "LISTENER_QUIET_WAIT", 60.0)


def test_with_a_session_open_a_worker_waits_for_a_store_to_reach_the_disk(
        tmp_path: Path, upstream: Upstream, ca_file: Path) -> None:
    """The entry is not sent while nothing is stored, and waits claimed, in active/ (in
    incoming/ the watcher could schedule it twice); the next store's fsyncs let it go
    (that store's own entry then waits for the one after it, or for the bound)."""
    async def scenario(writer: SpoolWriter, delivery: Delivery) -> tuple[bool, str, bool]:
        first = new_entry("first@example.com")
        delivery.schedule_new(await writer.store(first), first.parts)
        sent_alone = await until(lambda: bool(upstream.messages()), 0.5)
        [where] = [queue for queue in ("incoming", "active")
                   if (tmp_path / "spool" / queue / first.id).exists()]
        await writer.store(new_entry("second@example.com"))
        sent_after = await until(lambda: bool(upstream.delivered_to("first@example.com")), 15)
        return sent_alone, where, sent_after
    assert run_delivery(tmp_path, upstream, ca_file, 1, scenario) == (False, "active", True)


@pytest.mark.parametrize("sessions", [0, QUIET_SESSIONS + 1])
def test_with_no_session_open_or_many_a_worker_starts_at_once(
        tmp_path: Path, upstream: Upstream, ca_file: Path, sessions: int) -> None:
    """No client connected, nothing to give way to; many, and the loop is seldom idle:
    either way the entry goes out without any store behind it."""
    async def scenario(writer: SpoolWriter, delivery: Delivery) -> bool:
        only = new_entry("only@example.com")
        delivery.schedule_new(await writer.store(only), only.parts)
        return await until(lambda: len(upstream.messages()) == 1, 15)
    assert run_delivery(tmp_path, upstream, ca_file, sessions, scenario) is True
