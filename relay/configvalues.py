"""The building blocks of relay.config: a YAML mapping walker and the value converters.

`Section` reads one mapping, remembers which keys it was asked for and rejects the rest
with a hint; each converter turns a YAML value into a typed one or raises ValueError with
a message for the user, which `Section.get` turns into a ConfigError naming the key.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

from .errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")
Number = TypeVar("Number", int, float)
NO_DOMAINS: tuple[str, ...] = ()  # a sender_domains default, typed for Section.get

# --- the section walker ---------------------------------------------------------------


class Section:
    """One mapping of the YAML document; remembers which keys were read."""

    def __init__(self, prefix: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(prefix, f"expected a mapping of keys, got {describe(data)}")
        self.prefix = prefix
        self.data: dict[Any, Any] = data
        self.known: list[str] = []

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def get(self, name: str, convert: Callable[[Any], T], default: T) -> T:
        """The key's value as `convert` makes it (typed: a config field gets what its
        converter returns), or `default` when absent."""
        self.known.append(name)
        if name not in self.data or (self.data[name] is None and default is None):
            return default
        try:
            return convert(self.data[name])
        except ValueError as exc:
            raise ConfigError(self.key(name), str(exc)) from None

    @overload
    def child(self, name: str, optional: Literal[False] = False) -> Section: ...
    @overload
    def child(self, name: str, optional: Literal[True]) -> Section | None: ...

    def child(self, name: str, optional: bool = False) -> Section | None:
        self.known.append(name)
        value = self.data.get(name)
        if value is None:
            return None if optional else Section(self.key(name), {})
        return Section(self.key(name), value)

    def sections(self, name: str) -> list[Section] | None:
        """A list of mappings, each a Section named `name[i]`; None when `name` is absent."""
        self.known.append(name)
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise ConfigError(self.key(name), f"expected a list of one or more mappings, got "
                              f"{describe(value)}")
        return [Section(f"{self.key(name)}[{i}]", item) for i, item in enumerate(value)]

    def only(self, *names: str) -> None:
        """Refuse unknown keys before any value is read: a misspelt optional key
        (`usrname:`) is reported as what it is, not as the rule it then breaks."""
        self.known.extend(names)
        self.reject_unknown()

    def reject_unknown(self) -> None:
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
        raise ValueError(f"expected a duration like 30s, 5m, 1h or 5d, got {describe(value)}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected a duration like 30s, 5m, 1h or 5d, got {describe(value)}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value}")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from a number or a string like '512KiB', '25MiB'."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 512KiB or 25MiB, got {describe(value)}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"expected a size like 512KiB or 25MiB, got {describe(value)}")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size < 0:
        raise ValueError(f"must not be negative, got {value}")
    return size


def at_least(parse: Callable[[Any], Number], minimum: float,
             unit: str) -> Callable[[Any], Number]:
    def convert(value: Any) -> Number:
        parsed = parse(value)
        if parsed < minimum:
            raise ValueError(f"must be at least {minimum:g}{unit}, got {value}")
        return parsed
    return convert


def duration_at_least(minimum: float) -> Callable[[Any], float]:
    return at_least(parse_duration, minimum, "s")


def size_at_least(minimum: int) -> Callable[[Any], int]:
    return at_least(parse_size, minimum, " bytes")


def int_range(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected an integer {low}-{high}, got {describe(value)}")
        return value
    return convert


def optional(convert: Callable[[Any], T]) -> Callable[[Any], T | None]:
    return lambda value: None if value is None else convert(value)


def choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in options:
            raise ValueError(f"expected one of {' | '.join(options)}, got {describe(value)}")
        return value.lower()
    return convert


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {describe(value)}")
    return value


def nonempty_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {describe(value)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters")
    return value.strip()


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")


def hostname(value: Any) -> str:
    text = nonempty_text(value)
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    if not _HOSTNAME.match(text):
        raise ValueError(f"expected a host name or IP address, got {describe(value)}")
    return text


def ip_address_text(value: Any) -> str:
    try:
        return str(ipaddress.ip_address(nonempty_text(value)))
    except ValueError:
        raise ValueError(f"expected an IP address such as 127.0.0.1 or ::1, got "
                         f"{describe(value)}") from None


def network_list(value: Any) -> tuple[IPNetwork, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a list of networks like [127.0.0.0/8, ::1], got "
                         f"{describe(value)}")
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network like 10.0.0.0/8 or ::1") from None
    return tuple(networks)


def path_value(value: Any) -> Path:
    return Path(nonempty_text(value))


def existing_file(value: Any) -> Path:
    path = path_value(value)
    if not path.is_file():
        raise ValueError(f"{path} is not a readable file")
    return path


def describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def canonical_domain(domain: str) -> str:
    """A domain as the relay compares them: lower case, without a trailing dot, and in
    IDNA A-labels (xn--...) when written in Unicode."""
    text = domain.strip().rstrip(".").lower()
    if text.isascii():
        return text
    try:
        return text.encode("idna").decode("ascii")
    except UnicodeError:
        return text
