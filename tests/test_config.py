"""Configuration: defaults, lookup order, units, and errors that name the key."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import (
    Config,
    UpstreamConfig,
    find_config_file,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from relay.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def error_for(text: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ or {})
    return info.value


def test_builtin_defaults_are_safe_for_development(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """No file found: loopback 127.0.0.1:2525, ./spool, no upstream."""
    monkeypatch.setattr("relay.config.SEARCH_PATH", (tmp_path / "relay.yaml",))
    config = load_config(None, environ={})
    assert config == Config()
    assert (config.listen.address, config.listen.port) == ("127.0.0.1", 2525)
    assert config.spool.path == Path("spool")
    assert config.upstream is None
    assert ipaddress.ip_address("127.0.0.1") in config.listen.allow[0]


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--config beats $RELAY_CONFIG beats ./relay.yaml."""
    monkeypatch.chdir(tmp_path)
    assert find_config_file(None, {}) in (None, Path("/etc/relay/relay.yaml"))
    (tmp_path / "relay.yaml").write_text("{}")
    assert find_config_file(None, {}) == Path("relay.yaml")
    assert find_config_file(None, {"RELAY_CONFIG": "/x.yaml"}) == Path("/x.yaml")
    assert find_config_file("/y.yaml", {"RELAY_CONFIG": "/x.yaml"}) == Path("/y.yaml")


@pytest.mark.parametrize("text, seconds", [
    (30, 30.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("5d", 432000.0),
    ("200ms", 0.2), ("1.5h", 5400.0)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, size", [
    (1000, 1000), ("512KiB", 524288), ("25MiB", 26214400), ("1GiB", 2**30), ("10MB", 10**7)])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.plan(2, 81)
@pytest.mark.parametrize("text, key, fragment", [
    ("listen: {port: 587x}", "listen.port", "expected an integer 0-65535"),
    ("listen: {prot: 25}", "listen.prot", "did you mean 'port'"),
    ("lisen: {}", "lisen", "did you mean 'listen'"),
    ("listen: {timeout: soon}", "listen.timeout", "expected a duration"),
    ("listen: {max_message_size: big}", "listen.max_message_size", "expected a size"),
    ("listen: {address: 0.0.0.0}", "listen.address", "add listen.allow"),
    ("listen: {allow: [not-a-net]}", "listen.allow", "not an IP network"),
    ("upstream: {port: 587}", "upstream.host", "required"),
    ("upstream: {host: smtp.mailgun.org, tls: maybe}", "upstream.tls", "starttls | implicit"),
    ("upstream: {host: smtp.mailgun.org, tls: none}", "upstream.tls", "loopback"),
    ("upstream: {host: h.example, password: x}", "upstream.password", "never go in the config"),
    ("upstream: {host: h.example, username: u, password_env: NOPE}", "upstream.password_env",
     "NOPE is not set"),
    ("upstream: {host: h.example, username: u}", "upstream.username", "password_env"),
    ("upstream: {host: h.example, verify: yes please}", "upstream.verify", "true or false"),
    ("delivery: {retry_min: 1h, retry_max: 1m}", "delivery.retry_max", "retry_min"),
    ("log: {level: loud}", "log.level", "debug | info"),
    ("log: {redact_addresses: maybe}", "log.redact_addresses", "true or false"),
    ("delivery: {max_schedule: later}", "delivery.max_schedule", "expected a duration"),
    ("delivery: {max_schedule: 0}", "delivery.max_schedule", "at least 1s"),
    ("delivery: {max_schedule: 40000d}", "delivery.max_schedule", "at most 999999999"),
    ("history: {enabled: 1}", "history.enabled", "true or false"),
    ("history: {keep: 12h}", "history.keep", "at least 86400s"),
    ("history: {kept: 30d}", "history.kept", "did you mean 'keep'"),
    ("listen: [1, 2]", "listen", "expected a mapping"),
    ("metrics: {port: 99999}", "metrics.port", "expected an integer 0-65535"),
    ("metrics: {address: 0.0.0.0, port: 9465}", "metrics.address", "add metrics.allow"),
    ("metrics: {allow: [nowhere]}", "metrics.allow", "not an IP network"),
    ("bounces: {notify: everyone}", "bounces.notify", "none, sender or an address"),
    ("bounces: {notify: 'ops@'}", "bounces.notify", "not a valid address"),
    ("bounces: {from: '<x@example.com>'}", "bounces.from", "bare address"),
    ("bounces: {max_per_hour: 0}", "bounces.max_per_hour", "expected an integer 1-"),
    (("bounces: {notify: sender}\nupstreams: [{name: a, host: h.example, "
      "sender_domains: [mg.example.com]}]"), "bounces.notify", "without sender_domains"),
])
def test_bad_values_name_the_key(text: str, key: str, fragment: str) -> None:
    """Every bad key or value is reported with its dotted key and a hint."""
    error = error_for(text)
    assert error.key == key
    assert fragment in error.message


def test_metrics_and_bounces_are_off_by_default() -> None:
    """No metrics endpoint and no notices unless asked for; loopback when turned on."""
    config = parse_config("metrics: {port: 9465}", {})
    assert Config().metrics.port is None and Config().bounces.notify == "none"
    assert (config.metrics.address, config.metrics.port) == ("127.0.0.1", 9465)
    assert config.metrics.allow == Config().listen.allow


def test_bounces_need_an_upstream_that_carries_the_null_sender() -> None:
    """Notices (from <>) with every upstream limited to sender domains are refused above;
    one upstream without sender_domains carries them, and without bounces none is needed."""
    routed = "{name: a, host: h.example, sender_domains: [mg.example.com]}"
    assert parse_config(f"bounces: {{notify: sender}}\nupstreams: [{routed}, "
                        "{name: b, host: h2.example}]", {}).bounces.notify == "sender"
    assert len(parse_config(f"upstreams: [{routed}]", {}).upstreams) == 1


def test_bounces_notify_takes_sender_or_an_address() -> None:
    """notify: sender, or an address, kept as given; from and max_per_hour with it."""
    assert parse_config("bounces: {notify: Sender}", {}).bounces.notify == "sender"
    config = parse_config("bounces: {notify: ops@example.com, from: relay@example.com, "
                          "max_per_hour: 3}", {})
    assert config.bounces.notify == "ops@example.com"
    assert config.bounces.from_address == "relay@example.com"
    assert config.bounces.max_per_hour == 3


def test_schedule_history_and_redaction_defaults() -> None:
    """max_schedule 30 days; history kept 30 days and on; addresses shown in full."""
    config = parse_config("{}", {})
    assert config.delivery.max_schedule == 30 * 86400
    assert config.history.enabled and config.history.keep == 30 * 86400
    assert not config.log.redact_addresses
    set_ = parse_config("delivery: {max_schedule: 7d}\nhistory: {enabled: false, keep: 90d}\n"
                        "log: {redact_addresses: true}", {})
    assert set_.delivery.max_schedule == 7 * 86400 and set_.history.keep == 90 * 86400
    assert not set_.history.enabled and set_.log.redact_addresses


@pytest.mark.plan(116)
@pytest.mark.parametrize("text, key, hint", [
    ("upstream: {host: h.example, usrname: u, password_env: P}", "upstream.usrname",
     "did you mean 'username'"),
    ("upstream: {host: h.example, username: u, pasword_file: /p}", "upstream.pasword_file",
     "did you mean 'password_file'"),
    ("listen: {address: 10.0.0.1, alow: [10.0.0.0/8]}", "listen.alow", "did you mean 'allow'"),
    ("delivery: {retry_min: 1h, retry_mx: 2h}", "delivery.retry_mx", "did you mean 'retry_max'"),
])
def test_a_misspelt_optional_key_is_reported_as_unknown_with_a_suggestion(
        text: str, key: str, hint: str) -> None:
    """The typo is named, with the key meant, before any rule it then breaks (a username
    without password, a non-loopback address without allow, retry_max below retry_min)."""
    error = error_for(text, {"P": "secret"})
    assert (error.key, error.message) == (key, f"unknown key ({hint}?)")


def test_greeting_timeout_defaults_to_15s_or_the_command_timeout_if_shorter() -> None:
    """upstream.greeting_timeout: 15 s unless set, never longer than an unset-but-shorter
    upstream.timeout; set, it stands on its own."""
    def upstream(extra: str) -> UpstreamConfig:
        config = parse_config("upstream: {host: h.example" + extra + "}", {})
        assert config.upstream is not None
        return config.upstream
    assert (upstream("").timeout, upstream("").greeting_timeout) == (60.0, 15.0)
    assert upstream(", timeout: 5s").greeting_timeout == 5.0
    assert upstream(", timeout: 5s, greeting_timeout: 30s").greeting_timeout == 30.0


def test_port_error_message_shows_the_bad_value() -> None:
    error = error_for('upstream: {host: h.example, port: "587x"}')
    assert str(error) == "upstream.port: expected an integer 1-65535, got '587x'"


@pytest.mark.plan(96)
def test_yaml_tags_never_construct_objects() -> None:
    """safe_load only: a python/object tag is a YAML error, not code execution."""
    error = error_for("listen: !!python/object/apply:os.system ['true']")
    assert "invalid YAML" in error.message


@pytest.mark.plan(93)
def test_password_comes_from_env_or_file_and_stays_out_of_repr(tmp_path: Path) -> None:
    """password_env and password_file both work; the password is never in a repr."""
    from_env = parse_config("upstream: {host: h.example, username: u, password_env: P}",
                            {"P": "hunter2-secret"})
    assert from_env.upstream is not None and from_env.upstream.password == "hunter2-secret"
    assert "hunter2" not in repr(from_env)
    secret = tmp_path / "password"
    secret.write_text("file-secret\n")
    from_file = parse_config(f"upstream: {{host: h.example, username: u, "
                             f"password_file: {secret}}}", {})
    assert from_file.upstream is not None and from_file.upstream.password == "file-secret"


def test_password_file_expands_the_systemd_credentials_directory(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """password_file: ${CREDENTIALS_DIRECTORY}/name reads systemd's LoadCredential= file."""
    (tmp_path / "relay-password").write_text("from-systemd")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    config = parse_config("upstream: {host: h.example, username: u, "
                          "password_file: '${CREDENTIALS_DIRECTORY}/relay-password'}", {})
    assert config.upstream is not None and config.upstream.password == "from-systemd"


def test_queue_commands_need_no_password() -> None:
    """secrets=False validates the keys but leaves the password unread."""
    text = "upstream: {host: h.example, username: u, password_env: UNSET_VARIABLE}"
    assert parse_config(text, {}, secrets=False).upstream.password is None  # type: ignore[union-attr]
    assert error_for(text).key == "upstream.password_env"


def test_example_config_loads_with_every_key() -> None:
    """relay.example.yaml is valid, and sets every key of the contract."""
    secret = {"RELAY_UPSTREAM_PASSWORD": "example"}
    text = (ROOT / "relay.example.yaml").read_text()
    config = parse_config(text, secret)
    assert config.upstream is not None
    assert (config.upstream.host, config.upstream.port) == ("smtp.mailgun.org", 587)
    assert config.upstream.tls == "starttls" and config.upstream.verify
    assert config.metrics.port == 9465  # production turns the endpoint on
    for key in ("address", "port", "max_message_size", "max_recipients", "max_connections",
                "timeout", "allow", "path", "min_free", "host", "tls", "verify", "ca_file",
                "username", "password_env", "connections", "retry_min", "retry_max", "max_age",
                "max_attempts", "max_schedule", "level", "format", "redact_addresses", "sender",
                "notify", "from", "max_per_hour", "enabled", "keep", "hostname", "aliases",
                "sender_domains", "default_sender", "redirect_to"):
        assert f"{key}:" in text, key


@pytest.mark.plan(81)
def test_bad_config_exits_78_before_opening_a_port(tmp_path: Path) -> None:
    """`relay serve` with a bad config exits 78 naming the key, and never listens."""
    bad = tmp_path / "relay.yaml"
    bad.write_text("listen: {port: 2525, colour: blue}\n")
    result = subprocess.run([sys.executable, "-m", "relay", "serve", "--config", str(bad)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert "listen.colour: unknown key" in result.stderr
    assert "listening" not in result.stderr


@pytest.mark.plan(81)
def test_missing_config_file_exits_78(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "relay", "serve", "--config",
                             str(tmp_path / "nope.yaml")], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 78
    assert "cannot read config file" in result.stderr


def test_unknown_command_is_a_usage_error() -> None:
    result = subprocess.run([sys.executable, "-m", "relay", "frobnicate"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 64


@pytest.mark.plan(32)
def test_unusable_spool_exits_69_before_opening_a_port(tmp_path: Path) -> None:
    """A spool path that cannot be a directory: a clear error, exit 69, nothing listening."""
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "relay.yaml"
    path.write_text(f"spool: {{path: {tmp_path / 'a-file' / 'spool'}}}\nlisten: {{port: 0}}\n")
    result = subprocess.run([sys.executable, "-m", "relay", "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 69
    assert "cannot use spool directory" in result.stderr and "a-file" in result.stderr
    assert "listening" not in result.stderr


def test_addresses_section_as_the_issue_writes_it() -> None:
    """hostname, aliases with "*" and lists, sender_domains, default_sender, redirect_to."""
    config = parse_config("""
addresses:
  hostname: VM.Example.com
  aliases:
    Root: ops@example.com
    www-data: [root, web@example.com]
    "*": ops@example.com
  sender_domains: [MG.example.com]
  default_sender: noreply@mg.example.com
  redirect_to: staging@example.com
""", {}).addresses
    assert config.hostname == "vm.example.com"
    assert config.aliases == {"root": ("ops@example.com",),
                              "www-data": ("root", "web@example.com"),
                              "*": ("ops@example.com",)}
    assert config.sender_domains == ("mg.example.com",)
    assert (config.default_sender, config.redirect_to) == ("noreply@mg.example.com",
                                                           "staging@example.com")


@pytest.mark.parametrize("text, key, fragment", [
    ("addresses: {hostname: 10.0.0.1}", "addresses.hostname", "expected a host name"),
    ("addresses: {hostname: vm.local}", "addresses.hostname", "cannot be used in an address"),
    ("addresses: {aliases: [root]}", "addresses.aliases", "expected a mapping"),
    ("addresses: {aliases: {root: }}", "addresses.aliases.root", "expected an address"),
    ("addresses: {aliases: {root: 'a@@x.org'}}", "addresses.aliases.root", "not a valid address"),
    ("addresses: {aliases: {yes: a@x.org}}", "addresses.aliases.True", "quote it"),
    ("addresses: {aliases: {r@x: a@x.org}}", "addresses.aliases.r@x", "not a local name"),
    ("addresses: {aliases: {root: a@x.org, ROOT: b@x.org}}", "addresses.aliases.ROOT",
     "listed twice"),
    ("addresses: {aliases: {root: admin}}", "addresses.aliases.root", 'no entry for admin'),
    ("addresses: {aliases: {a: b, b: [x@y.org, a]}}", "addresses.aliases.a",
     "alias loop: a -> b -> a"),
    ("addresses: {aliases: {'*': nobody}}", "addresses.aliases.*", "alias loop"),
    ("addresses: {hostname: vm.example.com, aliases: {root: root@vm.example.com}}",
     "addresses.aliases.root", "alias loop: root -> root"),
    ("addresses: {sender_domains: [mg.example.com, 'bad domain']}",
     "addresses.sender_domains", "expected a host name"),
    ("addresses: {default_sender: noreply@mg.example.com}", "addresses.default_sender",
     "sender_domains, which is empty"),
    ("addresses: {sender_domains: [mg.example.com], default_sender: noreply@example.com}",
     "addresses.default_sender", "not in one of addresses.sender_domains"),
    ("addresses: {redirect_to: root}", "addresses.redirect_to", "expected an address"),
    ("addresses: {redirect_to: j\u00fcrgen@example.com}", "addresses.redirect_to",
     "not an ASCII address"),
    ("addresses: {redirect: a@x.org}", "addresses.redirect", "did you mean 'redirect_to'"),
])
def test_addresses_errors_name_the_key(text: str, key: str, fragment: str) -> None:
    error = error_for(text)
    assert error.key == key
    assert fragment in error.message
