"""The upstreams of the configuration: the `upstreams:` list, or the single `upstream:`.

Each upstream is an SMTP server (UpstreamConfig) or Mailgun's HTTP API
(MailgunApiConfig), tried in the order given. The single `upstream:` section is read as
a list of one. Errors name the key with the upstream's index (`upstreams[1].domain`).
Reads the password or API key (from an environment variable or a file) and nothing else;
for the API transport it only looks whether httpx is installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from .configvalues import (
    NO_DOMAINS,
    Section,
    boolean,
    canonical_domain,
    choice,
    describe,
    duration_at_least,
    existing_file,
    hostname,
    int_range,
    is_loopback_host,
    nonempty_text,
)
from .errors import ConfigError

TLS_MODES = ("starttls", "implicit", "none")
TRANSPORTS = ("smtp", "mailgun-api")
MAILGUN_EXTRA = "pip install 'relay[mailgun-api]'"
# An upstream's defaults, written once for the dataclasses and the parser.
SUBMISSION_PORT = 587  # RFC 6409: STARTTLS, and plain text on a loopback upstream
SUBMISSIONS_PORT = 465  # RFC 8314: TLS from the first byte (tls: implicit)
DEFAULT_TLS = "starttls"
VERIFY = True  # the server's certificate, against the system's CAs and ca_file
CONNECTIONS = 4
TIMEOUT = 60.0
GREETING_TIMEOUT = 15.0  # upstream.greeting_timeout unless upstream.timeout is shorter
DEFAULT_API_URL = "https://api.mailgun.net"
# Keys of one transport that mean nothing to the other: a mistake worth naming, since a
# key the relay silently ignored would leave the operator believing it is in effect.
SMTP_KEYS = ("host", "port", "tls", "username", "password", "password_env", "password_file",
             "greeting_timeout")
API_KEYS = ("api_url", "domain", "api_key", "api_key_env", "api_key_file")
COMMON_KEYS = ("verify", "ca_file", "connections", "timeout", "sender_domains", "rate")
RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class Rate:
    """At most `count` messages per `per` seconds (`rate: 300/h`)."""

    count: int
    per: float


@dataclass(frozen=True)
class UpstreamConfig:
    """An SMTP upstream (transport: smtp)."""

    transport: ClassVar[str] = "smtp"
    host: str
    port: int = SUBMISSION_PORT
    tls: str = DEFAULT_TLS
    verify: bool = VERIFY
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    connections: int = CONNECTIONS
    timeout: float = TIMEOUT
    # For the connect and the greeting alone: a port that speaks the other TLS mode stays
    # silent, and should not cost every attempt the whole command timeout.
    greeting_timeout: float = GREETING_TIMEOUT
    name: str = ""  # how logs and the queue name it; empty: host:port, as Postfix's relay=
    sender_domains: tuple[str, ...] = ()  # carries mail only from these; empty: from any
    rate: Rate | None = None

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.address)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class MailgunApiConfig:
    """Mailgun's HTTP API (transport: mailgun-api): POST {api_url}/v3/{domain}/messages.mime."""

    transport: ClassVar[str] = "mailgun-api"
    domain: str
    api_key: str | None = field(default=None, repr=False)
    api_url: str = DEFAULT_API_URL
    verify: bool = VERIFY
    ca_file: Path | None = None
    connections: int = CONNECTIONS
    timeout: float = TIMEOUT
    name: str = ""  # empty: mailgun-api/DOMAIN
    sender_domains: tuple[str, ...] = ()
    rate: Rate | None = None

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", f"mailgun-api/{self.domain}")

    @property
    def address(self) -> str:
        """host:port of the API, as logs show an SMTP upstream's."""
        parts = urlsplit(self.api_url)
        return f"{parts.hostname}:{parts.port or 443}"


AnyUpstream = UpstreamConfig | MailgunApiConfig


def parse_upstreams(root: Section, environ: Mapping[str, str],
                    secrets: bool) -> tuple[AnyUpstream, ...]:
    """The `upstreams:` list, or `upstream:` as a list of one, or () when neither is set."""
    single = root.child("upstream", optional=True)
    listed = root.sections("upstreams")
    if single is not None and listed is not None:
        raise ConfigError("upstreams", "give either upstream (one) or upstreams (a list), "
                          "not both")
    sections = [single] if single is not None else listed or []
    upstreams = tuple(_upstream(s, environ, secrets) for s in sections)
    named: dict[str, Section] = {}
    for s, upstream in zip(sections, upstreams, strict=True):
        if upstream.name in named:
            how = "" if "name" in s.data else f" (its name defaults to {upstream.name})"
            raise ConfigError(s.key("name"), f"{upstream.name!r} is the name of "
                              f"{named[upstream.name].prefix} too{how}; give each upstream "
                              "a name of its own")
        named[upstream.name] = s
    return upstreams


def _upstream(s: Section, environ: Mapping[str, str], secrets: bool) -> AnyUpstream:
    # A misspelt key is named before any required key it leaves missing.
    s.only("transport", "name", *COMMON_KEYS, *SMTP_KEYS, *API_KEYS)
    transport = s.get("transport", choice(TRANSPORTS), "smtp")
    foreign = API_KEYS if transport == "smtp" else SMTP_KEYS
    hint = ("it belongs to transport: mailgun-api" if transport == "smtp"
            else "the API takes api_url, domain and api_key_env or api_key_file")
    for key in foreign:
        if key in s.data:
            raise ConfigError(s.key(key), f"not a key of a {transport} upstream; {hint}")
    common: dict[str, Any] = {
        "name": s.get("name", _name, ""),
        "verify": s.get("verify", boolean, VERIFY),
        "ca_file": s.get("ca_file", existing_file, None),
        "connections": s.get("connections", int_range(1, 100), CONNECTIONS),
        "timeout": s.get("timeout", duration_at_least(minimum=1), TIMEOUT),
        "sender_domains": s.get("sender_domains", _domains, NO_DOMAINS),
        "rate": s.get("rate", parse_rate, None),
    }
    config = (_smtp(s, environ, secrets, common) if transport == "smtp"
              else _mailgun_api(s, environ, secrets, common))
    return config


def _smtp(s: Section, environ: Mapping[str, str], secrets: bool,
          common: dict[str, Any]) -> UpstreamConfig:
    host = s.get("host", hostname, None)
    if host is None:
        raise ConfigError(s.key("host"), "required when the upstream section is present")
    tls = s.get("tls", choice(TLS_MODES), DEFAULT_TLS)
    if tls == "none" and not is_loopback_host(host):
        raise ConfigError(
            s.key("tls"), f"'none' sends mail and passwords in clear; it is allowed only for a "
            f"loopback upstream, not {host}"
        )
    default_port = SUBMISSIONS_PORT if tls == "implicit" else SUBMISSION_PORT
    username = s.get("username", nonempty_text, None)
    password = _secret(s, environ, secrets, "password", "passwords")
    has_password = "password_env" in s.data or "password_file" in s.data
    if username is not None and not has_password:
        raise ConfigError(s.key("username"), "needs password_env or password_file as well")
    if has_password and username is None:
        raise ConfigError(s.key("username"), "required with password_env or password_file")
    greeting_timeout = s.get("greeting_timeout", duration_at_least(minimum=1),
                             min(GREETING_TIMEOUT, common["timeout"]))
    return UpstreamConfig(host=host, port=s.get("port", int_range(1, 65535), default_port),
                          tls=tls, username=username, password=password,
                          greeting_timeout=greeting_timeout, **common)


def _mailgun_api(s: Section, environ: Mapping[str, str], secrets: bool,
                 common: dict[str, Any]) -> MailgunApiConfig:
    if importlib.util.find_spec("httpx") is None:
        raise ConfigError(s.key("transport"), "mailgun-api needs httpx, which is not "
                          f"installed: {MAILGUN_EXTRA}")
    domain = s.get("domain", _domain, None)
    if domain is None:
        raise ConfigError(s.key("domain"), "required for transport mailgun-api: the Mailgun "
                          "sending domain, e.g. mg.example.com")
    api_key = _secret(s, environ, secrets, "api_key", "API keys")
    if "api_key_env" not in s.data and "api_key_file" not in s.data:
        raise ConfigError(s.key("api_key_env"), "required for transport mailgun-api (or "
                          "api_key_file)")
    return MailgunApiConfig(domain=domain, api_key=api_key,
                            api_url=s.get("api_url", _api_url, DEFAULT_API_URL), **common)


def _secret(s: Section, environ: Mapping[str, str], secrets: bool, key: str,
            plural: str) -> str | None:
    """A password or API key from `<key>_env` or `<key>_file`; never from the file itself.
    With secrets=False the keys are checked but the secret is not read."""
    env_key, file_key = f"{key}_env", f"{key}_file"
    if key in s.data:
        raise ConfigError(s.key(key), f"{plural} never go in the config file; use "
                          f"{env_key} (an environment variable) or {file_key}")
    env_name = s.get(env_key, nonempty_text, None)
    file_name = s.get(file_key, nonempty_text, None)
    if env_name is not None and file_name is not None:
        raise ConfigError(s.key(file_key), f"give {env_key} or {file_key}, not both")
    if not secrets:
        return None
    if env_name is not None:
        value = environ.get(env_name)
        if not value:
            raise ConfigError(s.key(env_key), f"environment variable {env_name} is not set")
        return value
    if file_name is not None:
        # Expands $CREDENTIALS_DIRECTORY, where systemd's LoadCredential= puts the secret.
        path = Path(os.path.expandvars(file_name))
        try:
            value = path.read_text(encoding="utf-8").strip("\r\n")
        except OSError as exc:
            raise ConfigError(s.key(file_key), f"cannot read {path}: {exc.strerror}") from None
        if not value:
            raise ConfigError(s.key(file_key), f"{path} is empty")
        return value
    return None


# --- value converters -----------------------------------------------------------------

_RATE = re.compile(r"^\s*(\d+)\s*/\s*([smhd])\s*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,63}$")


def parse_rate(value: Any) -> Rate:
    """`300/h`: at most N messages per second, minute, hour or day."""
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None or not 1 <= int(match.group(1)) <= 1_000_000:
        raise ValueError(f"expected a rate like 300/h (at most N, 1-1000000, per s, m, h or "
                         f"d), got {describe(value)}")
    return Rate(int(match.group(1)), RATE_UNITS[match.group(2)])


def _name(value: Any) -> str:
    text = nonempty_text(value)
    if not _NAME.match(text):
        raise ValueError(f"expected a name of up to 64 letters, digits and . _ - : @ /, got "
                         f"{describe(value)}")
    return text


def _domain(value: Any) -> str:
    text = canonical_domain(nonempty_text(value))  # a Unicode domain as its A-labels
    if "." not in text or text.replace(".", "").isdigit() or ":" in text:
        raise ValueError(f"expected a domain name like mg.example.com, got {describe(value)}")
    return hostname(text)


def _domains(value: Any) -> tuple[str, ...]:
    if value is None:  # null, as the example config writes it: from any domain
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a list of domains like [mg.example.com]; leave the key "
                         f"out to carry mail from any domain, got {describe(value)}")
    return tuple(dict.fromkeys(_domain(item) for item in value))


def _api_url(value: Any) -> str:
    text = nonempty_text(value)
    parts = urlsplit(text)
    try:
        port = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        port = -1
    if parts.scheme != "https" or not parts.hostname or port == -1:
        raise ValueError(f"expected an https:// URL like https://api.eu.mailgun.net, got "
                         f"{describe(value)}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("expected the API's base URL alone, with no credentials, query or "
                         "fragment")
    return text.rstrip("/")
