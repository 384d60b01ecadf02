"""The `addresses:` section of the config: the relay's name, aliases, sender domains.

Validated once into a frozen dataclass, as relay.config does for every section, with
errors that name the dotted key. What the rules do with addresses is relay.addresses'.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .addresses import WILDCARD, address_problem, alias_problem
from .configvalues import NO_DOMAINS, Section, describe, nonempty_text
from .errors import ConfigError

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class AddressesConfig:
    hostname: str | None = None  # None: the system's FQDN (relay.hostname finds it)
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # keys lower-case
    sender_domains: tuple[str, ...] = ()  # lower-case; empty: any
    default_sender: str | None = None
    redirect_to: str | None = None


def parse_addresses(s: Section) -> AddressesConfig:
    s.only("hostname", "aliases", "sender_domains", "default_sender", "redirect_to")
    hostname = s.get("hostname", mail_domain, None)
    domains = s.get("sender_domains", _domain_list, NO_DOMAINS)
    default_sender = s.get("default_sender", mailbox, None)
    if default_sender is not None:
        if not domains:
            raise ConfigError(s.key("default_sender"), "replaces senders outside "
                              "addresses.sender_domains, which is empty: list the domains")
        if default_sender.rpartition("@")[2].lower() not in domains:
            raise ConfigError(s.key("default_sender"), f"{default_sender} is not in one of "
                              "addresses.sender_domains")
    config = AddressesConfig(
        hostname=hostname,
        aliases=_aliases(s.child("aliases"), hostname),
        sender_domains=domains,
        default_sender=default_sender,
        redirect_to=s.get("redirect_to", mailbox, None),
    )
    return config


def _aliases(s: Section, hostname: str | None) -> dict[str, tuple[str, ...]]:
    """Alias names are matched without regard to case, as in aliases(5); each leads to
    addresses or further names, and must lead somewhere without a loop."""
    aliases: dict[str, tuple[str, ...]] = {}
    for name in list(s.data):
        key = s.key(str(name))
        if not isinstance(name, str):
            raise ConfigError(key, f"an alias name is text; quote it ({describe(name)})")
        if name != WILDCARD:
            try:
                _local_name(name)
            except ValueError as exc:
                raise ConfigError(key, str(exc)) from None
        if name.lower() in aliases:
            raise ConfigError(key, f"{name.lower()} is listed twice (names ignore case)")
        aliases[name.lower()] = s.get(name, _alias_targets, ())
    problem = alias_problem(aliases, {"localhost", hostname or "localhost"})
    if problem is not None:
        raise ConfigError(s.key(problem[0]), problem[1])
    return aliases


def mail_domain(value: Any) -> str:
    """A host name that can follow the @ of an address (not an IP address)."""
    text = nonempty_text(value).lower()
    if not _HOSTNAME.match(text) or _is_ip_address(text):
        raise ValueError(f"expected a host name such as mail.example.com, got {describe(value)}")
    problem = address_problem(f"postmaster@{text}", True)
    if problem is not None:
        raise ValueError(f"{text} cannot be used in an address: {problem}")
    return text


def _domain_list(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if isinstance(items, list):
        return tuple(dict.fromkeys(mail_domain(item) for item in items))
    raise ValueError(f"expected a list of domains like [mg.example.com], got {describe(value)}")


def mailbox(value: Any) -> str:
    """A complete address (local part and domain), as an envelope carries it."""
    text = nonempty_text(value)
    if "@" not in text:
        raise ValueError(f"expected an address such as noreply@mg.example.com, got "
                         f"{describe(value)}")
    if not text.isascii():
        # It replaces addresses of clients that need not have asked for SMTPUTF8.
        raise ValueError(f"{text} is not an ASCII address")
    problem = address_problem(text, True)
    if problem is not None:
        raise ValueError(f"{text} is not a valid address: {problem}")
    return text


def _local_name(value: Any) -> str:
    text = nonempty_text(value)
    if "@" in text or address_problem(f"{text}@example.com", True) is not None:
        raise ValueError(f"{text!r} is not a local name such as root or www-data")
    return text


def _alias_targets(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"expected an address, a local name, or a list of them, got "
                         f"{describe(value)}")
    return tuple(dict.fromkeys(mailbox(item) if isinstance(item, str) and "@" in item
                               else _local_name(item) for item in items))


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True
