"""A message the listener has just stored goes out on its first attempt from memory: the
delivery workers, in process with a real spool, spool writer and upstream, never read it
back. What is not kept (too large, past the bound, or moved before its attempt) is read
from the spool as any other entry is."""

from __future__ import annotations

import asyncio
import os
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
from relay.entry import Entry, NewEntry, Queue
from relay.spool import Spool, new_id
from relay.tuning import INLINE_READ_BYTES
from relay.writer import SpoolWriter

RECEIVED = b"Received: from test\r\n"
LINE = b"z" * 998 + b"\r\n"


def body(n: int, lines: int = 2) -> bytes:
    return b"Subject: fresh %d\r\nMessage-ID: <fresh%d@example.com>\r\n\r\n" % (n, n) + LINE * lines


class Run:
    """Stores `bodies` through the spool writer, hands them all to delivery at once (as
    the listener does, one by one, as they become durable), and waits until the upstream
    has them; records which entries delivery read back from the spool."""

    def __init__(self, tmp_path: Path, upstream: Upstream, ca_file: Path,
                 monkeypatch: pytest.MonkeyPatch) -> None:
        text = yaml.safe_dump(relay_config(tmp_path, upstream, ca_file))
        self.config = parse_config(text, {PASSWORD_ENV: PASSWORD})
        self.spool = Spool(self.config.spool.path)
        self.spool.open()
        self.upstream = upstream
        self.reads: list[str] = []
        content, load = self.spool.content, self.spool.load

        def reading_content(entry: Entry) -> bytes:
            self.reads.append(entry.id)
            return content(entry)

        def reading_load(queue: Queue, entry_id: str, has_state: bool = True) -> Entry:
            self.reads.append(entry_id)
            return load(queue, entry_id, has_state)
        monkeypatch.setattr(self.spool, "content", reading_content)
        monkeypatch.setattr(self.spool, "load", reading_load)

    def deliver(self, bodies: list[bytes], before_scheduling: Callable[[list[str]], None] =
                lambda ids: None, expect: int | None = None) -> list[str]:
        async def main() -> list[str]:
            writer = SpoolWriter(self.spool)
            writer.start()
            delivery = Delivery(self.spool, writer, self.config)
            delivery.start()
            stored = []
            for n, content in enumerate(bodies):
                new = NewEntry(new_id(time.time()), "app@example.com", (f"fresh{n}@example.com",),
                               (RECEIVED, content), time.time(), False)
                stored.append((await writer.store(new), new.parts))
            before_scheduling([entry.id for entry, _ in stored])
            for entry, parts in stored:
                delivery.schedule_new(entry, parts)
            deadline = time.monotonic() + 15
            expected = len(bodies) if expect is None else expect
            while (len(self.upstream.messages()) < expected
                   or os.listdir(self.spool.path / "active")):
                assert time.monotonic() < deadline, "delivery"
                await asyncio.sleep(0.01)
            await delivery.stop(grace=5)
            await writer.close()
            return [entry.id for entry, _ in stored]
        return asyncio.run(main())

    def delivered(self, n: int) -> bytes:
        [got] = self.upstream.delivered_to(f"fresh{n}@example.com")
        return got.data


@pytest.fixture
def run(tmp_path: Path, upstream: Upstream, ca_file: Path,
        monkeypatch: pytest.MonkeyPatch) -> Run:
    return Run(tmp_path, upstream, ca_file, monkeypatch)


def test_a_just_stored_message_goes_out_without_being_read_back(run: Run) -> None:
    run.deliver([body(0)])
    assert run.reads == []
    assert run.delivered(0) == RECEIVED + body(0)
    assert os.listdir(run.spool.path / "incoming") == []


def test_a_message_larger_than_the_inline_limit_is_read_from_the_spool(run: Run) -> None:
    large = body(0, INLINE_READ_BYTES // len(LINE) + 10)
    [entry_id] = run.deliver([large])
    assert run.reads == [entry_id] * 2  # envelope and content
    assert run.delivered(0) == RECEIVED + large


def test_messages_past_the_memory_bound_are_read_from_the_spool(
        run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound holds one of these messages: the second and third are read back."""
    bodies = [body(n) for n in range(3)]
    monkeypatch.setattr(relay.tuning, "FRESH_BYTES", len(RECEIVED + bodies[0]) + 100)
    ids = run.deliver(bodies)
    assert sorted(run.reads) == sorted(ids[1:] * 2)  # envelope and content of each
    for n, content in enumerate(bodies):
        assert run.delivered(n) == RECEIVED + content


def test_a_message_held_before_its_first_attempt_is_not_sent(run: Run,
                                                             upstream: Upstream) -> None:
    """The operator held the first message before delivery saw it: it stays held, and the
    one beside it goes out."""
    def hold_first(ids: list[str]) -> None:
        assert run.spool.move(ids[0], (Queue.INCOMING,), Queue.HOLD) is not None
    ids = run.deliver([body(0), body(1)], before_scheduling=hold_first, expect=1)
    assert upstream.delivered_to("fresh0@example.com") == []
    assert run.delivered(1) == RECEIVED + body(1)
    assert os.listdir(run.spool.path / "hold") == [ids[0]]
