"""Internal tasks under supervision (issue 19, finding 3): a task that dies is logged with
its traceback and restarted; one that keeps dying, or a dead spool writer, makes
`relay serve` exit 70 for systemd to restart it. Nothing hangs."""

from __future__ import annotations

import asyncio
import logging
import smtplib
from pathlib import Path

import pytest
from conftest import relay_config, wait_for

from relay.errors import TaskFailed
from relay.supervise import supervised


def test_a_task_that_dies_once_is_logged_and_run_again(
        caplog: pytest.LogCaptureFixture) -> None:
    """The first run raises, the second returns: supervised() returns, fatal is never
    called, and the death is logged at ERROR with its traceback."""
    runs: list[int] = []
    fatal: list[TaskFailed] = []

    async def task() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise RuntimeError("first run fails")

    with caplog.at_level(logging.ERROR):
        asyncio.run(asyncio.wait_for(supervised("t", task, fatal.append, pause=0), 5))
    assert runs == [0, 1] and fatal == []
    [record] = caplog.records
    assert "task=t, status=died" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError


def test_a_task_that_keeps_dying_is_given_up_and_fatal_hears_why() -> None:
    """More than `restarts` deaths within the window: fatal gets TaskFailed naming the
    task, with the last exception as its cause, and supervision ends."""
    fatal: list[TaskFailed] = []
    runs = 0

    async def task() -> None:
        nonlocal runs
        runs += 1
        raise ValueError(f"run {runs}")

    asyncio.run(asyncio.wait_for(supervised("worker", task, fatal.append, restarts=3,
                                            pause=0), 5))
    assert runs == 4
    [failure] = fatal
    assert failure.task == "worker" and isinstance(failure.__cause__, ValueError)
    assert "run 4" in str(failure)


def test_deaths_outside_the_window_are_forgiven() -> None:
    """Crashes spread wider than the window never add up to a fatal failure."""
    fatal: list[TaskFailed] = []
    now = [0.0]
    runs = 0

    async def task() -> None:
        nonlocal runs
        runs += 1
        now[0] += 100.0
        if runs < 10:
            raise ValueError("now and then")

    asyncio.run(asyncio.wait_for(supervised("t", task, fatal.append, clock=lambda: now[0],
                                            restarts=1, window=60, pause=0), 5))
    assert runs == 10 and fatal == []


@pytest.mark.plan(109)
def test_a_dead_spool_writer_answers_the_client_and_exits_70(tmp_path: Path,
                                                             make_relay) -> None:
    """The writer thread dies as it takes the first message: the client hears a 4xx at
    once instead of waiting, the traceback is logged, and the daemon exits 70."""
    relay = make_relay(relay_config(tmp_path, None, None),
                       env={"RELAY_RAISE_AT": "in-spool-writer"})
    with relay.client() as smtp:
        smtp.ehlo()
        smtp.mail("app@example.com")
        smtp.rcpt("user@example.com")
        code, reply = smtp.data(b"Subject: x\r\n\r\nx\r\n")
    assert (code, reply[:5]) == (451, b"4.3.0")
    assert relay.process is not None and relay.process.wait(timeout=30) == 70
    assert "event=fatal, task=spool-writer" in relay.log()
    assert "InjectedFault" in relay.log() and "Traceback" in relay.log()
    assert relay.queued() == []


@pytest.mark.plan(109)
def test_delivery_workers_that_keep_dying_make_the_daemon_exit_70(tmp_path: Path,
                                                                   make_relay) -> None:
    """Each death of a delivery worker is logged and the worker restarted; when they keep
    dying, the daemon stops and exits 70, keeping what it accepted."""
    relay = make_relay(relay_config(tmp_path, None, None),
                       env={"RELAY_RAISE_AT": "in-delivery-worker"})
    try:
        entry_id = relay.send("app@example.com", ["user@example.com"], b"Subject: x\r\n\r\nx\r\n")
    except (smtplib.SMTPException, OSError):
        entry_id = None  # the daemon was already on its way out
    assert relay.process is not None and relay.process.wait(timeout=30) == 70
    assert "task=delivery-0, status=died" in relay.log()
    assert "event=fatal, task=delivery-0" in relay.log()
    if entry_id is not None:
        wait_for(lambda: entry_id in relay.queued(), what="the message kept")
