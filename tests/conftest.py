"""Fixtures: a throwaway CA, real upstreams, real `relay serve` processes, a deadline wait."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from mailgun import API_KEY, API_KEY_ENV, MailgunStandIn
from upstream import PASSWORD, USERNAME, Upstream

from relay.spool import Spool

PASSWORD_ENV = "RELAY_TEST_UPSTREAM_PASSWORD"


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def holds_for(condition: Callable[[], Any], seconds: float, what: str = "condition") -> None:
    """Check that `condition` stays true for `seconds`: how a test proves that something
    does not happen (a retry, a login) within a window."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), f"{what} stopped holding"
        time.sleep(0.02)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """An empty spool of our own in the test's temp dir."""
    spool = Spool(tmp_path / "spool")
    spool.open()
    return spool


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def make_upstream(ca: trustme.CA) -> Iterator[Callable[..., Upstream]]:
    """Factory for started upstreams with STARTTLS (a cert for 127.0.0.1 from the test CA)."""
    started: list[Upstream] = []

    def make(**kwargs: Any) -> Upstream:
        import ssl
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        upstream = Upstream(context, **kwargs).start()
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        upstream.close()


@pytest.fixture
def upstream(make_upstream: Callable[..., Upstream]) -> Upstream:
    return make_upstream()


@pytest.fixture
def make_mailgun(ca: trustme.CA) -> Iterator[Callable[..., MailgunStandIn]]:
    """Factory for started Mailgun API stand-ins (HTTPS, a cert for 127.0.0.1 from the CA)."""
    started: list[MailgunStandIn] = []

    def make(**kwargs: Any) -> MailgunStandIn:
        import ssl
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        stand_in = MailgunStandIn(context, **kwargs).start()
        started.append(stand_in)
        return stand_in

    yield make
    for stand_in in started:
        stand_in.close()


@pytest.fixture
def mailgun(make_mailgun: Callable[..., MailgunStandIn]) -> MailgunStandIn:
    return make_mailgun()


class RelayProcess:
    """`python -m relay serve` in a subprocess, with its config written to a temp dir."""

    def __init__(self, workdir: Path, config: dict[str, Any],
                 env: dict[str, str] | None = None, prefix: list[str] | None = None) -> None:
        self.workdir = workdir
        self.env = env or {}
        self.prefix = prefix or []  # e.g. unshare ... to run the relay in a namespace
        self.config = config
        self.config_path = workdir / "relay.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.client_config_path = workdir / "relay.client.yaml"
        self.spool = Path(config["spool"]["path"])
        self.lines: list[str] = []
        self.port = 0
        self.metrics_port = 0  # where /metrics and /healthz answer, if metrics.port is set
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> RelayProcess:
        env = {**os.environ, PASSWORD_ENV: PASSWORD, API_KEY_ENV: API_KEY, **self.env}
        self.process = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "relay", "serve", "--config",
             str(self.config_path)],
            cwd=self.workdir, env=env, stderr=subprocess.PIPE, text=True)
        seen = len(self.lines)
        threading.Thread(target=self._read_stderr, args=(self.process,), daemon=True).start()

        def listening() -> int:
            for line in self.lines[seen:]:
                match = re.search(r"listening(?:=|\": \")[^ ,\"]+:(\d+)", line)
                if match:
                    return int(match.group(1))
            assert self.process is not None and self.process.poll() is None, \
                f"relay exited early:\n{self.log()}"
            return 0
        self.port = wait_for(listening, what="the relay to listen")
        for line in self.lines[seen:]:
            match = re.search(r"metrics(?:=|\": \")[^ ,\"]+:(\d+)", line)
            if match:
                self.metrics_port = int(match.group(1))
        # Commands (sendmail above all) need the real port, not the 0 the relay was given.
        client = {**self.config, "listen": {**self.config["listen"], "port": self.port}}
        if self.metrics_port:
            client["metrics"] = {**self.config["metrics"], "port": self.metrics_port}
        self.client_config_path.write_text(yaml.safe_dump(client))
        return self

    def _read_stderr(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        return "\n".join(self.lines)

    def get(self, path: str) -> tuple[int, str]:
        """GET `path` of the relay's monitoring endpoint: (status, body)."""
        assert self.metrics_port, "the relay was started without metrics.port"
        connection = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def reload(self, config: dict[str, Any]) -> None:
        """Rewrite the config file, send SIGHUP, and wait for the reload's outcome line."""
        assert self.process is not None
        self.config_path.write_text(yaml.safe_dump(config))
        seen = len(self.lines)
        self.process.send_signal(signal.SIGHUP)
        wait_for(lambda: any("event=reload" in line and "status=needs a restart" not in line
                             for line in self.lines[seen:]), what="the reload")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=30)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def client(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, timeout=10)

    def send(self, sender: str, recipients: list[str], body: bytes) -> str:
        """Submit one message; return the queue ID from the 250 reply."""
        with self.client() as smtp:
            code, reply = smtp.ehlo()
            assert code == 250
            smtp.mail(sender)
            for rcpt in recipients:
                code, reply = smtp.rcpt(rcpt)
                assert code == 250, reply
            code, reply = smtp.data(body)
        assert code == 250, reply
        match = re.search(rb"queued as ([0-9A-F]+)", reply)
        assert match, reply
        return match.group(1).decode()

    def state(self, entry_id: str) -> dict[str, Any]:
        """The entry's state record (attempts, last_error, recipients), {} if none yet."""
        try:
            return json.loads((self.spool / "state" / entry_id).read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def rss_kib(self) -> int:
        """The relay process's resident memory now, in KiB."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match, status
        return int(match.group(1))

    def files(self, queue: str) -> list[str]:
        return sorted(os.listdir(self.spool / queue))

    def queued(self) -> list[str]:
        """Entries not yet delivered. Listed in the order an entry moves (incoming/, active/,
        deferred/) so that one moving meanwhile is never missed, and as a set, as it may then
        be seen twice."""
        return sorted({*self.files("incoming"), *self.files("active"), *self.files("deferred")})

    def debris(self) -> list[str]:
        """What tmp/ holds besides the files of delivered entries kept for reuse
        (relay.spool.SPARES): a write left behind."""
        return [name for name in self.files("tmp") if not name.endswith(".spare")]

    def cli(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
        """Run `relay ARGS --config <this relay's config>` and capture its output."""
        return run_cli(self.client_config_path, *args, stdin=stdin)


@contextlib.contextmanager
def in_data(port: int, timeout: float = 10) -> Iterator[tuple[socket.socket, Any]]:
    """A raw session to 127.0.0.1:port taken up to the 354 that invites the message body:
    yields the socket and a binary reader of the relay's replies."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"EHLO c.example\r\nMAIL FROM:<a@example.com>\r\n"
                     b"RCPT TO:<u@example.com>\r\nDATA\r\n")
        while not reader.readline().startswith(b"354"):
            pass
        yield sock, reader


def run_cli(config_path: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, PASSWORD_ENV: PASSWORD, API_KEY_ENV: API_KEY}
    result = subprocess.run([sys.executable, "-m", "relay", *args, "--config", str(config_path)],
                            input=stdin, capture_output=True, env=env, timeout=60)
    return subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode(), result.stderr.decode())


def relay_config(tmp_path: Path, upstream: Upstream | None, ca_file: Path | None, /,
                 **overrides: Any) -> dict[str, Any]:
    """A test config: ephemeral port, fast retries, the test upstream over STARTTLS + AUTH."""
    config: dict[str, Any] = {
        "listen": {"address": "127.0.0.1", "port": 0, "timeout": "30s"},
        "spool": {"path": str(tmp_path / "spool"), "min_free": 0},
        "delivery": {"retry_min": "200ms", "retry_max": "1s"},
        "log": {"level": "debug"},
    }
    if upstream is not None:
        config["upstream"] = {
            "host": "127.0.0.1", "port": upstream.port, "tls": "starttls",
            "ca_file": str(ca_file), "username": USERNAME, "password_env": PASSWORD_ENV,
            "connections": 2, "timeout": "5s",
        }
    for section, values in overrides.items():
        config.setdefault(section, {}).update(values)
    return config


MakeRelay = Callable[..., RelayProcess]  # the make_relay fixture: (config, env, prefix)


@pytest.fixture
def make_relay(tmp_path: Path) -> Iterator[MakeRelay]:
    started: list[RelayProcess] = []

    def make(config: dict[str, Any], env: dict[str, str] | None = None,
             prefix: list[str] | None = None) -> RelayProcess:
        relay = RelayProcess(tmp_path, config, env, prefix).start()
        started.append(relay)
        return relay

    yield make
    for relay in started:
        if relay.process is not None and relay.process.poll() is None:
            relay.kill()


@pytest.fixture
def relay(make_relay: Callable[[dict[str, Any]], RelayProcess], upstream: Upstream,
          ca_file: Path, tmp_path: Path) -> RelayProcess:
    """A relay delivering to the standard test upstream."""
    return make_relay(relay_config(tmp_path, upstream, ca_file))
