"""`relay queue` and its actions, against spools filled by a real relay."""

from __future__ import annotations

import gc
import json
import random
import re
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from conftest import RelayProcess, relay_config, run_cli, wait_for
from upstream import Upstream

from relay import cli
from relay.spool import Spool, new_id

BODY = b"From: app@example.com\r\nSubject: queue test\r\n\r\nbody\r\n"


@pytest.fixture
def patient_relay(make_relay, upstream: Upstream, ca_file: Path, tmp_path: Path) -> RelayProcess:
    """A relay whose deferred entries wait an hour, so the queue holds still for listing."""
    return make_relay(relay_config(tmp_path, upstream, ca_file,
                                   delivery={"retry_min": "1h", "retry_max": "2h"}))


def send_and_wait(relay: RelayProcess, recipients: list[str], queue: str) -> str:
    entry_id = relay.send("app@example.com", recipients, BODY)
    wait_for(lambda: entry_id in relay.files(queue), what=f"{entry_id} in {queue}/")
    return entry_id


def test_listing_shows_each_state_and_a_summary(patient_relay: RelayProcess) -> None:
    """The table lists failed, deferred and held entries, and ends with per-state counts."""
    failed = send_and_wait(patient_relay, ["reject@example.com"], "failed")
    deferred = send_and_wait(patient_relay, ["tempfail@example.com"], "deferred")
    held = send_and_wait(patient_relay, ["tempfail2@example.com"], "deferred")
    assert patient_relay.cli("queue", "hold", held).returncode == 0
    result = patient_relay.cli("queue")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "SIZE", "ARRIVED", "STATE"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert set(rows) == {failed, deferred, held}
    assert " failed " in rows[failed] and "550 5.1.1 No such user" in rows[failed]
    assert " deferred " in rows[deferred] and "451 4.2.0" in rows[deferred]
    assert " held " in rows[held]
    assert lines[-1].startswith("-- 3 messages, ")
    assert lines[-1].endswith("0 queued, 0 active, 1 deferred, 1 held, 1 failed, 0 scheduled")


def test_json_listing_has_the_contract_fields(patient_relay: RelayProcess) -> None:
    """--json: one array; id, size, arrived, state, attempts, next_attempt, send_at,
    sender, recipients[{address, status, reply}], last_error."""
    entry_id = send_and_wait(patient_relay, ["tempfail@example.com", "ok@example.com"],
                             "deferred")
    result = patient_relay.cli("queue", "--json")
    [item] = json.loads(result.stdout)
    assert set(item) == {"id", "size", "arrived", "state", "attempts", "next_attempt",
                         "send_at", "sender", "recipients", "last_error"}
    assert item["send_at"] is None
    assert item["id"] == entry_id and item["state"] == "deferred" and item["attempts"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", item["arrived"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", item["next_attempt"])
    assert item["sender"] == "app@example.com"
    assert item["recipients"] == [
        {"address": "tempfail@example.com", "status": "pending",
         "reply": "451 4.2.0 Mailbox busy, try later"},
        {"address": "ok@example.com", "status": "sent",
         "reply": "250 2.0.0 Ok: queued upstream"}]
    assert item["last_error"] == "451 4.2.0 Mailbox busy, try later"


def test_filters_by_state_and_by_address(patient_relay: RelayProcess) -> None:
    failed = send_and_wait(patient_relay, ["reject@example.com"], "failed")
    deferred = send_and_wait(patient_relay, ["tempfail@example.com"], "deferred")
    by_state = json.loads(patient_relay.cli("queue", "--json", "--state", "failed").stdout)
    assert [e["id"] for e in by_state] == [failed]
    by_match = json.loads(patient_relay.cli("queue", "--json", "--match", "tempfail").stdout)
    assert [e["id"] for e in by_match] == [deferred]


def test_empty_queue_says_so(holding_relay_config: Path) -> None:
    from conftest import run_cli
    result = run_cli(holding_relay_config, "queue")
    assert (result.returncode, result.stdout) == (0, "Mail queue is empty\n")
    assert json.loads(run_cli(holding_relay_config, "queue", "--json").stdout) == []


@pytest.fixture
def holding_relay_config(tmp_path: Path) -> Path:
    """The config of a relay that is not running, over an empty spool."""
    import yaml

    from relay.spool import Spool
    config = relay_config(tmp_path, None, None)
    Spool(Path(config["spool"]["path"])).open()
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.plan(99)
def test_show_gives_envelope_recipients_attempts_and_headers(patient_relay: RelayProcess,
                                                             upstream: Upstream) -> None:
    """show: per-recipient status and reply, each attempt with relay and duration, headers
    but not the body unless --body; control characters are escaped."""
    body = b"From: app@example.com\r\nSubject: \x1b[31mred alert\r\n\r\nsecret body\r\n"
    entry_id = patient_relay.send("app@example.com", ["tempfail@example.com"], body)
    wait_for(lambda: entry_id in patient_relay.files("deferred"), what="deferral")
    result = patient_relay.cli("queue", "show", entry_id)
    assert result.returncode == 0
    out = result.stdout
    assert f"ID:           {entry_id}" in out and "State:        deferred" in out
    assert "tempfail@example.com  pending  451 4.2.0 Mailbox busy, try later" in out
    assert re.search(rf"Z  127\.0\.0\.1:{upstream.port}  \d+\.\d\ds  451 4\.2\.0", out)
    assert "Subject: \\x1b[31mred alert" in out and "\x1b" not in out
    assert "secret body" not in out
    assert "secret body" in patient_relay.cli("queue", "show", entry_id, "--body").stdout
    detail = json.loads(patient_relay.cli("queue", "show", entry_id, "--json").stdout)
    assert detail["attempt_history"][0]["relay"] == f"127.0.0.1:{upstream.port}"
    assert {"name": "From", "value": "app@example.com"} in detail["headers"]


def test_flush_makes_a_running_daemon_deliver_within_a_second(
        tmp_path: Path, make_relay, make_upstream, ca_file: Path) -> None:
    """Upstream back after an outage: `relay queue flush` delivers without waiting an hour."""
    upstream = make_upstream()
    upstream.stop()
    relay = make_relay(relay_config(tmp_path, upstream, ca_file,
                                    delivery={"retry_min": "1h", "retry_max": "2h"}))
    entry_id = send_and_wait(relay, ["user@example.com"], "deferred")
    upstream.start()
    result = relay.cli("queue", "flush")
    assert result.returncode == 0 and f"{entry_id}: flushed" in result.stdout
    wait_for(lambda: upstream.delivered_to("user@example.com"), timeout=3,
             what="delivery after flush")


def test_hold_stops_attempts_until_release(tmp_path: Path, make_relay, make_upstream,
                                           ca_file: Path) -> None:
    """A held entry is not flushed; released, it is delivered."""
    upstream = make_upstream()
    upstream.stop()
    relay = make_relay(relay_config(tmp_path, upstream, ca_file,
                                    delivery={"retry_min": "1h", "retry_max": "2h"}))
    entry_id = send_and_wait(relay, ["user@example.com"], "deferred")
    assert relay.cli("queue", "hold", entry_id).stdout == f"{entry_id}: held\n"
    upstream.start()
    flushed = relay.cli("queue", "flush")
    assert entry_id not in flushed.stdout and relay.files("hold") == [entry_id]
    assert relay.cli("queue", "release", "ALL").stdout == f"{entry_id}: released\n"
    wait_for(lambda: upstream.delivered_to("user@example.com"), timeout=3,
             what="delivery after release")


def test_requeue_gives_a_failed_message_another_chance(patient_relay: RelayProcess,
                                                       upstream: Upstream) -> None:
    """requeue moves a failed entry back with attempts reset; it is then delivered."""
    upstream.data_replies = ["554 5.6.0 Content rejected"]
    entry_id = send_and_wait(patient_relay, ["user@example.com"], "failed")
    result = patient_relay.cli("queue", "requeue", entry_id)
    assert (result.returncode, result.stdout) == (0, f"{entry_id}: requeued\n")
    wait_for(lambda: upstream.delivered_to("user@example.com"), timeout=3, what="delivery")


def test_delete_removes_entry_and_state(patient_relay: RelayProcess) -> None:
    entry_id = send_and_wait(patient_relay, ["tempfail@example.com"], "deferred")
    result = patient_relay.cli("queue", "delete", entry_id)
    assert (result.returncode, result.stdout) == (0, f"{entry_id}: deleted (was deferred)\n")
    assert patient_relay.files("deferred") == [] and patient_relay.files("state") == []


@pytest.mark.plan(98)
def test_unknown_and_malicious_ids_exit_65_and_the_others_are_processed(
        patient_relay: RelayProcess, tmp_path: Path) -> None:
    """Unknown IDs and paths are refused (exit 65) without touching files; valid IDs work."""
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    entry_id = send_and_wait(patient_relay, ["tempfail@example.com"], "deferred")
    result = patient_relay.cli("queue", "delete", "0000000000000DEADBEEF", f"../../{victim.name}",
                               str(victim), entry_id)
    assert result.returncode == 65
    assert "0000000000000DEADBEEF: no such message in the queue" in result.stderr
    assert "not a queue ID" in result.stderr
    assert f"{entry_id}: deleted" in result.stdout
    assert victim.read_text() == "keep me"
    assert patient_relay.cli("queue", "show", "../victim").returncode == 65


def test_bulk_actions_need_the_literal_all(patient_relay: RelayProcess) -> None:
    """hold/release/delete/requeue without IDs are usage errors; ALL acts on every entry."""
    first = send_and_wait(patient_relay, ["tempfail@example.com"], "deferred")
    second = send_and_wait(patient_relay, ["tempfail2@example.com"], "deferred")
    assert patient_relay.cli("queue", "delete").returncode == 64
    assert patient_relay.cli("queue", "delete", "ALL", first).returncode == 64
    result = patient_relay.cli("queue", "hold", "ALL")
    assert result.stdout == f"{first}: held\n{second}: held\n"
    assert patient_relay.files("hold") == [first, second]


@pytest.mark.plan(87)
def test_entry_in_delivery_is_not_touched(tmp_path: Path, make_relay, upstream: Upstream,
                                          ca_file: Path) -> None:
    """A delete while a delivery owns the entry waits, then says so and exits 75."""
    upstream.data_delay = 8.0  # longer than the CLI's 5 s wait
    config = relay_config(tmp_path, upstream, ca_file)
    config["upstream"]["timeout"] = "30s"  # the relay waits out the slow final reply
    relay = make_relay(config)
    entry_id = relay.send("app@example.com", ["user@example.com"], BODY)
    wait_for(lambda: relay.files("active") == [entry_id], what="the delivery to start")
    result = relay.cli("queue", "delete", entry_id)
    assert result.returncode == 75
    assert f"{entry_id}: being delivered right now" in result.stderr
    wait_for(lambda: upstream.delivered_to("user@example.com"), timeout=10, what="delivery")


@pytest.mark.plan(87)
def test_actions_racing_deliveries_end_each_message_in_exactly_one_place(
        tmp_path: Path, make_relay, upstream: Upstream, ca_file: Path) -> None:
    """Deletes, holds and flushes while a slow upstream delivers: every message ends exactly
    once as delivered, deleted (as the CLI reported) or held, never two and never none."""
    upstream.data_delay = 0.05
    relay = make_relay(relay_config(tmp_path, upstream, ca_file))
    ids = [relay.send("app@example.com", [f"user{n}@example.com"], BODY) for n in range(40)]
    rng = random.Random(7)
    deleted: set[str] = set()
    outputs: list[str] = []

    def operator() -> None:
        for _ in range(4):
            victims = rng.sample(ids, 6)
            result = relay.cli("queue", "delete", *victims[:3])
            deleted.update(re.findall(r"^(\w+): deleted", result.stdout, re.MULTILINE))
            outputs.append(result.stdout + result.stderr)
            outputs.append(relay.cli("queue", "hold", *victims[3:]).stdout)
            outputs.append(relay.cli("queue", "flush").stdout)
    worker = threading.Thread(target=operator)
    worker.start()
    worker.join(timeout=120)
    wait_for(lambda: not (relay.files("incoming") + relay.files("deferred")
                          + relay.files("active")), timeout=30, what="the queue to settle")
    delivered = [re.search(rb"id (\w+)", t.data).group(1).decode()  # type: ignore[union-attr]
                 for t in upstream.messages()]
    held = set(relay.files("hold"))
    for entry_id in ids:
        places = [delivered.count(entry_id), entry_id in deleted, entry_id in held]
        assert sum(places) == 1, (entry_id, places, outputs)


def test_listing_in_process_leaves_the_garbage_collector_as_it_found_it(
        spool: Spool, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The listing pauses the cyclic collector while it builds, and turns it back on."""
    entry_id = new_id(time.time())
    spool.store(entry_id, "app@example.com", ["u@example.com"], [BODY], time.time(), False)
    config = tmp_path / "relay.yaml"
    config.write_text(yaml.safe_dump({"spool": {"path": str(spool.path)}}))
    assert cli.main(["queue", "--json", "--config", str(config)]) == 0
    assert [item["id"] for item in json.loads(capsys.readouterr().out)] == [entry_id]
    assert gc.isenabled()


def deferred_entry(spool: Spool) -> str:
    """An entry that has had one attempt and waits in deferred/ (with its state record)."""
    entry_id = new_id(time.time())
    spool.store(entry_id, "app@example.com", ["u@example.com"], [BODY], time.time(), False)
    entry = spool.claim(entry_id, time.time())
    assert entry is not None
    spool.defer(replace(entry, next_attempt=time.time() + 3600, last_error="451 later"))
    return entry_id


@pytest.mark.plan(114)
def test_foreign_files_are_reported_once_and_skipped_by_every_command(
        holding_relay_config: Path, tmp_path: Path) -> None:
    """A file that is not a queue ID, and an ID present in two queues: the listing (JSON
    and table) and ALL skip them, saying so once each, and act on the real entries."""
    spool = Spool(tmp_path / "spool")
    entry_id = deferred_entry(spool)
    shutil.copy(spool.path / "deferred" / entry_id, spool.path / "hold" / entry_id)
    (spool.path / "deferred" / "notes.txt").write_text("an operator's note")
    listing = run_cli(holding_relay_config, "queue", "--json")
    assert listing.returncode == 0, listing.stderr
    assert [e["id"] for e in json.loads(listing.stdout)] == [entry_id]
    assert listing.stderr.count("notes.txt: not a queue ID; skipped") == 1
    assert listing.stderr.count(f"hold/{entry_id}: the same queue ID is in deferred/") == 1
    assert "Traceback" not in listing.stderr
    table = run_cli(holding_relay_config, "queue")
    assert table.returncode == 0 and table.stdout.splitlines()[-1].startswith("-- 1 message")
    flushed = run_cli(holding_relay_config, "queue", "flush")
    assert f"{entry_id}: flushed" in flushed.stdout and "notes.txt" in flushed.stderr
    assert (spool.path / "deferred" / "notes.txt").exists()


@pytest.mark.plan(114)
def test_the_daemon_reports_foreign_files_once_and_leaves_them_alone(
        tmp_path: Path, make_relay, upstream: Upstream, ca_file: Path) -> None:
    """Foreign files in incoming/, deferred/ and tmp/ at start-up: each logged once, none
    moved, deleted or sent, and real mail still flows."""
    config = relay_config(tmp_path, upstream, ca_file)
    spool = Spool(Path(config["spool"]["path"]))
    spool.open()
    foreign = [spool.path / "incoming" / "README", spool.path / "deferred" / "x.bak",
               spool.path / "tmp" / "editor.swp"]
    for path in foreign:
        path.write_text("not mail")
    relay = make_relay(config)
    relay.send("app@example.com", ["user@example.com"], BODY)
    wait_for(lambda: upstream.delivered_to("user@example.com"), what="the delivery")
    relay.send("app@example.com", ["again@example.com"], BODY)  # incoming/ listed again
    wait_for(lambda: upstream.delivered_to("again@example.com"), what="the second delivery")
    for path in foreign:
        assert path.read_text() == "not mail"
        assert relay.log().count(f"path={path}") == 1
    assert relay.files("corrupt") == [] and len(upstream.messages()) == 2


@pytest.mark.plan(115)
@pytest.mark.parametrize("action, ids, reason", [
    ("hold", ["NOTANID"], "NOTANID: not a queue ID"),
    ("delete", ["0000000000000DEADBEEF"], "no such message in the queue"),
    ("release", ["DEFERRED"], "not released: message is deferred"),
])
def test_summaries_count_what_was_done_and_refusals_exit_65(
        holding_relay_config: Path, tmp_path: Path, action: str, ids: list[str],
        reason: str) -> None:
    """An ID the action did not apply to is reported, counted as not done, and makes the
    command exit 65, as an unknown one does."""
    entry_id = deferred_entry(Spool(tmp_path / "spool"))
    ids = [entry_id if i == "DEFERRED" else i for i in ids]
    result = run_cli(holding_relay_config, "queue", action, *ids)
    assert result.returncode == 65
    assert reason in result.stderr
    past = {"hold": "held", "delete": "deleted", "release": "released"}[action]
    assert f"-- {action}: 0 messages {past}, 1 not (see above)" in result.stderr


def test_summaries_count_each_message_done(holding_relay_config: Path, tmp_path: Path) -> None:
    """Two held, one refused: the summary says 2 held, 1 not."""
    spool = Spool(tmp_path / "spool")
    first, second = deferred_entry(spool), deferred_entry(spool)
    result = run_cli(holding_relay_config, "queue", "hold", first, "NOTANID", second)
    assert result.returncode == 65
    assert "-- hold: 2 messages held, 1 not (see above)" in result.stderr
