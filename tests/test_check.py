"""`relay check`: config, then each upstream (SMTP: connect, TLS, AUTH; the API: its domain),
against real servers, sending nothing."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from chaos import BabblingServer
from conftest import relay_config, run_cli, wait_for
from mailgun import API_KEY, DOMAIN, MailgunStandIn
from upstream import PASSWORD, Upstream


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def assert_no_secret(text: str) -> None:
    assert PASSWORD not in text and base64.b64encode(PASSWORD.encode()).decode() not in text


def test_good_upstream_passes_every_step(tmp_path: Path, upstream: Upstream,
                                         ca_file: Path) -> None:
    """Each step is printed with the server's reply; exit 0; no mail is sent."""
    path = write_config(tmp_path, relay_config(tmp_path, upstream, ca_file))
    result = run_cli(path, "check")
    assert result.returncode == 0, result.stdout
    steps = [line.split()[:2] for line in result.stdout.splitlines()]
    assert steps == [["config", "ok"], ["connect", "ok"], ["starttls", "ok"], ["tls", "ok"],
                     ["auth", "ok"], ["quit", "ok"]]
    assert "235 " in result.stdout and "certificate verified for 127.0.0.1" in result.stdout
    assert upstream.mail_commands == 0
    assert_no_secret(result.stdout + result.stderr)


def test_wrong_password_exits_77_naming_the_credentials(tmp_path: Path, upstream: Upstream,
                                                       ca_file: Path) -> None:
    upstream.password = "something-else"
    path = write_config(tmp_path, relay_config(tmp_path, upstream, ca_file))
    result = run_cli(path, "check")
    assert result.returncode == 77
    assert "auth      FAILED  535" in result.stdout
    assert "likely cause: credentials rejected" in result.stdout
    assert_no_secret(result.stdout + result.stderr)


@pytest.mark.plan(52)
def test_upstream_without_starttls_exits_69_and_never_sends_auth(
        tmp_path: Path, make_upstream, ca_file: Path) -> None:
    upstream = make_upstream(offer_starttls=False)
    path = write_config(tmp_path, relay_config(tmp_path, upstream, ca_file))
    result = run_cli(path, "check")
    assert result.returncode == 69
    assert "starttls  FAILED" in result.stdout and "does not offer STARTTLS" in result.stdout
    assert upstream.auth_attempts == 0


@pytest.mark.plan(54)
def test_untrusted_certificate_exits_69_with_a_hint(tmp_path: Path, upstream: Upstream) -> None:
    config = relay_config(tmp_path, upstream, None)
    del config["upstream"]["ca_file"]
    result = run_cli(write_config(tmp_path, config), "check")
    assert result.returncode == 69
    assert "certificate not trusted" in result.stdout
    assert upstream.auth_attempts == 0


def test_unreachable_upstream_exits_69(tmp_path: Path, upstream: Upstream,
                                       ca_file: Path) -> None:
    upstream.stop()
    path = write_config(tmp_path, relay_config(tmp_path, upstream, ca_file))
    result = run_cli(path, "check")
    assert result.returncode == 69
    assert "connect   FAILED" in result.stdout and "cannot reach 127.0.0.1" in result.stdout


def test_bad_config_exits_78(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("upstream: {host: smtp.mailgun.org, tls: maybe}\n")
    result = run_cli(path, "check")
    assert result.returncode == 78
    assert "upstream.tls" in result.stderr


def test_no_upstream_configured_exits_78(tmp_path: Path) -> None:
    path = write_config(tmp_path, relay_config(tmp_path, None, None))
    result = run_cli(path, "check")
    assert result.returncode == 78
    assert "no upstream section" in result.stdout


def api_only(tmp_path: Path, mailgun: MailgunStandIn, ca_file: Path, **keys: Any) -> Path:
    config = relay_config(tmp_path, None, None)
    config["upstreams"] = [mailgun.upstream_entry(ca_file, **keys)]
    return write_config(tmp_path, config)


def test_api_upstream_is_checked_by_getting_its_domain(tmp_path: Path, mailgun: MailgunStandIn,
                                                       ca_file: Path) -> None:
    """An authenticated GET of the domain, under a line naming the upstream; exit 0."""
    result = run_cli(api_only(tmp_path, mailgun, ca_file), "check")
    assert result.returncode == 0, result.stdout
    lines = [line for line in result.stdout.splitlines() if line]
    assert lines[1] == f"upstream  mailgun-api (mailgun-api {mailgun.url}, domain {DOMAIN})"
    assert lines[2] == f"domain    ok      200 {DOMAIN}, state active"
    assert mailgun.requests == [("GET", f"/v3/domains/{DOMAIN}")] and mailgun.received == []


@pytest.mark.parametrize("keys, cause", [
    ({"api_key_env": "OTHER_KEY"}, "the API key was refused"),
    ({"domain": "unknown.example.com"}, "Mailgun does not know the domain unknown.example.com"),
])
def test_api_refusing_the_key_or_domain_exits_77(tmp_path: Path, mailgun: MailgunStandIn,
                                                 ca_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                 keys: dict[str, str], cause: str) -> None:
    """401 means a bad key and 404 an unknown domain: both exit 77 with a hint."""
    monkeypatch.setenv("OTHER_KEY", "key-wrong-Secret-99")
    result = run_cli(api_only(tmp_path, mailgun, ca_file, **keys), "check")
    assert result.returncode == 77
    assert "domain    FAILED  " in result.stdout and f"likely cause: {cause}" in result.stdout
    assert API_KEY not in result.stdout + result.stderr
    assert "key-wrong-Secret-99" not in result.stdout + result.stderr


def test_every_upstream_gets_a_block_and_the_worst_status(tmp_path: Path, upstream: Upstream,
                                                          mailgun: MailgunStandIn,
                                                          ca_file: Path) -> None:
    """A working SMTP upstream and an unreachable API: both checked in order, exit 69."""
    config = relay_config(tmp_path, upstream, ca_file)
    smtp = {**config.pop("upstream"), "name": "smtp-first"}
    mailgun.close()
    config["upstreams"] = [smtp, mailgun.upstream_entry(ca_file)]
    result = run_cli(write_config(tmp_path, config), "check")
    assert result.returncode == 69
    blocks = result.stdout.split("\n\n")
    assert blocks[1].startswith("upstream  smtp-first (smtp 127.0.0.1:")
    assert [line.split()[:2] for line in blocks[1].splitlines()[1:]] == [
        ["connect", "ok"], ["starttls", "ok"], ["tls", "ok"], ["auth", "ok"], ["quit", "ok"]]
    assert blocks[2].startswith("upstream  mailgun-api (mailgun-api")
    assert "domain    FAILED  " in blocks[2] and "likely cause: cannot reach" in blocks[2]
    assert_no_secret(result.stdout + result.stderr)


def test_refused_credentials_outrank_an_unreachable_upstream(
        tmp_path: Path, upstream: Upstream, mailgun: MailgunStandIn, ca_file: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The worst status wins: an SMTP upstream down (69) and an API key refused (77): 77."""
    config = relay_config(tmp_path, upstream, ca_file)
    smtp = config.pop("upstream")
    upstream.stop()
    config["upstreams"] = [smtp, mailgun.upstream_entry(ca_file, api_key_env="OTHER_KEY")]
    monkeypatch.setenv("OTHER_KEY", "key-wrong-Secret-99")
    result = run_cli(write_config(tmp_path, config), "check")
    assert result.returncode == 77
    assert "connect   FAILED" in result.stdout and "domain    FAILED  401" in result.stdout


@pytest.fixture
def silent_server() -> Iterator[BabblingServer]:
    """Accepts connections and says nothing, as a port that expects a TLS handshake first
    (465) does to a client that waits for a greeting."""
    server = BabblingServer(b"", greeting=b"").start()
    yield server
    server.close()


def silent_upstream_config(tmp_path: Path, port: int) -> dict:
    config = relay_config(tmp_path, None, None)
    config["upstream"] = {"host": "127.0.0.1", "port": port, "tls": "starttls",
                          "timeout": "60s", "greeting_timeout": "1s"}
    return config


@pytest.mark.plan(117)
def test_a_silent_port_fails_check_at_the_greeting_timeout_with_a_tls_hint(
        tmp_path: Path, silent_server: BabblingServer) -> None:
    """No greeting within greeting_timeout (1 s here), not the 60 s command timeout:
    connect FAILED, naming the timeout and that the port probably wants implicit TLS."""
    path = write_config(tmp_path, silent_upstream_config(tmp_path, silent_server.port))
    result = run_cli(path, "check")  # bounded at 60 s: the command timeout would overrun it
    assert result.returncode == 69
    assert "connect   FAILED  timed out: no greeting within 1s" in result.stdout
    assert "likely cause: the port probably speaks TLS from the first byte" in result.stdout
    assert "tls: implicit" in result.stdout


def test_implicit_tls_against_a_plain_text_port_fails_check_with_the_starttls_hint(
        tmp_path: Path, upstream: Upstream, ca_file: Path) -> None:
    """tls: implicit against a port that greets in plain text (as 587 does): the
    handshake fails at once, and the hint says to use tls: starttls."""
    config = relay_config(tmp_path, upstream, ca_file)
    config["upstream"]["tls"] = "implicit"
    result = run_cli(write_config(tmp_path, config), "check")
    assert result.returncode == 69, result.stdout + result.stderr
    assert "does not speak TLS from the start: use tls: starttls" in result.stdout


@pytest.mark.plan(117)
def test_a_silent_port_defers_delivery_with_the_hint(
        tmp_path: Path, make_relay, silent_server: BabblingServer) -> None:
    """Delivery to the same port is deferred after the greeting timeout, and the reply
    kept for the entry carries the hint."""
    relay = make_relay(silent_upstream_config(tmp_path, silent_server.port))
    entry_id = relay.send("app@example.com", ["user@example.com"], b"Subject: x\r\n\r\nx\r\n")
    wait_for(lambda: relay.state(entry_id).get("last_error"), what="the deferral")
    last_error = relay.state(entry_id)["last_error"]
    assert last_error.startswith("timed out: no greeting within 1s")
    assert "tls: implicit" in last_error


@pytest.mark.plan(111)
def test_a_ca_file_without_a_certificate_exits_78_naming_the_key(
        tmp_path: Path, upstream: Upstream) -> None:
    """ca_file exists but is not PEM: a configuration error (78) naming upstream.ca_file,
    from `relay check` as from `relay serve`, before anything connects."""
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("this is not a certificate\n")
    path = write_config(tmp_path, relay_config(tmp_path, upstream, bad))
    for command in ("check", "serve"):
        result = run_cli(path, command)
        assert result.returncode == 78, (command, result.stderr)
        assert "configuration error: upstream.ca_file:" in result.stderr
    assert upstream.connections == 0
