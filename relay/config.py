"""Configuration: one YAML file validated once into frozen dataclasses.

Owns the lookup order (--config, $RELAY_CONFIG, ./relay.yaml, /etc/relay/relay.yaml,
built-in defaults) and the sections other than the upstreams, which relay.upstreamconfig
reads; the mapping walker and value converters are relay.configvalues. Errors name the
dotted key at fault. Reads the config file and the upstreams' passwords and API keys
(from environment variables or files), nothing else: runtime objects such as SSL contexts
and sockets are built from this config elsewhere, never stored on it.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from email_validator import EmailNotValidError, validate_email

from .addressconfig import AddressesConfig, parse_addresses
from .configvalues import (
    IPNetwork,
    Section,
    boolean,
    choice,
    describe,
    duration_at_least,
    int_range,
    ip_address_text,
    is_loopback,
    network_list,
    nonempty_text,
    optional,
    parse_duration,
    parse_size,
    path_value,
    size_at_least,
)
from .errors import ConfigError
from .upstreamconfig import (
    AnyUpstream,
    MailgunApiConfig,
    Rate,
    UpstreamConfig,
    parse_upstreams,
)

# The upstream classes and value parsers live in their own modules and are named here too,
# where the rest of the relay looks for the configuration's types.
__all__ = [
    "AddressesConfig", "AnyUpstream", "Config", "DeliveryConfig", "IPNetwork", "ListenConfig",
    "LogConfig",
    "MailgunApiConfig", "Rate", "SendmailConfig", "SpoolConfig", "UpstreamConfig",
    "find_config_file", "keep_restart_only", "load_config", "parse_config", "parse_duration",
    "parse_size", "restart_required",
]

SEARCH_PATH = (Path("relay.yaml"), Path("/etc/relay/relay.yaml"))
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KiB; refuse anything that could be a YAML bomb
LOOPBACK_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
NOTIFY_CHOICES = ("none", "sender")  # or an address
MAX_SCHEDULE = 999_999_999


@dataclass(frozen=True)
class ListenConfig:
    address: str = "127.0.0.1"
    port: int = 2525
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_connections: int = 200
    timeout: float = 300.0
    allow: tuple[IPNetwork, ...] = LOOPBACK_NETWORKS


@dataclass(frozen=True)
class SpoolConfig:
    path: Path = Path("spool")
    min_free: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class DeliveryConfig:
    retry_min: float = 60.0
    retry_max: float = 3600.0
    max_age: float = 5 * 86400.0
    max_attempts: int | None = None
    max_schedule: float = 30 * 86400.0  # how far ahead a client may ask a message be sent


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "text"
    redact_addresses: bool = False  # j***@example.com in logs, history output and stats


@dataclass(frozen=True)
class HistoryConfig:
    enabled: bool = True  # the delivery journal in the spool's history/
    keep: float = 30 * 86400.0  # journal files older than this are deleted, daily


@dataclass(frozen=True)
class SendmailConfig:
    sender: str | None = None  # `relay sendmail` without -f; None: the invoking user@host


@dataclass(frozen=True)
class MetricsConfig:
    """The HTTP endpoint of /metrics and /healthz; port None: off."""

    address: str = "127.0.0.1"
    port: int | None = None
    allow: tuple[IPNetwork, ...] = LOOPBACK_NETWORKS


@dataclass(frozen=True)
class BouncesConfig:
    """Delivery status notifications for failed recipients."""

    notify: str = "none"  # "none", "sender", or an address
    from_address: str | None = None  # the notice's From:; None: MAILER-DAEMON@<hostname>
    max_per_hour: int = 10  # notices to one address within an hour; the rest are dropped


@dataclass(frozen=True)
class Config:
    listen: ListenConfig = ListenConfig()
    spool: SpoolConfig = SpoolConfig()
    upstreams: tuple[AnyUpstream, ...] = ()  # in order of preference
    delivery: DeliveryConfig = DeliveryConfig()
    log: LogConfig = LogConfig()
    sendmail: SendmailConfig = SendmailConfig()
    metrics: MetricsConfig = MetricsConfig()
    bounces: BouncesConfig = BouncesConfig()
    history: HistoryConfig = HistoryConfig()
    addresses: AddressesConfig = field(default_factory=AddressesConfig)
    source: Path | None = None  # the file it was read from; None for built-in defaults

    @property
    def upstream(self) -> UpstreamConfig | None:
        """The first SMTP upstream, or None: what delivery and `relay serve` use until
        they route each message over the whole list."""
        return next((u for u in self.upstreams if isinstance(u, UpstreamConfig)), None)


def restart_required(old: Config, new: Config) -> list[str]:
    """Keys whose new value a running relay cannot take without a restart."""
    changed = []
    if new.listen.address != old.listen.address:
        changed.append("listen.address")
    if new.listen.port != old.listen.port:
        changed.append("listen.port")
    if new.spool.path != old.spool.path:
        changed.append("spool.path")
    if new.metrics.address != old.metrics.address:
        changed.append("metrics.address")
    if new.metrics.port != old.metrics.port:
        changed.append("metrics.port")
    if new.history.enabled != old.history.enabled:
        changed.append("history.enabled")
    return changed


def keep_restart_only(old: Config, new: Config) -> Config:
    """`new` with the values that need a restart taken from `old`."""
    return replace(new, listen=replace(new.listen, address=old.listen.address,
                                       port=old.listen.port),
                   spool=replace(new.spool, path=old.spool.path),
                   metrics=replace(new.metrics, address=old.metrics.address,
                                   port=old.metrics.port),
                   history=replace(new.history, enabled=old.history.enabled))


# --- lookup ---------------------------------------------------------------------------


def find_config_file(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    """The config file to use, by the lookup order of docs/CONTRACT.md; None: the defaults."""
    if explicit:
        return Path(explicit)
    if environ.get("RELAY_CONFIG"):
        return Path(environ["RELAY_CONFIG"])
    for candidate in SEARCH_PATH:
        if candidate.is_file():
            return candidate
    return None


def load_config(explicit: str | None = None, environ: Mapping[str, str] | None = None,
                secrets: bool = True) -> Config:
    """Find, read and validate the configuration. Raises ConfigError naming the key.

    With secrets=False the upstream password is not read (left None): commands that never
    talk to the upstream (`relay queue`, `relay sendmail`) work without the credential.
    """
    environ = os.environ if environ is None else environ
    path = find_config_file(explicit, environ)
    if path is None:
        return Config()
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError("", f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
    return parse_config(raw.decode("utf-8", errors="replace"), environ, source=path,
                        secrets=secrets)


def parse_config(text: str, environ: Mapping[str, str], source: Path | None = None,
                 secrets: bool = True) -> Config:
    """Validate YAML text into a Config. Only safe_load: YAML tags never construct objects."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError("", f"invalid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    section = Section("", data)
    section.only("listen", "spool", "upstream", "upstreams", "delivery", "log", "sendmail",
                 "metrics", "bounces", "history", "addresses")
    config = Config(
        listen=_listen(section.child("listen")),
        spool=_spool(section.child("spool")),
        upstreams=parse_upstreams(section, environ, secrets),
        delivery=_delivery(section.child("delivery")),
        log=_log(section.child("log")),
        sendmail=_sendmail(section.child("sendmail")),
        metrics=_metrics(section.child("metrics")),
        bounces=_bounces(section.child("bounces")),
        history=_history(section.child("history")),
        addresses=parse_addresses(section.child("addresses")),
        source=source,
    )
    if config.bounces.notify != "none" and config.upstreams and all(
            u.sender_domains for u in config.upstreams):
        # A notice goes from the null sender, which has no domain to match: it would wait
        # in the queue for good, never attempted, never expired.
        raise ConfigError("bounces.notify", "notices are sent from the null sender <>, "
                          "which only an upstream without sender_domains carries; add one, "
                          "or set bounces.notify: none")
    return config


# --- sections -------------------------------------------------------------------------


def _listen(s: Section) -> ListenConfig:
    s.only("address", "port", "max_message_size", "max_recipients", "max_connections",
           "timeout", "allow")
    d = ListenConfig()
    address = s.get("address", ip_address_text, d.address)
    allow = _allow(s, address, d.allow, "the client networks allowed to submit, so the "
                   "relay cannot become an open relay")
    config = ListenConfig(
        address=address,
        port=s.get("port", int_range(0, 65535), d.port),
        max_message_size=s.get("max_message_size", size_at_least(minimum=1024), d.max_message_size),
        max_recipients=s.get("max_recipients", int_range(1, 100_000), d.max_recipients),
        max_connections=s.get("max_connections", int_range(1, 100_000), d.max_connections),
        timeout=s.get("timeout", duration_at_least(minimum=1), d.timeout),
        allow=allow,
    )
    return config


def _allow(s: Section, address: str, default: tuple[IPNetwork, ...],
           why: str) -> tuple[IPNetwork, ...]:
    """The section's `allow` networks: required when `address` is not loopback."""
    allow_given = "allow" in s.data
    allow: tuple[IPNetwork, ...] = s.get("allow", network_list, default)
    if not allow_given and not is_loopback(address):
        raise ConfigError(s.key("address"), f"{address} is not a loopback address; add "
                          f"{s.key('allow')} with {why}")
    return allow


def _spool(s: Section) -> SpoolConfig:
    s.only("path", "min_free")
    d = SpoolConfig()
    config = SpoolConfig(
        path=s.get("path", path_value, d.path),
        min_free=s.get("min_free", size_at_least(minimum=0), d.min_free),
    )
    return config


def _delivery(s: Section) -> DeliveryConfig:
    s.only("retry_min", "retry_max", "max_age", "max_attempts", "max_schedule")
    d = DeliveryConfig()
    config = DeliveryConfig(
        retry_min=s.get("retry_min", duration_at_least(minimum=0.001), d.retry_min),
        retry_max=s.get("retry_max", duration_at_least(minimum=0.001), d.retry_max),
        max_age=s.get("max_age", duration_at_least(minimum=1), d.max_age),
        max_attempts=s.get("max_attempts", optional(int_range(1, 1_000_000)), d.max_attempts),
        max_schedule=s.get("max_schedule", duration_at_least(minimum=1), d.max_schedule),
    )
    if config.retry_max < config.retry_min:
        raise ConfigError(s.key("retry_max"), "must not be shorter than delivery.retry_min")
    if config.max_schedule > MAX_SCHEDULE:
        # RFC 4865 gives the interval at most nine digits of seconds (about 31 years).
        raise ConfigError(s.key("max_schedule"), f"must be at most {MAX_SCHEDULE} seconds")
    return config


def _log(s: Section) -> LogConfig:
    s.only("level", "format", "redact_addresses")
    d = LogConfig()
    config = LogConfig(
        level=s.get("level", choice(LOG_LEVELS), d.level),
        format=s.get("format", choice(LOG_FORMATS), d.format),
        redact_addresses=s.get("redact_addresses", boolean, d.redact_addresses),
    )
    return config


def _history(s: Section) -> HistoryConfig:
    s.only("enabled", "keep")
    d = HistoryConfig()
    config = HistoryConfig(
        enabled=s.get("enabled", boolean, d.enabled),
        # The journal is one file per day: less than a day could not be kept apart.
        keep=s.get("keep", duration_at_least(minimum=86400), d.keep),
    )
    return config


def _sendmail(s: Section) -> SendmailConfig:
    s.only("sender")
    return SendmailConfig(sender=s.get("sender", nonempty_text, None))


def _metrics(s: Section) -> MetricsConfig:
    s.only("address", "port", "allow")
    d = MetricsConfig()
    address = s.get("address", ip_address_text, d.address)
    config = MetricsConfig(
        address=address,
        port=s.get("port", optional(int_range(0, 65535)), d.port),
        allow=_allow(s, address, d.allow, "the networks allowed to scrape (your Prometheus "
                     "server), so queue figures are not shown to everyone"),
    )
    return config


def _bounces(s: Section) -> BouncesConfig:
    s.only("notify", "from", "max_per_hour")
    d = BouncesConfig()
    config = BouncesConfig(
        notify=s.get("notify", _notify, d.notify),
        from_address=s.get("from", _address, d.from_address),
        max_per_hour=s.get("max_per_hour", int_range(1, 1_000_000), d.max_per_hour),
    )
    return config


def _address(value: Any) -> str:
    """A mailbox (syntax only, no DNS), as the listener would accept it."""
    text = nonempty_text(value)
    if "<" in text or ">" in text:
        raise ValueError(f"expected a bare address like ops@example.com, got {describe(value)}")
    try:
        validate_email(text, check_deliverability=False, globally_deliverable=False,
                       allow_smtputf8=True)
    except EmailNotValidError as exc:
        raise ValueError(f"{text!r} is not a valid address: {exc}") from None
    return text


def _notify(value: Any) -> str:
    """none | sender | an address to send every notice to."""
    if isinstance(value, str) and value.strip().lower() in NOTIFY_CHOICES:
        return value.strip().lower()
    if not isinstance(value, str) or "@" not in value:
        raise ValueError(f"expected none, sender or an address like ops@example.com, got "
                         f"{describe(value)}")
    return _address(value)
