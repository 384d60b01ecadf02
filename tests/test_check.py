"""`relay check`: config, connect, TLS and AUTH against real upstreams, sending nothing."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from conftest import relay_config, run_cli
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
