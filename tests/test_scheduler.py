"""The delivery scheduler: which idle worker is woken for an entry, and when."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from relay.scheduler import Scheduler


def run(scenario: Callable[[Scheduler], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        return await asyncio.wait_for(scenario(Scheduler(time.time)), 10)
    return asyncio.run(main())


async def idle_workers(scheduler: Scheduler, count: int) -> list[asyncio.Task[str | None]]:
    """`count` workers waiting in next_due, started in order (the last is the latest idle)."""
    workers = []
    for _ in range(count):
        workers.append(asyncio.create_task(scheduler.next_due()))
        await asyncio.sleep(0)  # let it reach its wait before the next one starts
    return workers


async def settle() -> None:
    """Let every woken task run to its next wait."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_an_entry_wakes_one_idle_worker_the_latest_idle() -> None:
    """One entry for five idle workers: the one that went idle last takes it, the others
    sleep on."""
    async def scenario(scheduler: Scheduler) -> None:
        workers = await idle_workers(scheduler, 5)
        scheduler.schedule("A", 0.0)
        await settle()
        assert [w.done() for w in workers] == [False, False, False, False, True]
        assert workers[-1].result() == "A"
        scheduler.close()
        assert await asyncio.gather(*workers[:-1]) == [None] * 4
    run(scenario)


def test_entries_due_together_reach_as_many_workers() -> None:
    """Three entries scheduled at once are taken by three workers, each exactly once."""
    async def scenario(scheduler: Scheduler) -> None:
        workers = await idle_workers(scheduler, 4)
        for entry_id in ("A", "B", "C"):
            scheduler.schedule(entry_id, 0.0)
        await settle()
        taken = sorted(w.result() for w in workers if w.done())
        assert taken == ["A", "B", "C"]
        scheduler.close()
        await asyncio.gather(*workers)
    run(scenario)


def test_the_next_entry_due_later_is_watched_after_one_is_taken() -> None:
    """After a worker takes the entry the timer woke it for, the next one, due later,
    still reaches an idle worker when it is due."""
    async def scenario(scheduler: Scheduler) -> None:
        workers = await idle_workers(scheduler, 2)
        now = time.time()
        scheduler.schedule("X", now + 0.1)
        scheduler.schedule("Y", now + 0.2)
        done, _ = await asyncio.wait(workers, timeout=5)
        assert sorted(str(w.result()) for w in done) == ["X", "Y"]
    run(scenario)


def test_entries_falling_due_together_wake_a_worker_each() -> None:
    """Three entries due at the same moment: the timer wakes one worker, which passes
    the others on, and three workers take one each."""
    async def scenario(scheduler: Scheduler) -> None:
        workers = await idle_workers(scheduler, 4)
        due = time.time() + 0.1
        for entry_id in ("A", "B", "C"):
            scheduler.schedule(entry_id, due)
        await asyncio.wait(workers, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        await settle()
        assert sorted(str(w.result()) for w in workers if w.done()) == ["A", "B", "C"]
        scheduler.close()
        await asyncio.gather(*workers)
    run(scenario)


def test_an_entry_due_later_is_returned_when_due_not_before() -> None:
    """An entry due in 0.2 s wakes its worker then, not at once."""
    async def scenario(scheduler: Scheduler) -> None:
        workers = await idle_workers(scheduler, 2)
        due = time.time() + 0.2
        scheduler.schedule("later", due)
        await settle()
        assert not any(w.done() for w in workers)
        assert await asyncio.wait_for(asyncio.shield(asyncio.wait(
            workers, return_when=asyncio.FIRST_COMPLETED)), 5)
        assert time.time() >= due
        assert sorted(str(w.result()) for w in workers if w.done()) == ["later"]
        scheduler.close()
        await asyncio.gather(*workers)
    run(scenario)


def test_a_rescheduled_entry_is_returned_at_its_new_time() -> None:
    """An entry moved from 0.05 s to 0.2 s ahead: its old heap item wakes nobody into
    taking it early, and it is returned once the new time has come."""
    async def scenario(scheduler: Scheduler) -> None:
        workers = await idle_workers(scheduler, 1)
        now = time.time()
        scheduler.schedule("A", now + 0.05)
        scheduler.schedule("A", now + 0.2)
        assert await asyncio.wait_for(workers[0], 5) == "A"
        assert time.time() >= now + 0.2
    run(scenario)


def test_a_wakeup_is_passed_on_when_its_worker_is_cancelled() -> None:
    """A worker cancelled after being woken, before it ran, does not take the entry with it."""
    async def scenario(scheduler: Scheduler) -> None:
        workers = await idle_workers(scheduler, 2)
        scheduler.schedule("A", 0.0)
        workers[-1].cancel()  # the one just woken
        await settle()
        assert workers[-1].cancelled()
        assert workers[0].done() and workers[0].result() == "A"
    run(scenario)


def test_close_returns_none_to_every_waiting_and_later_caller() -> None:
    """After close(), next_due returns None at once, for waiting workers and new calls."""
    async def scenario(scheduler: Scheduler) -> None:
        workers = await idle_workers(scheduler, 3)
        scheduler.close()
        assert await asyncio.gather(*workers) == [None, None, None]
        assert await scheduler.next_due() is None
    run(scenario)


def test_a_held_scheduler_hands_out_nothing_and_release_hands_out_what_is_due() -> None:
    """While held (delivery paused) an entry due now wakes no idle worker; on release it
    goes at once, and one due later still waits for its time."""
    async def scenario(scheduler: Scheduler) -> None:
        workers = await idle_workers(scheduler, 2)
        scheduler.hold()
        scheduler.schedule("now", 0.0)
        scheduler.schedule("later", time.time() + 3600)
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in workers)
        scheduler.release()
        await settle()
        assert sorted(str(w.result()) for w in workers if w.done()) == ["now"]
        scheduler.close()
        await asyncio.gather(*workers)
    run(scenario)
