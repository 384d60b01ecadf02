"""`relay history` and `relay stats` as commands: the outcomes a running relay records,
every filter flag, `relay queue show` of a delivered message, and the stats output."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PASSWORD_ENV, RelayProcess, relay_config, run_cli, wait_for
from upstream import PASSWORD, Upstream

from relay.config import parse_config
from relay.delivery import Delivery
from relay.entry import NewEntry
from relay.history import HistoryWriter, Journal, Record, journal_dir
from relay.history_query import Query, search
from relay.spool import Spool, new_id
from relay.writer import SpoolWriter

BODY = b"From: app@example.com\r\nSubject: history\r\n\r\nbody\r\n"


def history(relay: RelayProcess, *args: str) -> list[dict[str, Any]]:
    result = relay.cli("history", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_a_running_relay_records_every_outcome(make_relay: Any, upstream: Upstream,
                                               ca_file: Path, tmp_path: Path) -> None:
    """Sent, failed (550), expired (out of attempts) and deleted by the operator: one
    record each, with the upstream and its final reply."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file, delivery={
        "retry_min": "1h", "retry_max": "2h", "max_attempts": 2}))
    sent = relay.send("app@example.com", ["user@example.com"], BODY)
    failed = relay.send("app@example.com", ["reject@example.com"], BODY)
    expired = relay.send("app@example.com", ["tempfail@example.com"], BODY)
    deleted = relay.send("app@example.com", ["tempfail2@example.com"], BODY)
    wait_for(lambda: sorted(relay.files("deferred")) == sorted([expired, deleted]),
             what="two deferrals")
    assert relay.cli("queue", "delete", deleted).returncode == 0
    assert relay.cli("queue", "flush", expired).returncode == 0
    records = wait_for(lambda: len(history(relay)) == 4 and history(relay), what="4 records")
    by_id = {r["id"]: r for r in records}
    relay_name = f"127.0.0.1:{upstream.port}"
    assert {i: r["status"] for i, r in by_id.items()} == {
        sent: "sent", failed: "failed", expired: "expired", deleted: "deleted"}
    assert by_id[sent]["reply"] == "250 2.0.0 Ok: queued upstream"
    assert (by_id[sent]["relay"], by_id[sent]["attempts"], by_id[sent]["to"]) == (
        relay_name, 1, "user@example.com")
    assert by_id[failed]["reply"] == "550 5.1.1 No such user"
    assert by_id[expired]["attempts"] == 2
    assert by_id[expired]["reply"].startswith("expired after 2 attempts: 451 4.2.0")
    assert (by_id[deleted]["attempts"], by_id[deleted]["reply"]) == (
        1, "451 4.2.0 Mailbox busy, try later")
    for record in records:
        assert record["from"] == "app@example.com" and record["size"] > len(BODY)
        assert record["delay"] >= 0 and record["at"] >= record["arrived"]


def test_with_history_disabled_nothing_is_journaled(make_relay: Any, upstream: Upstream,
                                                    ca_file: Path, tmp_path: Path) -> None:
    """history.enabled: false: a message sent and one deleted by the operator leave no
    journal, and `relay history` finds nothing."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file, history={"enabled": False},
                                    delivery={"retry_min": "1h", "retry_max": "2h"}))
    relay.send("app@example.com", ["user@example.com"], BODY)
    deleted = relay.send("app@example.com", ["tempfail@example.com"], BODY)
    wait_for(lambda: relay.files("deferred") == [deleted], what="the deferral")
    wait_for(lambda: upstream.delivered_to("user@example.com"), what="the delivery")
    assert relay.cli("queue", "delete", deleted).returncode == 0
    wait_for(lambda: "status=removed" in relay.log(), what="the sent message removed")
    assert list((relay.spool / "history").glob("*")) == []  # the directory is the layout's
    assert history(relay) == []


def test_a_delivered_message_keeps_its_message_id_in_the_history(
        tmp_path: Path, upstream: Upstream, ca_file: Path) -> None:
    """The Message-ID the listener put in the envelope reaches the record, with no read
    of the message (delivery from memory, as on the hot path)."""
    config = parse_config(yaml.safe_dump(relay_config(tmp_path, upstream, ca_file)),
                          {PASSWORD_ENV: PASSWORD})
    spool = Spool(config.spool.path)
    spool.open()

    async def main() -> None:
        writer = SpoolWriter(spool)
        writer.start()
        journal = HistoryWriter(journal_dir(spool.path), config.history.keep)
        journal.start()
        delivery = Delivery(spool, writer, config, history=journal)
        delivery.start()
        new = NewEntry(new_id(time.time()), "app@example.com", ("user@example.com",),
                       (BODY,), time.time(), False, message_id="<hist-1@app.example>")
        delivery.schedule_new(await writer.store(new), new.parts)
        deadline = time.monotonic() + 10
        while not upstream.messages() or list(spool.path.joinpath("active").iterdir()):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await delivery.stop(grace=5)
        await writer.close()
        await asyncio.to_thread(journal.close)
    asyncio.run(main())
    [record] = search(journal_dir(spool.path), Query())
    assert (record.message_id, record.status, record.recipient) == (
        "<hist-1@app.example>", "sent", "user@example.com")


NOW = time.time()


def record(n: int, **changes: Any) -> Record:
    fields: dict[str, Any] = {
        "at": NOW - 3600 + n, "status": "sent", "id": f"{int((NOW - 4000) * 1e6):013X}{n:08X}",
        "message_id": f"<m{n}@app.example>", "sender": "app@example.com",
        "recipient": f"user{n}@example.net", "size": 100, "arrived": NOW - 4000,
        "send_at": None, "delay": float(n), "attempts": 1, "relay": "up.example:587",
        "reply": "250 ok"}
    fields.update(changes)
    return Record(**fields)


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    """The config of a stopped relay whose history holds records 0-5: 2 failed, 3
    expired, 4 from another sender, 5 two days ago."""
    config = relay_config(tmp_path, None, None)
    spool = Spool(Path(config["spool"]["path"]))
    spool.open()
    journal = Journal(journal_dir(spool.path))
    journal.append([record(0), record(1),
                    record(2, status="failed", reply="550 5.1.1 <user2@example.net> unknown"),
                    record(3, status="expired", reply="expired after 2 attempts: 451 busy",
                           attempts=2),
                    record(4, sender="cron@other.example"),
                    record(5, at=NOW - 2 * 86400)])
    journal.close()
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def ids(config: Path, *args: str) -> list[int]:
    result = run_cli(config, "history", "--json", *args)
    assert result.returncode == 0, result.stderr
    return [int(r["id"][-8:], 16) for r in json.loads(result.stdout)]


@pytest.mark.parametrize("args, expected", [
    ((), [5, 0, 1, 2, 3, 4]),
    (("--to", "USER1@example.net"), [1]),
    (("--to", "@example.net"), [5, 0, 1, 2, 3, 4]),
    (("--from", "cron@other.example"), [4]),
    (("--from", "<cron@other.example>"), [4]),
    (("--message-id", "<m3@app.example>"), [3]),
    (("--message-id", "m3@app.example"), [3]),
    (("--status", "failed"), [2]),
    (("--status", "expired"), [3]),
    (("--since", "1d"), [0, 1, 2, 3, 4]),
    (("--until", "1d"), [5]),
    (("--until", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 86400))), [5]),
    (("--since", "1d", "--status", "sent", "--to", "@example.net"), [0, 1, 4]),
])
def test_each_filter_flag(filled: Path, args: tuple[str, ...], expected: list[int]) -> None:
    """Each flag of `relay history` selects what it names; flags combine."""
    assert ids(filled, *args) == expected


def test_filter_by_queue_id(filled: Path) -> None:
    """--id finds the queue ID's records, in either case."""
    queue_id = record(3).id
    assert ids(filled, "--id", queue_id) == [3]
    assert ids(filled, "--id", queue_id.lower()) == [3]


def test_the_table_has_one_line_per_record_and_a_count(filled: Path) -> None:
    """The table: a header line, one line per record with its reply, and a count."""
    result = run_cli(filled, "history", "--status", "failed")
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["TIME", "STATUS", "ID", "FROM"]
    assert "failed" in lines[1] and "user2@example.net" in lines[1]
    assert "550 5.1.1 <user2@example.net> unknown" in lines[1]
    assert lines[-1] == "-- 1 record"


def test_history_output_redacts_addresses_when_configured(filled: Path) -> None:
    """log.redact_addresses redacts the history's table and JSON."""
    config = yaml.safe_load(filled.read_text())
    config["log"]["redact_addresses"] = True
    filled.write_text(yaml.safe_dump(config))
    result = run_cli(filled, "history", "--status", "failed")
    assert "u***@example.net" in result.stdout and "user2@" not in result.stdout
    [item] = json.loads(run_cli(filled, "history", "--json", "--status", "failed").stdout)
    assert (item["from"], item["to"]) == ("a***@example.com", "u***@example.net")


def test_a_bad_time_is_a_usage_error_naming_the_flag(filled: Path) -> None:
    """--since that is no time or duration: exit 64, naming the flag."""
    result = run_cli(filled, "history", "--since", "last week")
    assert result.returncode == 64 and "--since:" in result.stderr


def test_queue_show_of_a_delivered_message_points_to_its_history(filled: Path) -> None:
    """A message gone from the queue: exit 65 as before, and what the history holds."""
    result = run_cli(filled, "queue", "show", record(2).id)
    assert result.returncode == 65
    assert "no longer in the queue" in result.stderr and "(1 failed)" in result.stderr
    assert f"relay history --id {record(2).id}" in result.stderr


def test_stats_from_the_history_and_the_queue(filled: Path) -> None:
    """The last 24 hours: 3 sent, 1 failed, 1 expired; delays 0, 1 and 4 s."""
    result = run_cli(filled, "stats", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert (figures["received"], figures["sent"], figures["failed"], figures["expired"]) == (
        5, 3, 1, 1)
    assert figures["delay"] == {"p50": 1.0, "p95": 4.0, "p99": 4.0, "max": 4.0}
    assert figures["deferred_attempts"] == 1  # the expired one's first attempt
    assert figures["upstreams"]["up.example:587"]["sent"] == 3
    assert figures["queue"]["queued"] == 0 and figures["oldest"] is None
    text = run_cli(filled, "stats").stdout
    assert "sent            3" in text and "p50 1.00s" in text
