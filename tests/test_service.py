"""`relay serve` as a systemd service: the unit, sd_notify, SIGHUP reload, journald logs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import RelayProcess, relay_config, wait_for
from upstream import Upstream

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "config" / "relay.service"
BODY = b"Subject: t\r\n\r\nbody\r\n"
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


@pytest.fixture
def unit_file(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's relay (verify needs it)."""
    relay_script = Path(sys.executable).parent / "relay"
    assert relay_script.exists(), "relay must be installed (pip install -e .[test])"
    unit = tmp_path / "relay.service"
    unit.write_text(UNIT.read_text().replace("/opt/relay/bin/relay", str(relay_script)))
    return unit


@pytest.mark.plan(102)
@needs_systemd
def test_unit_passes_systemd_analyze_verify(unit_file: Path) -> None:
    """verify exits 0 even on unknown keys, so any output at all is a failure."""
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit_file)],
                            capture_output=True, text=True, timeout=60, cwd=unit_file.parent)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.plan(102)
@needs_systemd
def test_unit_hardening_exposure_is_low(unit_file: Path, capsys: pytest.CaptureFixture) -> None:
    """systemd-analyze security: exposure at most 2.0 (threshold is on a 0-100 scale)."""
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20",
                             str(unit_file)], capture_output=True, text=True, timeout=60,
                            cwd=unit_file.parent)
    verdict = [line for line in result.stdout.splitlines() if "Overall exposure" in line]
    with capsys.disabled():
        print(f"\nsystemd-analyze security: {verdict[0].strip() if verdict else result.stderr}")
    assert result.returncode == 0, result.stdout[-2000:]


def test_unit_runs_relay_unprivileged_with_its_credential() -> None:
    """The unit's essentials: notify type, reload, watchdog, user, capability, credential."""
    text = UNIT.read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "User=relay",
                 "StateDirectory=relay", "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                 "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "UMask=0077",
                 "LoadCredential=relay-password:", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "MemoryDenyWriteExecute=yes", "LimitCORE=0"):
        assert line in text, line
    stop = int(text.split("TimeoutStopSec=")[1].split("s")[0])
    from relay.daemon import DRAIN_SECONDS
    assert stop > DRAIN_SECONDS


class NotifySocket:
    """A unix datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return self.messages

    def saw(self, predicate) -> bool:  # type: ignore[no-untyped-def]
        return any(predicate(m) for m in self.drain())


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer.
    short = Path(f"/tmp/relay-notify-{os.getpid()}-{id(tmp_path)}")
    listener = NotifySocket(short)
    yield listener
    listener.sock.close()
    short.unlink()


def test_readiness_status_watchdog_reload_and_stopping(tmp_path: Path, make_relay,
                                                       notify_socket: NotifySocket) -> None:
    """READY=1 once listening, STATUS= with queue counts, WATCHDOG=1 at half the interval,
    RELOADING=1 then READY=1 around SIGHUP, STOPPING=1 on SIGTERM."""
    config = relay_config(tmp_path, None, None)
    relay = make_relay(config, env={"NOTIFY_SOCKET": str(notify_socket.path),
                                    "WATCHDOG_USEC": "200000"})
    wait_for(lambda: notify_socket.saw(lambda m: m == "READY=1"), what="READY=1")
    relay.send("app@example.com", ["user@example.com"], BODY)
    wait_for(lambda: notify_socket.saw(lambda m: m == "STATUS=0 queued, 0 active, 1 deferred, "
                                                      "0 held, 0 failed, 0 scheduled"),
             what="STATUS=")
    wait_for(lambda: notify_socket.drain().count("WATCHDOG=1") >= 3, what="watchdog pings")
    seen = len(notify_socket.drain())
    relay.reload(config)
    after = notify_socket.drain()[seen:]
    assert "RELOADING=1" in after and after.index("RELOADING=1") < after.index("READY=1")
    assert relay.stop() == 0
    assert "STOPPING=1" in notify_socket.drain()


@pytest.mark.plan(79)
def test_reload_applies_new_credentials_without_dropping_mail(
        tmp_path: Path, make_relay, upstream: Upstream, ca_file: Path) -> None:
    """Credentials rotated at the provider: fix the password file, SIGHUP, flush, delivered."""
    password_file = tmp_path / "password"
    password_file.write_text("old-password\n")
    upstream.password = "new-password"
    config = relay_config(tmp_path, upstream, ca_file,
                          delivery={"retry_min": "1h", "retry_max": "2h"})
    del config["upstream"]["password_env"]
    config["upstream"]["password_file"] = str(password_file)
    relay = make_relay(config)
    entry_id = relay.send("app@example.com", ["user@example.com"], BODY)
    wait_for(lambda: entry_id in relay.files("deferred"), what="deferral on AUTH failure")
    with relay.client() as idle_client:  # a connection open across the reload
        idle_client.ehlo()
        password_file.write_text("new-password\n")
        relay.reload(config)
        assert "status=reloaded" in relay.log()
        assert relay.cli("queue", "flush").returncode == 0
        [got] = wait_for(lambda: upstream.delivered_to("user@example.com"), what="delivery")
        assert got.authenticated
        assert idle_client.noop()[0] == 250


@pytest.mark.plan(79)
def test_reload_applies_new_limits_and_log_level(tmp_path: Path, make_relay) -> None:
    """A raised recipient limit applies to the next connection; log.level warning hides
    the info lines from then on."""
    config = relay_config(tmp_path, None, None, listen={"max_recipients": 1})
    relay = make_relay(config)
    config["listen"]["max_recipients"] = 3
    config["log"]["level"] = "warning"
    relay.config_path.write_text(yaml.safe_dump(config))
    seen = len(relay.lines)
    assert relay.process is not None
    relay.process.send_signal(signal.SIGHUP)  # its own "reloaded" line is info: not shown

    def three_recipients_accepted() -> bool:
        """Queue a message only if all three recipients are taken (nothing otherwise)."""
        with relay.client() as smtp:
            smtp.ehlo()
            smtp.mail("app@example.com")
            if any(smtp.rcpt(f"{name}@example.com")[0] != 250 for name in "abc"):
                smtp.rset()
                return False
            return smtp.data(BODY)[0] == 250
    wait_for(three_recipients_accepted, what="the new recipient limit")
    wait_for(lambda: relay.files("deferred"), what="deferral")
    assert not any("status=queued" in line for line in relay.lines[seen:])


@pytest.mark.plan(80)
def test_invalid_config_on_reload_keeps_the_running_one(tmp_path: Path, make_relay) -> None:
    """SIGHUP with a broken config: the error is logged, the running configuration kept,
    and mail still accepted."""
    config = relay_config(tmp_path, None, None)
    relay = make_relay(config)
    relay.config_path.write_text("listen: {port: not-a-port}\n")
    seen = len(relay.lines)
    assert relay.process is not None
    relay.process.send_signal(signal.SIGHUP)
    wait_for(lambda: any("status=rejected" in line for line in relay.lines[seen:]),
             what="the rejected reload")
    assert "listen.port: expected an integer" in relay.log()
    assert relay.send("app@example.com", ["user@example.com"], BODY)


def test_listen_port_change_is_logged_as_needing_a_restart(tmp_path: Path, make_relay) -> None:
    config = relay_config(tmp_path, None, None)
    relay: RelayProcess = make_relay(config)
    changed = {**config, "listen": {**config["listen"], "port": relay.port + 1}}
    relay.reload(changed)
    assert "key=listen.port, status=needs a restart" in relay.log()
    assert relay.send("app@example.com", ["user@example.com"], BODY)  # the old port still works


def test_under_journald_lines_carry_no_timestamp(tmp_path: Path, make_relay) -> None:
    """With $JOURNAL_STREAM set, journald stamps lines; relay does not add its own."""
    relay = make_relay(relay_config(tmp_path, None, None, log={"level": "info"}),
                       env={"JOURNAL_STREAM": "8:12345"})
    # Not lines[0]: on a host without an FQDN, start-up's event=hostname warning comes first.
    start = next(line for line in relay.lines if "event=start" in line)
    assert start.startswith("info: event=start, listening=")


def test_the_service_runs_on_uvloop_where_it_is_installed(tmp_path: Path, make_relay) -> None:
    """uvloop is a dependency on this platform: `relay serve` runs on it, so every test
    through a running relay exercises it (the in-process tests use asyncio's loop)."""
    pytest.importorskip("uvloop")
    relay = make_relay(relay_config(tmp_path, None, None, log={"level": "info"}))
    start = next(line for line in relay.lines if "event=start" in line)
    assert start.endswith(", loop=uvloop")


@pytest.mark.plan(111)
def test_a_reload_with_an_unusable_ca_file_is_refused_whole(
        tmp_path: Path, make_relay, upstream: Upstream, ca_file: Path,
        notify_socket: NotifySocket) -> None:
    """A ca_file that exists but holds no certificate: the reload is refused before any
    of it takes effect (the new recipient limit neither), the log names the key,
    STATUS= says it was refused, READY=1 follows RELOADING=1, and mail still flows."""
    config = relay_config(tmp_path, upstream, ca_file)
    relay = make_relay(config, env={"NOTIFY_SOCKET": str(notify_socket.path)})
    wait_for(lambda: notify_socket.saw(lambda m: m == "READY=1"), what="READY=1")
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("this is not a certificate\n")
    seen = len(notify_socket.drain())
    relay.reload({**config, "upstream": {**config["upstream"], "ca_file": str(bad)},
                  "listen": {**config["listen"], "max_recipients": 1}})
    assert "status=rejected" in relay.log() and "upstream.ca_file" in relay.log()
    wait_for(lambda: "READY=1" in notify_socket.drain()[seen:], what="READY=1 again")
    after = notify_socket.drain()[seen:]
    status = [m for m in after if m.startswith("STATUS=reload")]
    assert after.index("RELOADING=1") < after.index(status[0]) < after.index("READY=1")
    assert status[0].startswith("STATUS=reload refused: upstream.ca_file")
    relay.send("app@example.com", ["one@example.com", "two@example.com"], BODY)
    wait_for(lambda: upstream.delivered_to("two@example.com"), what="delivery")


@pytest.mark.plan(111)
def test_a_good_reload_says_so_in_status(tmp_path: Path, make_relay,
                                         notify_socket: NotifySocket) -> None:
    """STATUS=reloaded, then READY=1."""
    config = relay_config(tmp_path, None, None)
    relay = make_relay(config, env={"NOTIFY_SOCKET": str(notify_socket.path)})
    wait_for(lambda: notify_socket.saw(lambda m: m == "READY=1"), what="READY=1")
    seen = len(notify_socket.drain())
    relay.reload(config)
    wait_for(lambda: "READY=1" in notify_socket.drain()[seen:], what="READY=1 again")
    after = notify_socket.drain()[seen:]
    assert after.index("STATUS=reloaded") < after.index("READY=1")
