"""/healthz and `relay check --local` against a real `relay serve`: healthy, the spool's
disk full (a tiny tmpfs in a mount namespace), the listener closed while deliveries drain,
and the endpoint's own refusals."""

from __future__ import annotations

import http.client
import signal
from pathlib import Path

import pytest
from conftest import MakeRelay, RelayProcess, relay_config, run_cli, wait_for
from ports import reusable_port
from test_disk_full import tmpfs_works
from upstream import Upstream

BODY = b"Subject: health\r\nMessage-ID: <h@example.com>\r\n\r\nHello.\r\n"


def test_healthy_relay_answers_200_and_check_local_exits_0(
        make_relay: MakeRelay, upstream: Upstream, ca_file: Path, tmp_path: Path) -> None:
    """Listener up, spool writable: 200 ok; `relay check --local` prints it and exits 0."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file, metrics={"port": 0}))
    assert relay.get("/healthz") == (200, "ok\n")
    result = relay.cli("check", "--local")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["healthz", "ok"]


def test_full_spool_disk_answers_503_naming_the_spool(make_relay: MakeRelay,
                                                       tmp_path: Path) -> None:
    """A tmpfs spool filled to the last byte: 503 with the spool's reason, check --local
    exits 69; once space is freed, 200 again."""
    if not tmpfs_works(tmp_path):
        pytest.skip("this kernel refuses tmpfs mounts in an unprivileged user namespace")
    config = relay_config(tmp_path, None, None, metrics={"port": 0})
    spool_dir = Path(config["spool"]["path"])
    spool_dir.mkdir()
    prefix = ["unshare", "-rm", "sh", "-c",
              'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$@"', str(spool_dir)]
    relay: RelayProcess = make_relay(config, prefix=prefix)
    assert relay.process is not None
    filler = Path(f"/proc/{relay.process.pid}/root") / spool_dir.relative_to("/") / "filler"
    assert relay.get("/healthz")[0] == 200
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    status, body = relay.get("/healthz")
    assert status == 503
    assert body.startswith("spool: 0 bytes free"), body
    result = relay.cli("check", "--local")
    assert result.returncode == 69
    assert "FAILED  503 spool: 0 bytes free" in result.stdout
    filler.unlink()
    assert relay.get("/healthz") == (200, "ok\n")


def test_closed_listener_answers_503_while_deliveries_drain(
        make_relay: MakeRelay, upstream: Upstream, ca_file: Path, tmp_path: Path) -> None:
    """After SIGTERM the listener is closed at once and deliveries in flight get their
    grace: meanwhile /healthz says 503 (take the relay out of rotation) naming the
    listener, and check --local exits 69."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file, metrics={"port": 0}))
    upstream.data_delay = 3.0  # under the test config's upstream.timeout of 5 s
    relay.send("app@example.com", ["user@example.com"], BODY)
    assert upstream.data_started.wait(10)
    assert relay.process is not None
    relay.process.send_signal(signal.SIGTERM)
    _, body = wait_for(lambda: (answer := relay.get("/healthz"))[0] == 503 and answer,
                       what="the 503")
    assert body == "listener: not accepting connections\n"
    result = relay.cli("check", "--local")
    assert result.returncode == 69 and "listener: not accepting" in result.stdout
    assert relay.process.wait(timeout=30) == 0
    assert len(upstream.delivered_to("user@example.com")) == 1


def test_client_outside_metrics_allow_is_refused(make_relay: MakeRelay, tmp_path: Path) -> None:
    """metrics.allow without loopback: a scrape from 127.0.0.1 gets 403 and no figures."""
    relay = make_relay(relay_config(tmp_path, None, None,
                                    metrics={"port": 0, "allow": ["192.0.2.0/24"]}))
    status, body = relay.get("/metrics")
    assert status == 403 and "relay_" not in body
    assert relay.get("/healthz")[0] == 403


def test_unknown_path_is_404_and_other_methods_405(make_relay: MakeRelay, tmp_path: Path) -> None:
    """Only GET (and HEAD) of /metrics and /healthz are served."""
    relay = make_relay(relay_config(tmp_path, None, None, metrics={"port": 0}))
    assert relay.get("/")[0] == 404
    connection = http.client.HTTPConnection("127.0.0.1", relay.metrics_port, timeout=10)
    connection.request("POST", "/healthz", body=b"x")
    assert connection.getresponse().status == 405
    connection.close()


def test_check_local_without_metrics_port_exits_78(tmp_path: Path) -> None:
    """No metrics.port: nothing to ask; a configuration error naming the key."""
    path = tmp_path / "relay.yaml"
    path.write_text("spool: {path: spool}\n")
    result = run_cli(path, "check", "--local")
    assert result.returncode == 78
    assert "metrics.port" in result.stderr


def test_check_local_with_no_relay_running_exits_69(tmp_path: Path) -> None:
    """A port nobody listens on: 69 and what was tried."""
    path = tmp_path / "relay.yaml"
    port = reusable_port()
    path.write_text(f"metrics: {{port: {port}}}\n")
    result = run_cli(path, "check", "--local")
    assert result.returncode == 69
    assert f"no relay answers at 127.0.0.1:{port}" in result.stderr


def test_check_local_asks_loopback_for_a_wildcard_address(make_relay: MakeRelay,
                                                           tmp_path: Path) -> None:
    """metrics.address 0.0.0.0 (with allow): check --local asks 127.0.0.1."""
    relay = make_relay(relay_config(tmp_path, None, None, metrics={
        "address": "0.0.0.0", "port": 0, "allow": ["127.0.0.0/8"]}))
    result = relay.cli("check", "--local")
    assert result.returncode == 0, result.stderr
    assert f"127.0.0.1:{relay.metrics_port} 200" in result.stdout
