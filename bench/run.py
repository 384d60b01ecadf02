"""The relay against Postfix, side by side, in one run: `python bench/run.py [--quick]`.

Starts a throwaway Postfix null client and the relay, each relaying to its own sink on
loopback, and measures both alternately, several repetitions, medians:

- acceptance throughput (Postfix's smtp-source, one message per connection) by message
  size and concurrent sessions, and end-to-end throughput until the sink has them all;
- acceptance latency of a Python smtplib client, a new connection per 10 KiB message;
- delivery throughput through a sink that takes 0.5 s per message, with the relay's
  upstream.connections equal to Postfix's destination concurrency (20);
- scale (relay only): start-up, `relay queue --json` and memory with a large spool, and
  acceptance throughput against the empty-spool figure of the same run;
- metrics (relay only): acceptance throughput of a relay with metrics.port set, scraped
  every second, against one without, alternating, in the same run;
- scheduling (relay only): CPU while a large spool of scheduled entries waits, and how
  long after their send time scheduled messages reach the sink;
- history (relay only): `relay history` over a large journal, for selective queries;
- memory: peak resident memory while 16 clients each send a 10 MiB message.

Prints every figure with the ratio relay/Postfix and writes docs/BENCHMARKS.md and
docs/benchmarks.png (with --quick: a smoke run, under a minute, written to a temp dir
unless --output is given). Installs Debian's postfix package when it is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import (
    Postfix,
    Relay,
    Sink,
    cpu_seconds,
    ensure_postfix,
    pss_kib,
    rss_kib,
)

ROOT = Path(__file__).resolve().parent.parent
KIB = 1024


@dataclass(frozen=True)
class Plan:
    """How much to measure: the full run, or the smoke run CI uses."""

    sizes: tuple[int, ...] = (1 * KIB, 10 * KIB, 100 * KIB)
    sessions: tuple[int, ...] = (1, 4, 16, 32)
    messages: int = 1000  # per throughput run (half that at 100 KiB)
    repetitions: int = 3
    latency_sends: int = 1000
    slow_messages: int = 200
    scale_entries: int = 100_000
    metrics_repetitions: int = 7  # a 3% budget needs more pairs than the machine's noise
    memory_clients: int = 16
    memory_message: int = 10 * KIB * KIB
    idle_seconds: float = 10.0  # the window CPU is measured over, scheduled entries waiting
    soon: int = 20  # scheduled messages due together, timed to the sink
    history_records: int = 1_000_000
    rate_messages: int = 100  # through an upstream with rate: 10/s


QUICK = Plan(sizes=(1 * KIB,), sessions=(1, 16), messages=100, repetitions=1,
             latency_sends=50, slow_messages=20, scale_entries=1000, metrics_repetitions=1,
             memory_clients=4, memory_message=1 * KIB * KIB, idle_seconds=2.0, soon=5,
             history_records=20_000, rate_messages=20)


@dataclass
class Figures:
    """Every measurement, by name; each a list of repetitions."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.values[name])


# --- measurements -----------------------------------------------------------------------

def smtp_source(port: int, sessions: int, messages: int, size: int) -> None:
    subprocess.run(["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
                    "-f", "bench@example.com", "-t", "sink@example.net",
                    f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)


def wait_received(sink: Sink, total: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while sink.received < total:
        if time.monotonic() > deadline:
            raise TimeoutError(f"sink has {sink.received} of {total} messages")
        time.sleep(0.01)


def throughput(server: Relay | Postfix, sink: Sink, sessions: int, messages: int,
               size: int) -> tuple[float, float]:
    """(accepted per second, delivered per second) for one smtp-source run."""
    before = sink.received
    started = time.monotonic()
    smtp_source(server.port, sessions, messages, size)
    accepted = time.monotonic() - started
    wait_received(sink, before + messages)
    delivered = time.monotonic() - started
    return messages / accepted, messages / delivered


def latencies(port: int, sends: int) -> list[float]:
    """Seconds per send: connect, EHLO, MAIL, RCPT, DATA of 10 KiB, QUIT."""
    body = (b"Subject: latency\r\n\r\n" + b"x" * 78 + b"\r\n") * 128
    spent = []
    for _ in range(sends):
        started = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.sendmail("bench@example.com", ["sink@example.net"], body)
        spent.append(time.perf_counter() - started)
    return spent


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def peak_memory(server: Relay | Postfix, clients: int, size: int) -> tuple[float, float]:
    """Peak memory (MiB of proportional set size, all the server's processes; and MiB of
    resident set) while `clients` each send one message of `size` bytes at once."""
    body = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * (size // 1000)
    peak = pss_kib(server.pids())
    peak_rss = rss_kib(server.pids())
    done = threading.Event()

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=300) as smtp:
            smtp.sendmail("bench@example.com", ["sink@example.net"], body)
    threads = [threading.Thread(target=send) for _ in range(clients)]
    for thread in threads:
        thread.start()
    threading.Thread(target=lambda: ([t.join() for t in threads], done.set()),
                     daemon=True).start()
    while not done.is_set():
        peak = max(peak, pss_kib(server.pids()))
        peak_rss = max(peak_rss, rss_kib(server.pids()))
        time.sleep(0.01)
    return peak / KIB, peak_rss / KIB


def fill_spool(spool_path: Path, entries: int, scheduled: bool = False) -> None:
    """`entries` deferred messages due in a day (or, `scheduled`, messages scheduled for a
    day ahead), written by the spool's own code with fsync skipped (building the fixture
    is not what is measured)."""
    from relay.entry import NewEntry, Queue
    from relay.spool import Spool, new_id
    with _no_fsync():
        spool = Spool(spool_path)
        spool.open()
        due = time.time() + 86400
        body = b"Subject: backlog\r\n\r\n" + b"x" * 1000 + b"\r\n"
        for n in range(entries):
            entry_id = new_id(time.time())
            if scheduled:
                spool.store_many([NewEntry(entry_id, "app@example.com", (f"user{n}@example.net",),
                                           (body,), time.time(), False, send_at=due)])
                continue
            spool.store(entry_id, "app@example.com", [f"user{n}@example.net"], [body],
                        time.time(), False)
            spool.move(entry_id, (Queue.INCOMING,), Queue.DEFERRED)
            os.utime(spool_path / "deferred" / entry_id, (due, due))


@contextlib.contextmanager
def _no_fsync() -> Iterator[None]:
    real_fsync = os.fsync
    os.fsync = lambda fd: None  # type: ignore[assignment]
    try:
        yield
    finally:
        os.fsync = real_fsync


# --- the run ------------------------------------------------------------------------------

def run(plan: Plan, workdir: Path,
        baseline: str | None = None) -> tuple[Figures, dict[str, list[float]]]:
    """Every figure; with `baseline` (another build's python), that build is measured
    beside this one and Postfix in the main comparison."""
    figures = Figures()
    names = ["relay", "postfix"] + (["baseline"] if baseline else [])
    latency_samples: dict[str, list[float]] = {name: [] for name in names}
    with contextlib.ExitStack() as running:
        sinks = {name: running.enter_context(Sink(workdir)) for name in names}
        servers: dict[str, Relay | Postfix] = {
            "relay": running.enter_context(Relay(workdir / "relay", sinks["relay"])),
            "postfix": running.enter_context(Postfix(workdir / "pf", sinks["postfix"])),
        }
        if baseline:
            servers["baseline"] = running.enter_context(
                Relay(workdir / "baseline", sinks["baseline"], python=baseline))
        for repetition in range(plan.repetitions):
            # Turn who goes first, so none always meets a warmer machine.
            order = names[repetition % len(names):] + names[:repetition % len(names)]
            for size in plan.sizes:
                messages = plan.messages // 2 if size >= 100 * KIB else plan.messages
                for sessions in plan.sessions:
                    key = f"{size // KIB}KiB x{sessions}"
                    for name in order:
                        accepted, delivered = throughput(servers[name], sinks[name],
                                                         sessions, messages, size)
                        figures.add(f"{name} accept {key}", accepted)
                        figures.add(f"{name} e2e {key}", delivered)
                    print(f"  rep {repetition + 1}: {size // KIB} KiB x{sessions}: " + ", ".join(
                        f"{n} {figures.values[f'{n} accept {key}'][-1]:.0f}/s" for n in order),
                        flush=True)
            for name in order:
                samples = latencies(servers[name].port, plan.latency_sends)
                latency_samples[name] += samples
                for label, fraction in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
                    figures.add(f"{name} latency {label}", percentile(samples, fraction) * 1000)
            for name in order:
                idle_rss = rss_kib(servers[name].pids()) / KIB
                peak_pss, peak_rss = peak_memory(servers[name], plan.memory_clients,
                                                 plan.memory_message)
                figures.add(f"{name} memory peak", peak_pss)
                figures.add(f"{name} memory over idle", peak_rss - idle_rss)
    slow(plan, workdir, figures)
    scale(plan, workdir, figures)
    metrics_cost(plan, workdir, figures)
    scheduling(plan, workdir, figures)
    history(plan, workdir, figures)
    paced(plan, workdir, figures)
    return figures, latency_samples


def slow(plan: Plan, workdir: Path, figures: Figures) -> None:
    """Delivery through a provider that takes 0.5 s per message."""
    for repetition in range(plan.repetitions):
        for name in (["relay", "postfix"] if repetition % 2 == 0 else ["postfix", "relay"]):
            where = workdir / f"slow-{name}-{repetition}"
            with contextlib.ExitStack() as running:
                sink = running.enter_context(Sink(where, delay=0.5))
                server = running.enter_context(
                    Relay(where, sink) if name == "relay" else Postfix(where, sink))
                started = time.monotonic()
                smtp_source(server.port, 16, plan.slow_messages, 1 * KIB)
                wait_received(sink, plan.slow_messages)
                figures.add(f"{name} slow sink", plan.slow_messages / (time.monotonic() - started))
        print(f"  rep {repetition + 1}: slow sink: relay "
              f"{figures.values['relay slow sink'][-1]:.1f}/s, postfix "
              f"{figures.values['postfix slow sink'][-1]:.1f}/s", flush=True)


def scale(plan: Plan, workdir: Path, figures: Figures) -> None:
    """The relay with `scale_entries` queued: start-up, listing, memory, and acceptance
    against a relay with an empty spool, alternating, on a disk at rest (the spool is
    filled without fsync, so its writeback is flushed first rather than measured)."""
    with contextlib.ExitStack() as running:
        sinks = {name: running.enter_context(Sink(workdir / f"scale-{name}"))
                 for name in ("full", "empty")}
        relays = {name: Relay(workdir / f"scale-{name}", sinks[name]) for name in sinks}
        fill_spool(relays["full"].spool, plan.scale_entries)
        os.sync()
        running.enter_context(relays["full"])
        figures.add("scale start-up", relays["full"].started_in)
        running.enter_context(relays["empty"])
        for _ in range(plan.repetitions):
            started = time.monotonic()
            listing = subprocess.run([sys.executable, "-m", "relay", "queue", "--json",
                                      "--config", str(relays["full"].config_path)],
                                     capture_output=True, check=True)
            figures.add("scale queue --json", time.monotonic() - started)
            assert len(json.loads(listing.stdout)) == plan.scale_entries
        figures.add("scale rss", rss_kib(relays["full"].pids()) / KIB)
        for repetition in range(plan.repetitions):
            for name in (["full", "empty"] if repetition % 2 == 0 else ["empty", "full"]):
                accepted, _ = throughput(relays[name], sinks[name], 16, plan.messages, 1 * KIB)
                figures.add(f"scale accept {name}", accepted)
    print(f"  scale: {plan.scale_entries} entries, start-up "
          f"{figures.median('scale start-up'):.1f} s, queue --json "
          f"{figures.median('scale queue --json'):.1f} s, acceptance "
          f"{figures.median('scale accept full'):.0f}/s against "
          f"{figures.median('scale accept empty'):.0f}/s empty", flush=True)


METRICS_CASES = ((1, 1 * KIB), (16, 1 * KIB))  # (sessions, size): latency-bound and CPU-bound


def metrics_cost(plan: Plan, workdir: Path, figures: Figures) -> None:
    """Acceptance with metrics on (scraped every second, as a busy Prometheus would not
    even do) against metrics off: two relays, alternating, each pair in either order.
    Each relay's CPU time per message is taken too: on a shared machine it varies far
    less than the rate does."""
    with contextlib.ExitStack() as running:
        sinks = {name: running.enter_context(Sink(workdir / f"metrics-{name}"))
                 for name in ("on", "off")}
        relays = {name: running.enter_context(Relay(workdir / f"metrics-{name}", sinks[name],
                                                    metrics=name == "on"))
                  for name in sinks}
        stop = threading.Event()
        scrapes = threading.Thread(target=scrape_every_second,
                                   args=(relays["on"].metrics_port, stop), daemon=True)
        scrapes.start()
        try:
            for name in relays:  # unmeasured: the first messages of a fresh relay are slower
                throughput(relays[name], sinks[name], 4, plan.messages // 2, 1 * KIB)
            for repetition in range(plan.metrics_repetitions):
                for sessions, size in METRICS_CASES:
                    key = f"{size // KIB}KiB x{sessions}"
                    for name in (["on", "off"] if repetition % 2 == 0 else ["off", "on"]):
                        pid = relays[name].pids()[0]
                        cpu = cpu_seconds(pid)
                        accepted, _ = throughput(relays[name], sinks[name], sessions,
                                                 plan.messages, size)
                        figures.add(f"metrics {name} {key}", accepted)
                        figures.add(f"metrics {name} cpu {key}",
                                    (cpu_seconds(pid) - cpu) / plan.messages * 1e6)
        finally:
            stop.set()
            scrapes.join(timeout=10)
    for sessions, size in METRICS_CASES:
        key = f"{size // KIB}KiB x{sessions}"
        print(f"  metrics: {key}: on {figures.median(f'metrics on {key}'):.0f}/s, off "
              f"{figures.median(f'metrics off {key}'):.0f}/s", flush=True)


def scrape_every_second(port: int | None, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            if b"relay_deliveries_total" not in reply.read():
                raise RuntimeError("the relay's /metrics lacks relay_deliveries_total")


def paced(plan: Plan, workdir: Path, figures: Figures) -> None:
    """An upstream with `rate: 10/s`: `rate_messages` sent at once by 16 sessions, timed
    from the first accepted to the last at the sink (the rate, not the relay, sets it)."""
    with Sink(workdir / "paced") as sink, \
            Relay(workdir / "paced", sink, connections=4, rate="10/s") as relay:
        for _ in range(plan.repetitions):
            before = sink.received
            started = time.monotonic()
            smtp_source(relay.port, 16, plan.rate_messages, 1 * KIB)
            wait_received(sink, before + plan.rate_messages)
            figures.add("paced seconds", time.monotonic() - started)
    print(f"  rate 10/s: {plan.rate_messages} messages in "
          f"{figures.median('paced seconds'):.1f} s", flush=True)


def scheduling(plan: Plan, workdir: Path, figures: Figures) -> None:
    """A relay over `scale_entries` messages scheduled for tomorrow: its CPU while they
    wait (a timer heap, no polling), then how late `soon` messages scheduled two seconds
    ahead reach the sink, the last of them measured from their send time."""
    from relay.entry import NewEntry
    from relay.spool import Spool, new_id
    with contextlib.ExitStack() as running:
        sink = running.enter_context(Sink(workdir / "sched"))
        relay = Relay(workdir / "sched", sink)
        fill_spool(relay.spool, plan.scale_entries, scheduled=True)
        os.sync()
        running.enter_context(relay)
        time.sleep(1.0)  # past start-up's own work
        for _ in range(plan.repetitions):
            before = cpu_seconds(relay.pids()[0])
            time.sleep(plan.idle_seconds)
            used = cpu_seconds(relay.pids()[0]) - before
            figures.add("scheduled idle cpu", 100 * used / plan.idle_seconds)
        spool = Spool(relay.spool)
        for _ in range(plan.repetitions):
            send_at = time.time() + 2.0
            body = b"Subject: soon\r\n\r\n" + b"x" * 1000 + b"\r\n"
            before = sink.received
            for n in range(plan.soon):
                new = NewEntry(new_id(time.time()), "app@example.com", (f"soon{n}@example.net",),
                               (body,), time.time(), False, send_at=send_at)
                spool.store_many([new])
                spool.wake(new.id)  # as `relay queue reschedule` tells the daemon
            wait_received(sink, before + plan.soon)
            figures.add("scheduled lateness", (time.time() - send_at) * 1000)
    print(f"  scheduling: {plan.scale_entries} waiting, relay CPU "
          f"{figures.median('scheduled idle cpu'):.2f}% of a core; {plan.soon} due together "
          f"all sent {figures.median('scheduled lateness'):.0f} ms after their time", flush=True)


def history(plan: Plan, workdir: Path, figures: Figures) -> None:
    """`relay history` over `history_records` records spread over 30 days: one recipient,
    and the failed ones (one in a thousand), each the whole command as an operator runs it."""
    from relay.history import Journal, Record, journal_dir
    from relay.spool import Spool
    spool = Spool(workdir / "history-spool")
    spool.open()
    journal = Journal(journal_dir(spool.path))
    now, span = time.time(), 30 * 86400.0
    batch = []
    with _no_fsync():
        for n in range(plan.history_records):
            at = now - span + span * n / plan.history_records
            batch.append(Record(
                at=at, status="failed" if n % 1000 == 7 else "sent",
                id=f"{int(at * 1e6):013X}{n:08X}", message_id=f"<{n}.{int(at)}@app.example.com>",
                sender="app@example.com", recipient=f"user{n}@example.net", size=1432,
                arrived=at - 0.4, send_at=None, delay=0.41, attempts=1,
                relay="smtp.mailgun.org:587", reply="250 Great success"))
            if len(batch) == 10_000:
                journal.append(batch)
                batch = []
        journal.append(batch)
        journal.close()
    os.sync()  # the journal was written without fsync: its writeback is not what is measured
    config = workdir / "history.yaml"
    config.write_text(f"spool: {{path: {spool.path}}}\n")
    queries = {"to": ["--to", f"user{plan.history_records * 2 // 3}@example.net"],
               "failed": ["--status", "failed"]}
    for _ in range(plan.repetitions):
        for name, args in queries.items():
            started = time.monotonic()
            subprocess.run([sys.executable, "-m", "relay", "history", *args, "--config",
                            str(config)], check=True, stdout=subprocess.DEVNULL)
            figures.add(f"history {name}", time.monotonic() - started)
    print(f"  history: {plan.history_records} records, --to "
          f"{figures.median('history to'):.2f} s, --status failed "
          f"{figures.median('history failed'):.2f} s", flush=True)


# --- the report ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    figure: str
    relay: float
    postfix: float | None  # None: compared with the relay's own baseline or a budget
    unit: str
    better: str  # "higher" or "lower"
    target: str
    baseline: float | None = None  # the same run's figure without the feature (metrics)
    previous: float | None = None  # the same run's figure of another build (--baseline)

    @property
    def ratio(self) -> float | None:
        if self.postfix is None or self.postfix == 0:
            return None
        return self.relay / self.postfix

    @property
    def met(self) -> bool:
        ratio = self.ratio
        if ratio is None:
            return True
        return ratio >= 1.0 if self.better == "higher" else ratio <= 1.0


def rows(plan: Plan, figures: Figures) -> list[Row]:
    m = figures.median

    def previous(name: str) -> float | None:
        return m(name) if name in figures.values else None
    out: list[Row] = []
    for kind, label in (("accept", "acceptance"), ("e2e", "end to end")):
        for size in plan.sizes:
            for sessions in plan.sessions:
                key = f"{kind} {size // KIB}KiB x{sessions}"
                out.append(Row(f"{label}, {size // KIB} KiB, {sessions} sessions",
                               m(f"relay {key}"), m(f"postfix {key}"), "msg/s", "higher",
                               ">= 1.0x", previous=previous(f"baseline {key}")))
    for label in ("p50", "p95", "p99"):
        out.append(Row(f"latency {label}, new connection per 10 KiB message",
                       m(f"relay latency {label}"), m(f"postfix latency {label}"), "ms", "lower",
                       "<= 1.0x" if label != "p95" else "(reported)",
                       previous=previous(f"baseline latency {label}")))
    out.append(Row("delivery through a 0.5 s/message sink", m("relay slow sink"),
                   m("postfix slow sink"), "msg/s", "higher", ">= 1.0x"))
    clients = f"{plan.memory_clients} clients x {plan.memory_message // (KIB * KIB)} MiB"
    out.append(Row(f"peak memory (PSS), {clients}", m("relay memory peak"),
                   m("postfix memory peak"), "MiB", "lower", "(reported)"))
    out.append(Row(f"relay's peak RSS over its idle RSS, {clients}", m("relay memory over idle"),
                   None, "MiB", "lower", "<= 64 MiB",
                   previous=previous("baseline memory over idle")))
    entries = f"{plan.scale_entries:,} entries"
    out.append(Row(f"scale: start-up with {entries}", m("scale start-up"), None, "s", "lower",
                   "< 10 s"))
    out.append(Row(f"scale: relay queue --json with {entries}", m("scale queue --json"), None,
                   "s", "lower", "< 5 s"))
    out.append(Row(f"scale: resident memory with {entries}", m("scale rss"), None, "MiB",
                   "lower", "< 300 MB"))
    out.append(Row(f"scale: acceptance 1 KiB x16 with {entries}", m("scale accept full"),
                   None, "msg/s", "higher",
                   f"within 10% of empty ({m('scale accept empty'):.0f} msg/s)"))
    for sessions, size in METRICS_CASES:
        key = f"{size // KIB}KiB x{sessions}"
        off = m(f"metrics off {key}")
        out.append(Row(f"metrics on: acceptance {size // KIB} KiB x{sessions}, against off "
                       f"({off:.0f} msg/s)", m(f"metrics on {key}"), None, "msg/s", "higher",
                       f"cost <= 3% (here {1 - m(f'metrics on {key}') / off:+.1%})", off))
        cpu_off = m(f"metrics off cpu {key}")
        out.append(Row(f"metrics on: relay CPU per message {size // KIB} KiB x{sessions}, "
                       f"against off ({cpu_off:.0f} us)", m(f"metrics on cpu {key}"), None,
                       "us", "lower", "(reported)"))
    low, high = (plan.rate_messages - 5) / 10, (plan.rate_messages + 10) / 10
    out.append(Row(f"rate 10/s: {plan.rate_messages} messages to the sink",
                   m("paced seconds"), None, "s", "lower", f"{low:g} to {high:g} s"))
    out.append(Row(f"scheduled: relay CPU while {plan.scale_entries:,} scheduled entries wait",
                   m("scheduled idle cpu"), None, "% of a core", "lower", "< 1%"))
    out.append(Row(f"scheduled: {plan.soon} messages due together, the last sent after its "
                   "time", m("scheduled lateness"), None, "ms", "lower", "< 1000 ms"))
    records = f"{plan.history_records:,} records"
    out.append(Row(f"history: relay history --to ADDR over {records}", m("history to"), None,
                   "s", "lower", "< 1 s"))
    out.append(Row(f"history: relay history --status failed over {records}",
                   m("history failed"), None, "s", "lower", "< 1 s"))
    return out


def budget_met(row: Row, plan: Plan, figures: Figures) -> bool:
    if row.postfix is not None:
        return row.met
    if "start-up" in row.figure:
        return row.relay < 10
    if "queue --json" in row.figure:
        return row.relay < 5
    if "over its idle RSS" in row.figure:
        return row.relay <= 64
    if "resident memory" in row.figure:
        return row.relay < 300
    if row.baseline is not None:
        return row.relay >= 0.97 * row.baseline
    if "due together" in row.figure:
        return row.relay < 1000
    if row.figure.startswith("rate 10/s:"):
        messages = plan.rate_messages
        return (messages - 5) / 10 <= row.relay <= (messages + 10) / 10
    if row.figure.startswith(("scheduled:", "history:")):
        return row.relay < 1.0
    return row.relay >= 0.9 * figures.median("scale accept empty")


def table(plan: Plan, figures: Figures) -> list[str]:
    """The table of figures; with a baseline build measured, its column and ratio too."""
    compared = any(name.startswith("baseline ") for name in figures.values)
    extra = " previous build | relay/previous |" if compared else ""
    lines = ["| figure | relay | Postfix | relay/Postfix | target | met |" + extra,
             "|---|---:|---:|---:|---|---|" + ("---:|---:|" if compared else "")]
    for row in rows(plan, figures):
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "—"
        postfix = f"{row.postfix:,.1f} {row.unit}" if row.postfix is not None else "—"
        met = "yes" if budget_met(row, plan, figures) else "**no**"
        if row.target == "(reported)":
            met = "—"
        line = (f"| {row.figure} | {row.relay:,.1f} {row.unit} | {postfix} | {ratio} | "
                f"{row.target} | {met} |")
        if compared:
            before = row.previous
            line += (f" {before:,.1f} {row.unit} | {row.relay / before:.2f}x |"
                     if before else " — | — |")
        lines.append(line)
    return lines


def plot(plan: Plan, figures: Figures, latency_samples: dict[str, list[float]],
         path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter, ScalarFormatter
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(plan.sizes) + 1, figsize=(4.2 * (len(plan.sizes) + 1), 3.6))
    for ax, size in zip(axes, plan.sizes, strict=False):
        for name, style in (("relay", "o-"), ("postfix", "s--")):
            ax.plot(plan.sessions, [figures.median(f"{name} accept {size // KIB}KiB x{s}")
                                    for s in plan.sessions], style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(plan.sessions, [str(s) for s in plan.sessions])
        ax.set_title(f"acceptance, {size // KIB} KiB")
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel("messages/s")
        ax.set_ylim(bottom=0)
        ax.legend()
    ax = axes[-1]
    for name, style in (("relay", "-"), ("postfix", "--")):
        samples = sorted(v * 1000 for v in latency_samples[name])
        ax.plot(samples, [i / len(samples) for i in range(len(samples))], style, label=name)
    ax.set_xscale("log")
    # Plain numbers on the major ticks only: the default labels the minor ones too, in
    # powers of ten that run into each other.
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    every_ms = [v * 1000 for samples in latency_samples.values() for v in samples]
    ax.set_xticks([t for t in (1, 2, 3, 5, 10, 20, 50, 100)
                   if min(every_ms) / 1.5 <= t <= max(every_ms) * 1.5])
    ax.set_title("latency, new connection per 10 KiB")
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of sends")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# The hand-written notes below the generated part of BENCHMARKS.md (what was measured
# and tried over time) survive a run that rewrites the table.
KEPT_HEADING = "## Measurements and what was tried"


def _kept_section(output: Path) -> str:
    """The hand-written section of an existing report, from KEPT_HEADING on; "" if none."""
    try:
        previous = output.read_text()
    except FileNotFoundError:
        return ""
    start = previous.find("\n" + KEPT_HEADING + "\n")
    return previous[start:] if start >= 0 else ""


def report(plan: Plan, figures: Figures, latency_samples: dict[str, list[float]],
           output: Path, quick: bool) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    picture = output.parent / "benchmarks.png"
    plotted = plot(plan, figures, latency_samples, picture)
    version = subprocess.run(["postconf", "-h", "mail_version"], capture_output=True,
                             text=True).stdout.strip()
    lines = [
        "# Benchmarks: relay against Postfix",
        "",
        "Generated by `python bench/run.py`" + (" --quick (a smoke run)" if quick else "") +
        f" on {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC: Python "
        f"{sys.version.split()[0]}, Postfix {version}, {len(os.sched_getaffinity(0))} CPUs. "
        f"Medians of {plan.repetitions} repetitions, relay and Postfix alternating, each "
        "relaying to its own sink on loopback (Postfix's smtp-sink; bench/sink.py for the "
        "0.5 s provider). The machine is shared and noisy: read the ratios, which are measured "
        "in the same run, not the absolute figures.",
        "",
        *table(plan, figures),
        "",
    ]
    if plotted:
        lines += [f"![throughput by concurrency and size; latency distribution]({picture.name})",
                  ""]
    lines += [
        ("How each figure is taken: acceptance is Postfix's `smtp-source` (one message per "
        "connection, as a web request sends) from the first connection to the last reply; end "
        "to end runs until the sink has every message. Latency is a Python `smtplib` client "
        "timing connect, EHLO, MAIL, RCPT, DATA and QUIT for each 10 KiB message. Peak memory "
        "sums the proportional set size (PSS) of every process of the server (for Postfix, the "
        "master and its children), so shared libraries count once; the scale figure is the "
        "relay's resident set (RSS). The scale figures are the relay's alone, against the "
        "budgets of issue 7; its acceptance with a full spool is compared with a second "
        "relay's on an empty spool, the two measured alternately once the filled spool's "
        "writeback was flushed. The metrics rows compare two relays of this build, one "
        "with `metrics.port` set and scraped every second, one without, measured "
        f"alternately ({plan.metrics_repetitions} pairs per case, medians); the target is "
        "a cost of at most 3% of the acceptance rate. The scheduling figures are a relay's "
        "CPU time (from /proc) over a window in which its scheduled entries all wait, and "
        "the time from a batch's send time until the sink has the last of it; the history "
        "figures time the whole `relay history` command, start-up included, over a journal "
        "of one record per message spread over 30 days."),
        "",
    ]
    output.write_text("\n".join(lines) + _kept_section(output))
    print("\n".join(table(plan, figures)))
    drawn = f", {picture}" if plotted else " (no plot: matplotlib missing)"
    print(f"\nwritten: {output}{drawn}")


def install_build(ref: str, workdir: Path) -> str:
    """Install the relay of git `ref` into a venv of its own; its python."""
    tree, venv = workdir / "baseline-build", workdir / "baseline-venv"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref],
                   check=True, stdout=subprocess.DEVNULL)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(tree)], check=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       check=False)
    return str(venv / "bin" / "python")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, under a minute")
    parser.add_argument("--output", type=Path, help="where to write BENCHMARKS.md "
                        "(default docs/BENCHMARKS.md; with --quick, a temp dir)")
    parser.add_argument("--baseline", metavar="REF", help="also measure the build of this "
                        "git commit or tag (installed into a venv of its own), e.g. "
                        "hand-written-listener")
    args = parser.parse_args()
    plan = QUICK if args.quick else Plan()
    ensure_postfix()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        os.chmod(tmp, 0o755)  # Postfix's own processes run as the postfix user
        output = args.output or (Path(tmp) / "BENCHMARKS.md" if args.quick
                                 else ROOT / "docs" / "BENCHMARKS.md")
        baseline = install_build(args.baseline, Path(tmp)) if args.baseline else None
        figures, samples = run(plan, Path(tmp), baseline)
        report(plan, figures, samples, output, args.quick)
        if args.quick and args.output is None:
            print((Path(tmp) / "BENCHMARKS.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
