"""The crash soak (RELIABILITY-PLAN row 84): concurrent clients send 2,000 messages while
the upstream fails at random and the relay is SIGKILLed at random moments, then the run
is reconciled by Message-ID.

Nothing answered 250 may be lost. Duplicates are allowed only where the plan allows them:
a delivery in flight when a kill landed after the upstream had the final dot (the relay
never recorded the outcome: a resend of the same entry), and a submission stored just
before a kill that cut off its 250 (the client, like any application, sends it again: a
second entry). Both are counted from evidence: the spool's active/ entries at each kill
against what the upstream had received, and the entry ID in each copy's Received header.

Bounded: at most 100 kills and 5 minutes. Run by the second step of .ci/run (marker soak).
"""

from __future__ import annotations

import random
import re
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import RelayProcess, relay_config, wait_for
from ports import reusable_port
from upstream import Upstream

CLIENTS = 8
PER_CLIENT = 250  # 2,000 messages
MAX_KILLS = 100
DEADLINE_SECONDS = 300
MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.MULTILINE | re.IGNORECASE)
RECEIVED_ID = re.compile(rb"^\tby .* with E?SMTP id (\w+)", re.MULTILINE)

pytestmark = pytest.mark.soak



def message_id_in(path: Path) -> str | None:
    try:
        match = MESSAGE_ID.search(path.read_bytes())
    except FileNotFoundError:
        return None
    return match.group(1).decode() if match else None


class Clients:
    """Application threads: each message is retried until the relay answers 250."""

    def __init__(self, port: int, deadline: float) -> None:
        self.port = port
        self.deadline = deadline
        self.acknowledged: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(n,)) for n in range(CLIENTS)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def done(self) -> bool:
        return not any(thread.is_alive() for thread in self.threads)

    def run(self, number: int) -> None:
        for n in range(PER_CLIENT):
            message_id = f"soak-{number}-{n}@example.com"
            body = (f"From: app@example.com\r\nTo: user{number}@example.com\r\n"
                    f"Message-ID: <{message_id}>\r\nSubject: soak {n}\r\n\r\n"
                    f"message {n} of client {number}\r\n").encode()
            while time.monotonic() < self.deadline:
                try:
                    with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as smtp:
                        smtp.sendmail("app@example.com", [f"user{number}@example.com"], body)
                except (smtplib.SMTPException, OSError):
                    time.sleep(0.05)  # the relay is restarting: an application's retry
                    continue
                with self.lock:
                    self.acknowledged.append(message_id)
                break


@pytest.mark.plan(84)
def test_crash_soak_reconciles_by_message_id(tmp_path: Path, make_relay, upstream: Upstream,
                                             ca_file: Path, record_property,
                                             capsys: pytest.CaptureFixture) -> None:
    """Every Message-ID answered 250 was delivered; resends never exceeded the
    deliveries in doubt at the kills; resubmissions at most one per client per kill; the
    queue ended empty."""
    began = time.monotonic()
    deadline = began + DEADLINE_SECONDS
    chance = random.Random(84)
    upstream.fail_rate = 0.1
    config = relay_config(tmp_path, upstream, ca_file, log={"level": "info"},
                          listen={"port": reusable_port()},
                          delivery={"retry_min": "100ms", "retry_max": "1s"},
                          upstream={"connections": 4})
    relays: list[RelayProcess] = [make_relay(config)]
    clients = Clients(relays[0].port, deadline)
    clients.start()

    kills = in_doubt = 0
    while not clients.done() and kills < MAX_KILLS and time.monotonic() < deadline - 60:
        time.sleep(chance.uniform(0.1, 0.5))  # a random moment: the fault, not a wait
        relays[-1].kill()
        kills += 1
        in_flight = [message_id_in(p) for p in (relays[-1].spool / "active").iterdir()]
        wait_for(lambda: upstream.open_sessions() == 0, what="the upstream to see the drop")
        seen_upstream = {m.group(1).decode() for data in upstream.data_seen
                         if (m := MESSAGE_ID.search(data))}
        in_doubt += sum(1 for mid in in_flight if mid in seen_upstream)
        relays.append(make_relay(config))
    wait_for(clients.done, timeout=max(deadline - time.monotonic(), 1), what="the clients")

    acknowledged = set(clients.acknowledged)
    assert len(acknowledged) == CLIENTS * PER_CLIENT

    def delivered() -> Counter[str]:
        return Counter(m.group(1).decode() for t in upstream.messages()
                       if (m := MESSAGE_ID.search(t.data)))
    wait_for(lambda: acknowledged <= set(delivered()), timeout=120,
             what="every acknowledged message upstream")
    final = relays[-1]
    wait_for(lambda: not any(final.files(q) for q in ("incoming", "active", "deferred")),
             timeout=60, what="the queue to empty")

    # Each delivered copy names its spool entry in our Received header: copies of one
    # entry are resends after a kill; several entries for one Message-ID are resubmissions.
    copies: dict[str, Counter[str]] = {}
    for transaction in upstream.messages():
        message_id = MESSAGE_ID.search(transaction.data)
        entry = RECEIVED_ID.search(transaction.data)
        assert message_id and entry, transaction.data[:300]
        copies.setdefault(message_id.group(1).decode(), Counter())[entry.group(1).decode()] += 1
    resent = sum(n - 1 for entries in copies.values() for n in entries.values())
    resubmitted = sum(len(entries) - 1 for entries in copies.values())
    duplicates = resent + resubmitted
    leftovers = {q: final.files(q) for q in ("failed", "corrupt", "hold") if final.files(q)}
    figures = {"accepted": len(acknowledged), "delivered": len(copies),
               "duplicates": duplicates, "kills": kills, "in_doubt_deliveries": in_doubt,
               "resent_after_kill": resent, "resubmitted_by_clients": resubmitted,
               "upstream_failure_rate": upstream.fail_rate,
               "seconds": round(time.monotonic() - began, 1)}
    record_property("soak", figures)
    with capsys.disabled():
        print(f"\nsoak: {figures}")
    assert kills >= 1
    assert resent <= in_doubt, figures
    assert resubmitted <= kills * CLIENTS, figures
    assert leftovers == {}, leftovers
