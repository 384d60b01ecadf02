"""`relay serve`: the listener and delivery on one event loop, signals, readiness, drain.

Lifecycle like uvicorn's Server: start-up (spool lock, crash recovery, bind, workers,
READY=1), run until SIGTERM or SIGINT, shutdown (close the listener, stop claiming, give
in-flight deliveries DRAIN_SECONDS, then cancel them: their entries stay queued). SIGHUP
reloads the config, all or nothing. Long-lived tasks are supervised (relay.supervise);
if one keeps dying, or the spool writer's thread dies, the daemon shuts down the same
way and `serve` raises TaskFailed (exit 70), for systemd to start it afresh. No business
logic lives here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor

from . import addresses, tuning
from .bounces import Bounces
from .clock import SteadyClock
from .config import Config, keep_restart_only, load_config, restart_required
from .delivery import Delivery
from .entry import Entry
from .errors import ConfigError, ForeignFile, TaskFailed
from .history import HistoryWriter, journal_dir
from .hostname import system_name
from .listener import ServerFactory
from .log import log_event, log_failure, setup_logging
from .metrics import Metrics, Recorder
from .monitor import Monitor
from .spool import Spool
from .supervise import supervised
from .systemd import notify, watchdog_interval
from .writer import SpoolWriter

# How long SIGTERM waits for deliveries in flight; systemd's TimeoutStopSec must exceed it.
DRAIN_SECONDS = 10.0
HOUSEKEEPING_SECONDS = 10.0  # how often STATUS= is refreshed and the clock compared
CLOCK_JUMP_SECONDS = 60.0  # a step of the system clock worth a warning


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.spool = Spool(config.spool.path, config.spool.min_free)
        self.spool.on_foreign = _log_foreign
        self.clock = SteadyClock()
        self.writer = SpoolWriter(self.spool, on_failure=self._writer_failed)
        self.system = system_name()  # read once: a reload keeps the names found at start
        hostname = addresses.rules_for(config.addresses, self.system).hostname
        # Off (metrics.port null): the calls still happen, into a Recorder that keeps nothing.
        self.metrics = Metrics(self.spool, self.clock) if config.metrics.port is not None \
            else Recorder()
        self.monitor = Monitor(config.metrics, self.metrics, [
            ("listener", self._listener_problem), ("spool", self.spool.write_problem),
        ]) if isinstance(self.metrics, Metrics) else None
        self.bounces = Bounces(config.bounces, self.spool, self.writer, self._stored,
                               hostname, self.clock, self.metrics)
        self.history = HistoryWriter(journal_dir(self.spool.path), config.history.keep) \
            if config.history.enabled else None
        # EHLO to the upstream with the relay's name too, rather than the upstream
        # session's getfqdn(), which would hold the event loop while DNS times out.
        self.delivery = Delivery(self.spool, self.writer, config, clock=self.clock,
                                 client_sessions=self._client_sessions,
                                 metrics=self.metrics, bounces=self.bounces,
                                 history=self.history, hostname=hostname, on_fatal=self.fail)
        self.failure: TaskFailed | None = None  # why the daemon is stopping, if a task died
        self._reported_skew = 0.0
        self._factory: ServerFactory | None = None
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where the listener is bound (the real port when the config asked for port 0)."""
        assert self._server is not None
        return [s.getsockname()[:2] for s in self._server.sockets]

    async def start(self) -> None:
        """Take the spool, recover it, bind the listener, start delivery. Raises RelayError
        or OSError (port in use, no permission) before anything is accepted."""
        self.spool.open()
        self.spool.lock()
        latest = self.clock() + self.config.delivery.retry_max
        pulled = await asyncio.to_thread(self.spool.pull_forward, latest)
        if pulled:
            log_event(logging.WARNING, None, event="clock", deferred=pulled,
                      reason="next attempt more than delivery.retry_max ahead; the system "
                             "clock went back?", action="due within retry_max")
        due = await asyncio.to_thread(self.spool.recover)
        for entry_id, when in due:
            self.delivery.schedule(entry_id, when)
        listen = self.config.listen
        rules = addresses.rules_for(self.config.addresses, self.system)
        if self.config.addresses.hostname is None and self.system.fqdn is None:
            log_event(logging.WARNING, None, event="hostname", hostname=rules.hostname,
                      reason="the system has no fully qualified host name (neither "
                             "gethostname nor /etc/hosts gives one)",
                      action="set addresses.hostname in the config")
        self.writer.start()
        if self.history is not None:
            self.history.start()
        self._factory = ServerFactory(self.spool, self.writer, self.config, self._stored,
                                      rules, self.metrics, self.clock)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, host=listen.address,
                                                port=listen.port)
        self.metrics.upstreams([u.name for u in self.config.upstreams])
        if self.monitor is not None:
            await self.monitor.start()
        self.delivery.start()
        self._tasks = [asyncio.create_task(supervised(name, run, self.fail), name=name)
                       for name, run in (("incoming-watcher", self.delivery.watch_incoming),
                                         ("active-sweep", self.delivery.sweep),
                                         ("housekeeping", self._housekeeping))]
        where = ", ".join(f"{host}:{port}" for host, port in self.addresses)
        metrics = ", ".join(f"{host}:{port}" for host, port in
                            (self.monitor.addresses if self.monitor is not None else []))
        log_event(logging.INFO, None, event="start", listening=where,
                  spool=str(self.spool.path), queued=len(due), upstream=self._upstream_text(),
                  metrics=metrics or "off",
                  loop=type(asyncio.get_running_loop()).__module__.partition(".")[0])
        notify("READY=1")

    def _stored(self, entry: Entry, parts: tuple[bytes, ...]) -> None:
        self.delivery.schedule_new(entry, parts)

    def _client_sessions(self) -> int:
        return self._factory.admission.active if self._factory is not None else 0

    def _listener_problem(self) -> str | None:
        """For /healthz: None while the listener accepts connections."""
        if self._server is None or not self._server.is_serving():
            return "not accepting connections"
        return None

    def _upstream_text(self) -> str:
        upstreams = self.config.upstreams
        if not upstreams:
            return "none (mail is kept in the queue until one is configured)"
        return ", ".join(f"{u.name} ({getattr(u, 'tls', u.transport)})" for u in upstreams)

    def request_stop(self) -> None:
        self._stop.set()

    def fail(self, failure: TaskFailed) -> None:
        """An internal task is beyond restarting: log it and stop, to exit non-zero."""
        if self.failure is None:
            self.failure = failure
            cause = failure.__cause__ or failure
            log_failure(logging.CRITICAL, None, cause, event="fatal", task=failure.task,
                        reason=f"{type(cause).__name__}: {cause}",
                        action="stopping; exit status 70 for a restart")
        self._stop.set()

    def _writer_failed(self, exc: BaseException) -> None:
        failure = TaskFailed("spool-writer", exc)
        failure.__cause__ = exc
        self.fail(failure)

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def reload(self) -> None:
        """Re-read the config (SIGHUP), all or nothing. Upstream, credentials, retry policy,
        limits and logging take effect; what needs a restart is logged and kept; an invalid
        config (or TLS settings that cannot be used) is logged and the running one kept.
        Connections and queued mail are untouched. READY=1 always follows RELOADING=1,
        after a STATUS= saying whether the reload was refused."""
        if self._factory is None:
            return  # SIGHUP during start-up: the config being started is already fresh
        notify("RELOADING=1")
        try:
            status = await self._reload()
        except Exception as exc:  # noqa: BLE001 - a bug; nothing was switched over
            log_failure(logging.ERROR, None, exc, event="reload", status="rejected",
                        reason=f"{type(exc).__name__}: {exc}",
                        kept="the running configuration")
            status = "reload refused; running configuration kept"
        notify(f"STATUS={status}")
        notify("READY=1")

    async def _reload(self) -> str:
        """Build everything the new config needs, then switch over in one step that
        cannot fail; return the STATUS= text."""
        assert self._factory is not None
        source = str(self.config.source) if self.config.source else None
        try:
            new = await asyncio.to_thread(load_config, source)
            restart = restart_required(self.config, new)
            new = keep_restart_only(self.config, new)
            switch_delivery = await asyncio.to_thread(self.delivery.prepare, new)
        except (ConfigError, OSError) as exc:
            log_event(logging.ERROR, None, event="reload", status="rejected", reason=str(exc),
                      kept="the running configuration")
            return f"reload refused: {exc}; running configuration kept"
        for key in restart:
            log_event(logging.WARNING, None, event="reload", key=key,
                      status="needs a restart", kept="the running value")
        self.config = new
        setup_logging(new.log)
        rules = addresses.rules_for(new.addresses, self.system)
        self._factory.reconfigure(new, rules)
        self.delivery.hostname = rules.hostname
        self.spool.min_free = new.spool.min_free
        if self.history is not None:
            self.history.keep = new.history.keep
        switch_delivery()
        self.bounces.reconfigure(new.bounces)
        self.metrics.upstreams([u.name for u in new.upstreams])
        if self.monitor is not None:
            self.monitor.reconfigure(new.metrics)
        log_event(logging.INFO, None, event="reload", status="reloaded",
                  upstream=self._upstream_text())
        return "reloaded"

    async def _housekeeping(self) -> None:
        """Tell systemd we are alive (WATCHDOG=1, from the event loop itself, so a frozen
        loop stops the pings) and what the queue holds (STATUS=); warn when the system
        clock jumps."""
        notifying = bool(os.environ.get("NOTIFY_SOCKET"))
        ping = watchdog_interval() if notifying else None
        period = min(ping, HOUSEKEEPING_SECONDS) if ping else HOUSEKEEPING_SECONDS
        while True:
            if ping:
                notify("WATCHDOG=1")
            if notifying:
                counts = await asyncio.to_thread(self.spool.counts)
                notify("STATUS=" + ", ".join(f"{n} {state}" for state, n in counts.items()))
            self.check_clock()
            await asyncio.sleep(period)

    def check_clock(self) -> None:
        """Log once per jump of the system clock; the relay's own clock does not follow it
        (retries and expiry stay on schedule) until the next restart."""
        skew = self.clock.skew()
        if abs(skew - self._reported_skew) < CLOCK_JUMP_SECONDS:
            return
        self._reported_skew = skew
        log_event(logging.WARNING, None, event="clock", skew=f"{skew:+.0f}s",
                  reason="the system clock jumped", action="retries and expiry keep the "
                  "relay's steady clock until restart")

    async def stop(self) -> None:
        notify("STOPPING=1")
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await self.delivery.stop(DRAIN_SECONDS)
        await self.writer.close()
        if self.history is not None:
            await asyncio.to_thread(self.history.close)
        if self.monitor is not None:
            await self.monitor.close()  # last: /healthz says 503 while deliveries drain
        self.spool.unlock()
        if self._server is not None:
            log_event(logging.INFO, None, event="stop", status="stopped")


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT; raises what Daemon.start raises, and TaskFailed if an
    internal task died beyond restarting."""
    daemon = Daemon(config)
    loop = asyncio.get_running_loop()
    # State records (deferrals, failures) and large reads go to these threads; stores and
    # removals have a thread of their own (relay.writer).
    loop.set_default_executor(ThreadPoolExecutor(max_workers=tuning.SPOOL_THREADS,
                                                 thread_name_prefix="spool"))
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, daemon.request_stop)
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = loop.create_task(daemon.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)
    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await daemon.start()
        await daemon.wait_stopped()
    finally:
        await daemon.stop()
    if daemon.failure is not None:
        raise daemon.failure


def _log_foreign(problem: ForeignFile) -> None:
    log_event(logging.WARNING, None, event="spool", status="foreign file", path=problem.path,
              reason=problem.reason)
