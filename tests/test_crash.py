"""Crash safety: SIGKILL during a flood loses nothing that was answered 250."""

from __future__ import annotations

import re
import smtplib
import threading
from collections import Counter
from pathlib import Path

import pytest
from conftest import relay_config, wait_for
from upstream import Upstream

CLIENTS = 6
PER_CLIENT = 60  # 360 messages offered in all


def message_id_of(data: bytes) -> str:
    match = re.search(rb"^Message-ID: <([^>]+)>", data, re.MULTILINE)
    assert match, data[:200]
    return match.group(1).decode()


@pytest.mark.plan(35)
def test_sigkill_during_flood_loses_no_accepted_message(tmp_path: Path, make_relay,
                                                        upstream: Upstream, ca_file: Path,
                                                        capsys) -> None:
    """SIGKILL mid-flood, restart: every message answered 250 reaches the upstream.

    Clients behave like applications: a submission cut off by the kill is retried once
    the relay is back, so all 360 messages end up accepted. Duplicates can come only from
    deliveries in flight at the kill (one per upstream connection) and from a submission
    stored just before the kill whose 250 never arrived (one per client).
    """
    config = relay_config(tmp_path, upstream, ca_file, log={"level": "info"})
    relay = make_relay(config)
    accepted: list[str] = []
    lock = threading.Lock()
    back = threading.Event()

    def client(number: int) -> None:
        for n in range(PER_CLIENT):
            message_id = f"c{number}-n{n}@flood.example"
            body = (f"From: app@example.com\r\nTo: user@example.com\r\n"
                    f"Message-ID: <{message_id}>\r\nSubject: flood {n}\r\n\r\n"
                    f"body {n}\r\n").encode()
            while True:
                try:
                    with smtplib.SMTP("127.0.0.1", current.port, timeout=10) as smtp:
                        smtp.sendmail("app@example.com", [f"user{number}@example.com"], body)
                    break
                except (smtplib.SMTPException, OSError):
                    assert back.wait(timeout=30), "the relay did not come back"
            with lock:
                accepted.append(message_id)

    current = relay
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(accepted) >= 120, what="120 accepted messages")
    relay.kill()
    accepted_before_kill = len(accepted)
    current = make_relay(config)
    back.set()
    for thread in threads:
        thread.join(timeout=60)
    assert len(set(accepted)) == CLIENTS * PER_CLIENT

    def all_delivered() -> bool:
        return set(accepted) <= {message_id_of(t.data) for t in upstream.messages()}
    wait_for(all_delivered, timeout=60, what="every accepted message upstream")

    counts = Counter(message_id_of(t.data) for t in upstream.messages())
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    with capsys.disabled():
        print(f"\ncrash test: {len(accepted)} accepted ({accepted_before_kill} before SIGKILL), "
              f"{len(counts)} distinct delivered, {duplicates} delivered twice")
    assert duplicates <= config["upstream"]["connections"] + CLIENTS
