"""The `upstreams:` list and the single `upstream:`: parsing, defaults and errors by index."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import MailgunApiConfig, Rate, UpstreamConfig, parse_config
from relay.errors import ConfigError
from relay.upstreamconfig import parse_rate

ISSUE_EXAMPLE = """
upstreams:
  - name: mailgun-us
    host: smtp.mailgun.org
    port: 587
    tls: starttls
    username: postmaster@mg.example.com
    password_env: MG_PASSWORD
    sender_domains: [mg.example.com]
    rate: 300/h
  - name: mailgun-api
    transport: mailgun-api
    api_url: https://api.eu.mailgun.net
    domain: mg.example.com
    api_key_env: MG_API_KEY
    verify: true
    ca_file: null
"""
SECRETS = {"MG_PASSWORD": "smtp-Secret-1", "MG_API_KEY": "key-Api-Secret-2"}
API = "transport: mailgun-api, domain: mg.example.com, api_key_env: MG_API_KEY"


def error_for(text: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SECRETS if environ is None else environ)
    return info.value


def test_the_issues_example_gives_two_upstreams_in_order() -> None:
    """Every key of the contract's example is read into the upstream it belongs to."""
    smtp, api = parse_config(ISSUE_EXAMPLE, SECRETS).upstreams
    assert isinstance(smtp, UpstreamConfig) and isinstance(api, MailgunApiConfig)
    assert (smtp.name, smtp.host, smtp.port, smtp.tls) == ("mailgun-us", "smtp.mailgun.org",
                                                           587, "starttls")
    assert (smtp.username, smtp.password) == ("postmaster@mg.example.com", "smtp-Secret-1")
    assert smtp.sender_domains == ("mg.example.com",) and smtp.rate == Rate(300, 3600.0)
    assert (api.name, api.api_url, api.domain, api.api_key) == (
        "mailgun-api", "https://api.eu.mailgun.net", "mg.example.com", "key-Api-Secret-2")
    assert api.verify and api.ca_file is None and api.sender_domains == () and api.rate is None
    assert api.address == "api.eu.mailgun.net:443"


def test_single_upstream_section_is_a_list_of_one_named_host_port() -> None:
    """The old `upstream:` section still works, named as relay= showed it before."""
    config = parse_config("upstream: {host: smtp.mailgun.org}", {})
    assert len(config.upstreams) == 1
    assert config.upstream is config.upstreams[0]
    assert config.upstream.name == "smtp.mailgun.org:587"


@pytest.mark.parametrize("text, first_smtp", [
    (f"upstreams: [{{{API}}}, {{host: b.example}}, {{host: c.example}}]", "b.example"),
    (f"upstreams: [{{{API}}}]", None),
    ("{}", None),
])
def test_config_upstream_is_the_first_smtp_upstream(text: str, first_smtp: str | None) -> None:
    """What delivery uses until routing is wired in: the first SMTP upstream, or None."""
    upstream = parse_config(text, SECRETS).upstream
    assert (upstream.host if upstream else None) == first_smtp


def test_api_upstream_defaults() -> None:
    """api_url defaults to Mailgun's US endpoint; the name to mailgun-api/DOMAIN."""
    [api] = parse_config(f"upstreams: [{{{API}}}]", SECRETS).upstreams
    assert isinstance(api, MailgunApiConfig)
    assert api.api_url == "https://api.mailgun.net"
    assert api.name == "mailgun-api/mg.example.com"
    assert (api.connections, api.timeout, api.verify) == (4, 60.0, True)


@pytest.mark.parametrize("text, rate", [
    ("300/h", Rate(300, 3600.0)), ("10/s", Rate(10, 1.0)), (" 5 / m ", Rate(5, 60.0)),
    ("1000/d", Rate(1000, 86400.0)),
])
def test_rates(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("domains, expected", [
    ("[MG.Example.COM]", ("mg.example.com",)),
    ("mg.example.com.", ("mg.example.com",)),
    ("[bücher.example, a.example, A.example]", ("xn--bcher-kva.example", "a.example")),
])
def test_sender_domains_are_compared_in_one_form(domains: str, expected: tuple[str, ...]) -> None:
    """Lower case, no trailing dot, A-labels, each once: as routing compares senders."""
    [upstream] = parse_config(f"upstreams: [{{host: h.example, sender_domains: {domains}}}]",
                              {}).upstreams
    assert upstream.sender_domains == expected


@pytest.mark.parametrize("text, key, fragment", [
    ("upstream: {host: a.example}\nupstreams: [{host: b.example}]", "upstreams", "not both"),
    ("upstreams: []", "upstreams", "one or more"),
    ("upstreams: {host: a.example}", "upstreams", "expected a list"),
    ("upstreams: [a.example]", "upstreams[0]", "expected a mapping"),
    ("upstreams: [{host: a.example}, {hots: b.example}]", "upstreams[1].hots",
     "did you mean 'host'"),
    ("upstreams: [{host: a.example}, {host: b.example, transport: ses}]",
     "upstreams[1].transport", "smtp | mailgun-api"),
    ("upstreams: [{host: a.example}, {transport: mailgun-api, api_key_env: MG_API_KEY}]",
     "upstreams[1].domain", "required for transport mailgun-api"),
    ("upstreams: [{transport: mailgun-api, domain: mg.example.com}]",
     "upstreams[0].api_key_env", "required"),
    ("upstreams: [{transport: mailgun-api, domain: mg.example.com, api_key: k}]",
     "upstreams[0].api_key", "never go in the config file"),
    ("upstreams: [{transport: mailgun-api, domain: 10.0.0.1, api_key_env: MG_API_KEY}]",
     "upstreams[0].domain", "domain name"),
    ("upstreams: [{name: a, host: a.example}, {name: a, host: b.example}]",
     "upstreams[1].name", "'a' is the name of upstreams[0] too"),
    ("upstreams: [{host: a.example, username: u, password_env: MG_PASSWORD}, {host: a.example}]",
     "upstreams[1].name", "defaults to a.example:587"),
    ("upstreams: [{name: my relay, host: a.example}]", "upstreams[0].name", "letters, digits"),
    ("upstreams: [{host: a.example, rate: 300/hour}]", "upstreams[0].rate", "like 300/h"),
    ("upstreams: [{host: a.example, rate: 300}]", "upstreams[0].rate", "like 300/h"),
    ("upstreams: [{host: a.example, rate: 0/s}]", "upstreams[0].rate", "1-1000000"),
    ("upstreams: [{host: a.example, sender_domains: []}]", "upstreams[0].sender_domains",
     "leave the key out"),
    ("upstreams: [{host: a.example, sender_domains: [127.0.0.1]}]",
     "upstreams[0].sender_domains", "domain name"),
    (f"upstreams: [{{{API}, host: smtp.mailgun.org}}]", "upstreams[0].host",
     "not a key of a mailgun-api upstream"),
    (f"upstreams: [{{{API}, password_env: MG_PASSWORD}}]", "upstreams[0].password_env",
     "the API takes api_url, domain"),
    ("upstreams: [{host: a.example, domain: mg.example.com}]", "upstreams[0].domain",
     "belongs to transport: mailgun-api"),
    ("upstreams: [{host: a.example, api_key_env: MG_API_KEY}]", "upstreams[0].api_key_env",
     "belongs to transport: mailgun-api"),
    (f"upstreams: [{{{API}, api_url: 'http://api.mailgun.net'}}]", "upstreams[0].api_url",
     "https://"),
    (f"upstreams: [{{{API}, api_url: 'https://api:key@api.mailgun.net'}}]",
     "upstreams[0].api_url", "no credentials"),
    (f"upstreams: [{{{API}, api_url: 'https://api.mailgun.net:44x'}}]", "upstreams[0].api_url",
     "https://"),
    ("upstreams: [{transport: mailgun-api, domain: mg.example.com, api_key_env: NOPE}]",
     "upstreams[0].api_key_env", "NOPE is not set"),
    ("upstream: {host: a.example, transport: mailgun-api}", "upstream.host",
     "not a key of a mailgun-api upstream"),
])
def test_bad_upstreams_name_the_key_with_its_index(text: str, key: str, fragment: str) -> None:
    """Each mistake is reported at its dotted key, the list index included."""
    error = error_for(text)
    assert error.key == key
    assert fragment in error.message


def test_api_key_comes_from_a_file_and_stays_out_of_repr(tmp_path: Path) -> None:
    """api_key_file is read (one trailing newline dropped); the key is in no repr."""
    (tmp_path / "key").write_text("key-From-File-3\n")
    config = parse_config(f"upstreams: [{{transport: mailgun-api, domain: mg.example.com, "
                          f"api_key_file: {tmp_path / 'key'}}}]", {})
    [api] = config.upstreams
    assert isinstance(api, MailgunApiConfig) and api.api_key == "key-From-File-3"
    assert "From-File" not in repr(config)


def test_no_secret_appears_in_the_configs_repr() -> None:
    assert not any(secret in repr(parse_config(ISSUE_EXAMPLE, SECRETS))
                   for secret in SECRETS.values())


def test_commands_without_the_upstream_need_no_api_key() -> None:
    """secrets=False checks the keys but reads no API key, so `relay queue` runs without."""
    [api] = parse_config(ISSUE_EXAMPLE, {}, secrets=False).upstreams[1:]
    assert isinstance(api, MailgunApiConfig) and api.api_key is None


def test_api_transport_without_httpx_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without httpx the API upstream is a config error that says which extra to install."""
    monkeypatch.setitem(sys.modules, "httpx", None)
    error = error_for(ISSUE_EXAMPLE)
    assert error.key == "upstreams[1].transport"
    assert "pip install 'relay[mailgun-api]'" in error.message


def test_relay_exits_78_when_the_api_transport_lacks_httpx(tmp_path: Path) -> None:
    """The command line turns the missing extra into exit 78, naming the key and the fix."""
    path = tmp_path / "relay.yaml"
    path.write_text(ISSUE_EXAMPLE)
    hide_httpx = ("import sys; sys.modules['httpx'] = None; from relay.cli import main; "
                  f"sys.exit(main(['check', '--config', {str(path)!r}]))")
    result = subprocess.run([sys.executable, "-c", hide_httpx], capture_output=True, text=True,
                            timeout=30, env={"MG_PASSWORD": "x", "MG_API_KEY": "y"}, check=False)
    assert result.returncode == 78
    assert "upstreams[1].transport" in result.stderr and "relay[mailgun-api]" in result.stderr


def test_the_examples_commented_api_upstream_is_valid_once_uncommented() -> None:
    """relay.example.yaml's second upstream, uncommented, is the API transport it claims."""
    example = (Path(__file__).resolve().parent.parent / "relay.example.yaml").read_text()
    text = re.sub(r"^  # ( *-? ?[a-z_]+:)", r"  \1", example, flags=re.MULTILINE)
    config = parse_config(text, {"RELAY_UPSTREAM_PASSWORD": "pw", "RELAY_MAILGUN_API_KEY": "k"})
    smtp, api = config.upstreams
    assert isinstance(smtp, UpstreamConfig) and isinstance(api, MailgunApiConfig)
    assert (smtp.name, smtp.sender_domains, smtp.rate) == ("mailgun-us", (), None)
    assert (api.name, api.domain, api.api_key) == ("mailgun-api", "mg.example.com", "k")
    for key in ("name", "transport", "sender_domains", "rate", "api_url", "domain",
                "api_key_env", "api_key_file"):
        assert f"{key}:" in example, key
