"""Configuration: one YAML file validated once into frozen dataclasses.

Owns the lookup order (--config, $RELAY_CONFIG, ./relay.yaml, /etc/relay/relay.yaml,
built-in defaults), the parsing of durations and sizes, and errors that name the dotted
key at fault. Reads the config file and the upstream password (from an environment
variable or a file), nothing else: runtime objects such as SSL contexts and sockets are
built from this config elsewhere, never stored on it.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SEARCH_PATH = (Path("relay.yaml"), Path("/etc/relay/relay.yaml"))
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KiB; refuse anything that could be a YAML bomb
LOOPBACK_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
TLS_MODES = ("starttls", "implicit", "none")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
GREETING_TIMEOUT = 15.0  # upstream.greeting_timeout unless upstream.timeout is shorter


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
class UpstreamConfig:
    host: str
    port: int = 587
    tls: str = "starttls"
    verify: bool = True
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    connections: int = 4
    timeout: float = 60.0
    # For the connect and the greeting alone: a port that speaks the other TLS mode stays
    # silent, and should not cost every attempt the whole command timeout. Unset, it is
    # GREETING_TIMEOUT, or `timeout` if that is shorter.
    greeting_timeout: float = GREETING_TIMEOUT

    @property
    def name(self) -> str:
        """How logs and the queue name this upstream (Postfix's relay=host:port)."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DeliveryConfig:
    retry_min: float = 60.0
    retry_max: float = 3600.0
    max_age: float = 5 * 86400.0
    max_attempts: int | None = None


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class SendmailConfig:
    sender: str | None = None  # `relay sendmail` without -f; None: the invoking user@host


@dataclass(frozen=True)
class Config:
    listen: ListenConfig = ListenConfig()
    spool: SpoolConfig = SpoolConfig()
    upstream: UpstreamConfig | None = None
    delivery: DeliveryConfig = DeliveryConfig()
    log: LogConfig = LogConfig()
    sendmail: SendmailConfig = SendmailConfig()
    source: Path | None = None  # the file it was read from; None for built-in defaults


def restart_required(old: Config, new: Config) -> list[str]:
    """Keys whose new value a running relay cannot take without a restart."""
    changed = []
    if new.listen.address != old.listen.address:
        changed.append("listen.address")
    if new.listen.port != old.listen.port:
        changed.append("listen.port")
    if new.spool.path != old.spool.path:
        changed.append("spool.path")
    return changed


def keep_restart_only(old: Config, new: Config) -> Config:
    """`new` with the values that need a restart taken from `old`."""
    return replace(new, listen=replace(new.listen, address=old.listen.address,
                                       port=old.listen.port),
                   spool=replace(new.spool, path=old.spool.path))


# --- lookup ---------------------------------------------------------------------------


def find_config_file(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    """The config file to use, by the contract's lookup order; None means built-in defaults."""
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
    section = _Section("", data)
    section.only("listen", "spool", "upstream", "delivery", "log", "sendmail")
    config = Config(
        listen=_listen(section.child("listen")),
        spool=_spool(section.child("spool")),
        upstream=_upstream(section.child("upstream", optional=True), environ, secrets),
        delivery=_delivery(section.child("delivery")),
        log=_log(section.child("log")),
        sendmail=_sendmail(section.child("sendmail")),
        source=source,
    )
    return config


# --- sections -------------------------------------------------------------------------


def _listen(s: _Section) -> ListenConfig:
    s.only("address", "port", "max_message_size", "max_recipients", "max_connections",
           "timeout", "allow")
    d = ListenConfig()
    address = s.get("address", _ip_address_text, d.address)
    allow_given = "allow" in s.data
    allow = s.get("allow", _network_list, d.allow)
    if not allow_given and not _is_loopback(address):
        raise ConfigError(
            s.key("address"),
            f"{address} is not a loopback address; add listen.allow with the client networks "
            "allowed to submit, so the relay cannot become an open relay",
        )
    config = ListenConfig(
        address=address,
        port=s.get("port", _int_range(0, 65535), d.port),
        max_message_size=s.get("max_message_size", _size(minimum=1024), d.max_message_size),
        max_recipients=s.get("max_recipients", _int_range(1, 100_000), d.max_recipients),
        max_connections=s.get("max_connections", _int_range(1, 100_000), d.max_connections),
        timeout=s.get("timeout", _duration(minimum=1), d.timeout),
        allow=allow,
    )
    return config


def _spool(s: _Section) -> SpoolConfig:
    s.only("path", "min_free")
    d = SpoolConfig()
    config = SpoolConfig(
        path=s.get("path", _path, d.path),
        min_free=s.get("min_free", _size(minimum=0), d.min_free),
    )
    return config


def _upstream(s: _Section | None, environ: Mapping[str, str],
              secrets: bool) -> UpstreamConfig | None:
    if s is None:
        return None
    s.only("host", "port", "tls", "verify", "ca_file", "username", "password_env",
           "password_file", "password", "connections", "timeout", "greeting_timeout")
    host = s.get("host", _hostname, None)
    if host is None:
        raise ConfigError(s.key("host"), "required when the upstream section is present")
    tls = s.get("tls", _choice(TLS_MODES), "starttls")
    if tls == "none" and not _is_loopback_host(host):
        raise ConfigError(
            s.key("tls"), f"'none' sends mail and passwords in clear; it is allowed only for a "
            f"loopback upstream, not {host}"
        )
    default_port = 465 if tls == "implicit" else 587
    timeout = s.get("timeout", _duration(minimum=1), 60.0)
    username = s.get("username", _nonempty_text, None)
    password = _password(s, environ, secrets)
    has_password = "password_env" in s.data or "password_file" in s.data
    if username is not None and not has_password:
        raise ConfigError(s.key("username"), "needs password_env or password_file as well")
    if has_password and username is None:
        raise ConfigError(s.key("username"), "required with password_env or password_file")
    config = UpstreamConfig(
        host=host,
        port=s.get("port", _int_range(1, 65535), default_port),
        tls=tls,
        verify=s.get("verify", _bool, True),
        ca_file=s.get("ca_file", _existing_file, None),
        username=username,
        password=password,
        connections=s.get("connections", _int_range(1, 100), 4),
        timeout=timeout,
        greeting_timeout=s.get("greeting_timeout", _duration(minimum=1),
                               min(GREETING_TIMEOUT, timeout)),
    )
    return config


def _password(s: _Section, environ: Mapping[str, str], secrets: bool) -> str | None:
    if "password" in s.data:
        raise ConfigError(s.key("password"), "passwords never go in the config file; use "
                          "password_env (an environment variable) or password_file")
    env_name = s.get("password_env", _nonempty_text, None)
    file_name = s.get("password_file", _nonempty_text, None)
    if env_name is not None and file_name is not None:
        raise ConfigError(s.key("password_file"), "give password_env or password_file, not both")
    if not secrets:
        return None
    if env_name is not None:
        value = environ.get(env_name)
        if not value:
            raise ConfigError(s.key("password_env"), f"environment variable {env_name} is not set")
        return value
    if file_name is not None:
        # Expands $CREDENTIALS_DIRECTORY, where systemd's LoadCredential= puts the secret.
        path = Path(os.path.expandvars(file_name))
        try:
            value = path.read_text(encoding="utf-8").strip("\r\n")
        except OSError as exc:
            raise ConfigError(s.key("password_file"), f"cannot read {path}: {exc.strerror}") from None
        if not value:
            raise ConfigError(s.key("password_file"), f"{path} is empty")
        return value
    return None


def _delivery(s: _Section) -> DeliveryConfig:
    s.only("retry_min", "retry_max", "max_age", "max_attempts")
    d = DeliveryConfig()
    config = DeliveryConfig(
        retry_min=s.get("retry_min", _duration(minimum=0.001), d.retry_min),
        retry_max=s.get("retry_max", _duration(minimum=0.001), d.retry_max),
        max_age=s.get("max_age", _duration(minimum=1), d.max_age),
        max_attempts=s.get("max_attempts", _optional(_int_range(1, 1_000_000)), d.max_attempts),
    )
    if config.retry_max < config.retry_min:
        raise ConfigError(s.key("retry_max"), "must not be shorter than delivery.retry_min")
    return config


def _log(s: _Section) -> LogConfig:
    s.only("level", "format")
    d = LogConfig()
    config = LogConfig(
        level=s.get("level", _choice(LOG_LEVELS), d.level),
        format=s.get("format", _choice(LOG_FORMATS), d.format),
    )
    return config


def _sendmail(s: _Section) -> SendmailConfig:
    s.only("sender")
    config = SendmailConfig(sender=s.get("sender", _nonempty_text, None))
    return config


# --- the section walker ---------------------------------------------------------------


class _Section:
    """One mapping of the YAML document, with the keys it may hold (`only`)."""

    def __init__(self, prefix: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(prefix, f"expected a mapping of keys, got {_describe(data)}")
        self.prefix = prefix
        self.data: dict[Any, Any] = data
        self.known: list[str] = []  # the keys this section may hold

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def get(self, name: str, convert: Callable[[Any], Any], default: Any) -> Any:
        if name not in self.data or (self.data[name] is None and default is None):
            return default
        try:
            return convert(self.data[name])
        except ValueError as exc:
            raise ConfigError(self.key(name), str(exc)) from None

    def child(self, name: str, optional: bool = False) -> Any:
        value = self.data.get(name)
        if value is None:
            return None if optional else _Section(self.key(name), {})
        return _Section(self.key(name), value)

    def only(self, *names: str) -> None:
        """Refuse unknown keys before any value is checked: a misspelt optional key
        (`usrname:`) is reported as what it is, not as the rule it then breaks."""
        self.known.extend(names)
        for name in self.data:
            if name not in self.known:
                hint = difflib.get_close_matches(str(name), self.known, n=1)
                suffix = f" (did you mean {hint[0]!r}?)" if hint else \
                    f" (known keys: {', '.join(self.known)})"
                raise ConfigError(self.key(str(name)), f"unknown key{suffix}")


# --- value converters: each raises ValueError with a message for the user -----------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like '30s', '5m', '1h', '5d'."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s, 5m, 1h or 5d, got {_describe(value)}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected a duration like 30s, 5m, 1h or 5d, got {_describe(value)}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value}")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from a number or a string like '512KiB', '25MiB'."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 512KiB or 25MiB, got {_describe(value)}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"expected a size like 512KiB or 25MiB, got {_describe(value)}")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size < 0:
        raise ValueError(f"must not be negative, got {value}")
    return size


def _at_least(parse: Callable[[Any], Any], minimum: float, unit: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        parsed = parse(value)
        if parsed < minimum:
            raise ValueError(f"must be at least {minimum:g}{unit}, got {value}")
        return parsed
    return convert


def _duration(minimum: float) -> Callable[[Any], float]:
    return _at_least(parse_duration, minimum, "s")


def _size(minimum: int) -> Callable[[Any], int]:
    return _at_least(parse_size, minimum, " bytes")


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected an integer {low}-{high}, got {_describe(value)}")
        return value
    return convert


def _optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else convert(value)


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in options:
            raise ValueError(f"expected one of {' | '.join(options)}, got {_describe(value)}")
        return value.lower()
    return convert


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _nonempty_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {_describe(value)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters")
    return value.strip()


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")


def _hostname(value: Any) -> str:
    text = _nonempty_text(value)
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    if not _HOSTNAME.match(text):
        raise ValueError(f"expected a host name or IP address, got {_describe(value)}")
    return text


def _ip_address_text(value: Any) -> str:
    try:
        return str(ipaddress.ip_address(_nonempty_text(value)))
    except ValueError:
        raise ValueError(f"expected an IP address such as 127.0.0.1 or ::1, got "
                         f"{_describe(value)}") from None


def _network_list(value: Any) -> tuple[IPNetwork, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a list of networks like [127.0.0.0/8, ::1], got "
                         f"{_describe(value)}")
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network like 10.0.0.0/8 or ::1") from None
    return tuple(networks)


def _path(value: Any) -> Path:
    return Path(_nonempty_text(value))


def _existing_file(value: Any) -> Path:
    path = _path(value)
    if not path.is_file():
        raise ValueError(f"{path} is not a readable file")
    return path


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
