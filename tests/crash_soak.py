"""The crash soak, shared by tests/test_soak.py (docs/RELIABILITY-PLAN.md row 84, in the
reliability report) and tools/soak.py (the long soak: its --quick mode in CI, the full
run by hand).

Concurrent clients send messages, each retried until the relay answers 250, while the
relay is SIGKILLed at random moments and restarted, the upstream meets faults at random
(tests/upstream.py FAULT_KINDS: resets, 4xx, replies that are not UTF-8, replies out of
step) and, when the spool is on a small filesystem of its own, a ballast file fills it
now and then (452 4.3.1 answered meanwhile). Then the run is reconciled by Message-ID.

Nothing answered 250 may be lost. Duplicates are allowed only where a kill left a
message in doubt, and each kind is bounded by evidence gathered during the run:
- a resend of one entry: at each kill, the entries in active/ whose content the upstream
  had already received (it had the final dot, the spool never heard the outcome);
- a resubmission by a client, which the relay stored as a second entry: a client whose
  session was cut after it had sent the final dot (its 250 lost with the relay).
Each delivered copy names its spool entry in the relay's Received: header, which tells
the two kinds apart.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import RelayProcess, relay_config, wait_for
from ports import reusable_port
from upstream import Upstream

MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.MULTILINE | re.IGNORECASE)
RECEIVED_ID = re.compile(rb"^\tby .* with E?SMTP id (\w+)", re.MULTILINE)


@dataclass(frozen=True)
class Plan:
    messages: int
    clients: int
    min_kills: int  # kills go on after the clients are done until there are this many
    max_kills: int
    seconds: float  # the whole run's bound, reconciliation included
    fault_rate: float  # the share of upstream transactions that meet a fault
    fault_kinds: tuple[str, ...]
    kill_every: tuple[float, float] = (0.1, 0.5)  # seconds between kills, at random
    seed: int = 84


@dataclass
class Figures:
    """What a soak run saw; `problems` lists every way it fell short (empty: passed)."""

    messages: int = 0
    clients: int = 0
    accepted: int = 0
    delivered: int = 0
    duplicates: int = 0
    resent_after_kill: int = 0
    resubmitted_by_clients: int = 0
    kills: int = 0
    in_doubt_deliveries: int = 0
    in_doubt_submissions: int = 0
    refused_full: int = 0
    disk_full_windows: int = 0
    upstream_failure_rate: float = 0.0
    faults: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Clients:
    """Application threads: each message is retried until the relay answers 250."""

    def __init__(self, port: int, plan: Plan, deadline: float) -> None:
        self.port = port
        self.plan = plan
        self.deadline = deadline
        self.acknowledged: list[str] = []
        self.in_doubt = 0  # sessions cut after the final dot had been sent
        self.refused_full = 0  # 452 answers: the spool's disk was full
        self.lock = threading.Lock()
        per_client = -(-plan.messages // plan.clients)
        self.threads = [threading.Thread(target=self.run, args=(n, range(
            n * per_client, min((n + 1) * per_client, plan.messages))), daemon=True)
            for n in range(plan.clients)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def done(self) -> bool:
        return not any(thread.is_alive() for thread in self.threads)

    def run(self, number: int, messages: range) -> None:
        for n in messages:
            message_id = f"soak-{number}-{n}@example.com"
            body = (f"From: app@example.com\r\nTo: user{number}@example.com\r\n"
                    f"Message-ID: <{message_id}>\r\nSubject: soak {n}\r\n\r\n"
                    f"message {n} of client {number}\r\n").encode()
            while time.monotonic() < self.deadline:
                outcome = self.submit(f"user{number}@example.com", body)
                if outcome == 250:
                    with self.lock:
                        self.acknowledged.append(message_id)
                    break
                time.sleep(0.05)  # the relay is restarting, or full: an application's retry

    def submit(self, recipient: str, body: bytes) -> int:
        """One session; the last reply (250 to the final dot when all went well), or 0 if
        the session was cut."""
        dot_sent = False
        smtp = smtplib.SMTP(timeout=10)
        try:
            smtp.connect("127.0.0.1", self.port)
            smtp.ehlo()
            code = smtp.mail("app@example.com")[0]
            if (code == 250 and (code := smtp.rcpt(recipient)[0]) == 250
                    and (code := smtp.docmd("DATA")[0]) == 354):
                smtp.send(smtplib.quotedata(body.decode()).encode() + b".\r\n")
                dot_sent = True
                code = smtp.getreply()[0]
            if code == 452:
                with self.lock:
                    self.refused_full += 1
            return code
        except (smtplib.SMTPException, OSError):
            if dot_sent:
                with self.lock:
                    self.in_doubt += 1
            return 0
        finally:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.close()


class DiskFiller(threading.Thread):
    """Fills the spool's own filesystem now and then: a ballast file leaves `leave` bytes
    free, less than spool.min_free, so new mail is refused (452 4.3.1) while state records
    still fit; after a moment it is emptied again."""

    def __init__(self, mount: Path, leave: int, rng: random.Random,
                 every: tuple[float, float] = (1.5, 4.0),
                 hold: tuple[float, float] = (0.3, 1.0)) -> None:
        super().__init__(daemon=True)
        self.ballast = mount / "ballast"
        self.leave = leave
        self.rng = rng
        self.every = every
        self.hold = hold
        self.windows = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.rng.uniform(*self.every)):
            stat = os.statvfs(self.ballast.parent)
            size = stat.f_bavail * stat.f_frsize - self.leave
            if size > 0:
                with open(self.ballast, "wb") as ballast:
                    os.posix_fallocate(ballast.fileno(), 0, size)
                self.windows += 1
                self.stopping.wait(self.rng.uniform(*self.hold))
            self.ballast.unlink(missing_ok=True)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        self.ballast.unlink(missing_ok=True)


class SeenUpstream:
    """The Message-IDs whose content the upstream has received (answered or not), read
    incrementally from Upstream.data_seen."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.ids: set[str] = set()
        self.read = 0

    def update(self) -> set[str]:
        seen = self.upstream.data_seen[self.read:]
        self.read += len(seen)
        self.ids.update(m.group(1).decode() for data in seen if (m := MESSAGE_ID.search(data)))
        return self.ids


def message_id_in(path: Path) -> str | None:
    try:
        match = MESSAGE_ID.search(path.read_bytes())
    except FileNotFoundError:
        return None
    return match.group(1).decode() if match else None


def soak_config(workdir: Path, upstream: Upstream, ca_file: Path, spool: Path,
                min_free: int) -> dict[str, Any]:
    return relay_config(workdir, upstream, ca_file, log={"level": "info"},
                        listen={"port": reusable_port()},
                        spool={"path": str(spool), "min_free": min_free},
                        delivery={"retry_min": "100ms", "retry_max": "1s"},
                        upstream={"connections": 4})


def run(plan: Plan, workdir: Path, upstream: Upstream, ca_file: Path, spool: Path, *,
        min_free: int = 0, filler: DiskFiller | None = None,
        say: Callable[[str], None] = lambda line: None) -> Figures:
    """Run the soak against `upstream`, with the relay's spool at `spool`."""
    began = time.monotonic()
    deadline = began + plan.seconds
    chance = random.Random(plan.seed)
    upstream.random = random.Random(plan.seed)
    upstream.fail_rate = plan.fault_rate
    upstream.fault_kinds = plan.fault_kinds
    config = soak_config(workdir, upstream, ca_file, spool, min_free)
    relays = [RelayProcess(workdir, config).start()]
    clients = Clients(relays[0].port, plan, deadline - 60)
    seen = SeenUpstream(upstream)
    figures = Figures(messages=plan.messages, clients=plan.clients,
                      upstream_failure_rate=plan.fault_rate)
    clients.start()
    if filler is not None:
        filler.start()
    try:
        while ((not clients.done() or figures.kills < plan.min_kills)
               and figures.kills < plan.max_kills and time.monotonic() < deadline - 60):
            time.sleep(chance.uniform(*plan.kill_every))  # a random moment: the fault
            relays[-1].kill()
            figures.kills += 1
            in_flight = [message_id_in(p) for p in (spool / "active").iterdir()]
            wait_for(lambda: upstream.open_sessions() == 0, what="the upstream to see the drop")
            received = seen.update()
            figures.in_doubt_deliveries += sum(1 for mid in in_flight if mid in received)
            relays.append(RelayProcess(workdir, config).start())
            if figures.kills % 10 == 0:
                say(f"{figures.kills} kills, {len(clients.acknowledged)} accepted, "
                    f"{time.monotonic() - began:.0f} s")
        wait_for(clients.done, timeout=max(deadline - time.monotonic(), 1), what="the clients")
    finally:
        if filler is not None:
            filler.stop()
            figures.disk_full_windows = filler.windows
    final = relays[-1]
    reconcile(figures, clients, upstream, final, deadline)
    for relay in relays:
        relay.kill()
    figures.faults = dict(upstream.faults)
    figures.seconds = round(time.monotonic() - began, 1)
    return figures


def reconcile(figures: Figures, clients: Clients, upstream: Upstream, final: RelayProcess,
              deadline: float) -> None:
    """Wait for the queue to drain, then count and check every copy the upstream got."""
    acknowledged = set(clients.acknowledged)
    figures.accepted = len(acknowledged)
    figures.in_doubt_submissions = clients.in_doubt
    figures.refused_full = clients.refused_full

    def delivered() -> set[str]:
        return {m.group(1).decode() for t in upstream.messages()
                if (m := MESSAGE_ID.search(t.data))}
    with contextlib.suppress(AssertionError):
        wait_for(lambda: acknowledged <= delivered(),
                 timeout=max(deadline - time.monotonic(), 1), what="delivery")
        wait_for(lambda: not final.queued(), timeout=max(deadline - time.monotonic(), 1),
                 what="the queue to drain")
    copies: dict[str, Counter[str]] = {}
    for transaction in upstream.messages():
        message_id = MESSAGE_ID.search(transaction.data)
        entry = RECEIVED_ID.search(transaction.data)
        assert message_id and entry, transaction.data[:300]
        copies.setdefault(message_id.group(1).decode(), Counter())[entry.group(1).decode()] += 1
    figures.delivered = len(copies)
    figures.resent_after_kill = sum(n - 1 for entries in copies.values() for n in entries.values())
    figures.resubmitted_by_clients = sum(len(entries) - 1 for entries in copies.values())
    figures.duplicates = figures.resent_after_kill + figures.resubmitted_by_clients
    figures.problems = list(_problems(figures, acknowledged, set(copies), final))


def _problems(figures: Figures, acknowledged: set[str], delivered: set[str],
              final: RelayProcess) -> Iterator[str]:
    if figures.accepted < figures.messages:
        yield f"only {figures.accepted} of {figures.messages} messages were answered 250"
    lost = sorted(acknowledged - delivered)
    if lost:
        yield f"{len(lost)} messages answered 250 were never delivered: {lost[:10]}"
    if figures.resent_after_kill > figures.in_doubt_deliveries:
        yield (f"{figures.resent_after_kill} resends of one entry, more than the "
               f"{figures.in_doubt_deliveries} deliveries in doubt at the kills")
    if figures.resubmitted_by_clients > figures.in_doubt_submissions:
        yield (f"{figures.resubmitted_by_clients} resubmitted messages delivered twice, more "
               f"than the {figures.in_doubt_submissions} submissions cut off after their dot")
    left = {q: final.files(q) for q in ("incoming", "active", "deferred", "failed", "corrupt",
                                        "hold") if final.files(q)}
    if left:
        yield f"the queue did not end empty: {left}"
