"""Delivery through a misbehaving network path: docs/RELIABILITY-PLAN.md rows 52, 55, 62, 91."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from chaos import ChaosProxy
from conftest import RelayProcess, relay_config, wait_for
from upstream import Upstream, secret_forms


@pytest.fixture
def make_proxy(upstream: Upstream) -> Iterator[Callable[..., ChaosProxy]]:
    proxies: list[ChaosProxy] = []

    def make(**kwargs: object) -> ChaosProxy:
        proxy = ChaosProxy(upstream.port, **kwargs).start()  # type: ignore[arg-type]
        proxies.append(proxy)
        return proxy
    yield make
    for proxy in proxies:
        proxy.close()


def relay_through(proxy: ChaosProxy, make_relay, tmp_path: Path, upstream: Upstream,
                  ca_file: Path) -> RelayProcess:
    config = relay_config(tmp_path, upstream, ca_file)
    config["upstream"]["port"] = proxy.port
    return make_relay(config)


def last_error(relay: RelayProcess, entry_id: str) -> str:
    try:
        return json.loads((relay.spool / "state" / entry_id).read_text())["last_error"] or ""
    except (FileNotFoundError, ValueError):
        return ""


@pytest.mark.plan(52, 91)
def test_stripped_starttls_means_no_auth_and_no_mail(make_proxy, make_relay, tmp_path: Path,
                                                     upstream: Upstream, ca_file: Path) -> None:
    """Plan #52: STARTTLS removed from EHLO on the way: the relay sends neither AUTH nor
    MAIL, and the message waits in the queue."""
    proxy = make_proxy(strip_starttls=True)
    relay = relay_through(proxy, make_relay, tmp_path, upstream, ca_file)
    entry_id = relay.send("app@example.com", ["user@example.com"], b"Subject: x\r\n\r\nx\r\n")
    wait_for(lambda: "STARTTLS" in last_error(relay, entry_id), what="the deferral")
    assert upstream.auth_attempts == 0 and upstream.mail_commands == 0
    assert relay.files("failed") == []
    # Plan #91: the proxy saw every byte the relay sent in clear; no credential among them.
    wire = bytes(proxy.sent)
    assert proxy.connections >= 1 and wire.startswith(b"EHLO ")
    assert b"AUTH" not in wire.upper() and b"MAIL FROM" not in wire.upper()
    for secret in secret_forms():
        assert secret not in wire


@pytest.mark.plan(55)
def test_bytes_injected_after_starttls_reply_are_never_taken_as_replies(
        make_proxy, make_relay, tmp_path: Path, upstream: Upstream, ca_file: Path) -> None:
    """Plan #55: '250 fake' appended to the 220 that answers STARTTLS is discarded (or
    breaks the handshake); it is never paired with a later command."""
    proxy = make_proxy(inject_after_starttls=b"250 2.0.0 fake injected reply\r\n")
    relay = relay_through(proxy, make_relay, tmp_path, upstream, ca_file)
    relay.send("app@example.com", ["user@example.com"], b"Subject: x\r\n\r\nx\r\n")
    [got] = wait_for(lambda: upstream.delivered_to("user@example.com"), what="delivery")
    assert proxy.inject_after_starttls == b"", "the injection never happened"
    assert got.tls and got.authenticated
    assert "fake injected" not in relay.log()


@pytest.mark.plan(62)
@pytest.mark.parametrize("truncate", [False, True], ids=["reset", "closed"])
def test_connection_reset_mid_body_is_retried_and_delivered_once(
        make_proxy, make_relay, tmp_path: Path, upstream: Upstream, ca_file: Path,
        truncate: bool) -> None:
    """Plan #62: reset (or cleanly closed) halfway through the body: deferred, then the
    whole message is sent again and the upstream counts one completed delivery."""
    proxy = make_proxy(reset_after_bytes=60_000, truncate=truncate)
    relay = relay_through(proxy, make_relay, tmp_path, upstream, ca_file)
    body = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 120
    entry_id = relay.send("app@example.com", ["user@example.com"], body)
    [got] = wait_for(lambda: upstream.delivered_to("user@example.com"), what="delivery")
    assert got.data.endswith(body)
    assert proxy.connections >= 2
    wait_for(lambda: f"{entry_id}: status=removed" in relay.log(), what="removal")
    assert "status=deferred (connection failed" in relay.log()
    assert len(upstream.delivered_to("user@example.com")) == 1


@pytest.mark.plan(49)
def test_slow_network_within_the_timeout_delivers_first_time(
        make_proxy, make_relay, tmp_path: Path, upstream: Upstream, ca_file: Path) -> None:
    """Every reply from the upstream held 0.3 s on the way (timeout 5 s): a slow path is
    not a failure; the message is delivered at the first attempt."""
    proxy = make_proxy(delay=0.3)
    relay = relay_through(proxy, make_relay, tmp_path, upstream, ca_file)
    entry_id = relay.send("app@example.com", ["user@example.com"], b"Subject: x\r\n\r\nx\r\n")
    wait_for(lambda: f"{entry_id}: status=removed" in relay.log(), what="the delivery")
    assert "attempt=1, status=sent" in relay.log()


@pytest.mark.plan(47)
@pytest.mark.parametrize("greeting", [b"421 4.7.0 Too busy, try later\r\n",
                                      b"554 5.7.1 No SMTP service here\r\n"])
def test_refusing_greeting_defers(make_proxy, make_relay, tmp_path: Path, upstream: Upstream,
                                  ca_file: Path, greeting: bytes) -> None:
    """Plan #47: 421 or 554 at the greeting says nothing about the message: deferred."""
    proxy = make_proxy(greeting=greeting)
    relay = relay_through(proxy, make_relay, tmp_path, upstream, ca_file)
    entry_id = relay.send("app@example.com", ["user@example.com"], b"Subject: x\r\n\r\nx\r\n")
    wait_for(lambda: last_error(relay, entry_id).startswith(greeting[:3].decode()),
             what="the deferral")
    assert relay.files("failed") == []
