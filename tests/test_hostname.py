"""The relay's own name: found without DNS, warned about when the system has no FQDN, and
used for the default sender, Received: and Message-IDs. The relay runs in a UTS namespace
of its own (`unshare -ru`) where the test sets the host name."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import relay_config, wait_for

from relay.hostname import SystemName, system_name


def test_system_name_reads_etc_hosts_and_never_resolves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The FQDN comes from /etc/hosts with every resolver function made to fail the test:
    a host whose DNS is unreachable cannot stall start-up."""
    def no_dns(*args: object, **kwargs: object) -> None:
        raise AssertionError("DNS was consulted")
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr",
                 "getfqdn"):
        monkeypatch.setattr(socket, name, no_dns)
    # The one call that cannot be made real here: this machine's name is not ours to set.
    monkeypatch.setattr(socket, "gethostname", lambda: "web1")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.1.1 web1.example.com web1\n")
    assert system_name(hosts) == SystemName("web1", "web1.example.com")
    assert system_name(tmp_path / "missing") == SystemName("web1", None)


def uts_prefix(hostname: str) -> list[str]:
    probe = subprocess.run(["unshare", "-ru", "hostname", hostname], check=False,
                           capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("this kernel refuses UTS namespaces to this user")
    return ["unshare", "-ru", "sh", "-c", f'hostname {hostname} && exec "$0" "$@"']


def stored_content(relay, entry_id: str) -> tuple[dict[str, object], bytes]:
    wait_for(lambda: entry_id in relay.files("deferred"), what="the entry")
    _, envelope, content = (relay.spool / "deferred" / entry_id).read_bytes().split(b"\n", 2)
    return json.loads(envelope), content


def test_without_an_fqdn_start_up_says_so_once(make_relay, tmp_path: Path) -> None:
    """No dotted name anywhere: one warning naming addresses.hostname, and the short name
    serves (greeting, Received:)."""
    config = relay_config(tmp_path, None, None)
    relay = make_relay(config, prefix=uts_prefix("nofqdn-relay-test"))
    warnings = [line for line in relay.lines if "event=hostname" in line]
    assert len(warnings) == 1 and "addresses.hostname" in warnings[0]
    entry_id = relay.send("root", ["user@example.org"], b"Subject: s\r\n\r\nbody\r\n")
    envelope, content = stored_content(relay, entry_id)
    assert envelope["sender"] == "root@nofqdn-relay-test"
    assert b"\tby nofqdn-relay-test (relay) with ESMTP" in content


def test_the_fqdn_names_sender_received_and_message_id(make_relay, tmp_path: Path) -> None:
    """A host with an FQDN: no warning; it qualifies bare senders and names the relay in
    Received: and in the Message-ID it adds."""
    relay = make_relay(relay_config(tmp_path, None, None),
                       prefix=uts_prefix("relay-test.example.net"))
    assert not any("event=hostname" in line for line in relay.lines)
    entry_id = relay.send("root", ["user@example.org"], b"Subject: s\r\n\r\nbody\r\n")
    envelope, content = stored_content(relay, entry_id)
    assert envelope["sender"] == "root@relay-test.example.net"
    assert b"\tby relay-test.example.net (relay) with ESMTP" in content
    assert f"Message-ID: <{entry_id}@relay-test.example.net>\r\n".encode() in content


def test_upstream_hears_the_relays_name_in_ehlo(make_relay, upstream, ca_file: Path,
                                                tmp_path: Path) -> None:
    """Delivery greets the upstream with addresses.hostname, not a DNS lookup's answer."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file,
                                    addresses={"hostname": "mail.example.com"}))
    relay.send("app@example.org", ["user@example.org"], b"Subject: s\r\n\r\nbody\r\n")
    wait_for(lambda: upstream.transactions, what="the delivery")
    assert set(upstream.ehlo_names) == {"mail.example.com"}


def test_configured_hostname_wins(make_relay, tmp_path: Path) -> None:
    """addresses.hostname replaces the system's name everywhere, without a warning."""
    relay = make_relay(relay_config(tmp_path, None, None,
                                    addresses={"hostname": "mail.example.com"}),
                       prefix=uts_prefix("nofqdn-relay-test"))
    assert not any("event=hostname" in line for line in relay.lines)
    entry_id = relay.send("root@nofqdn-relay-test", ["user@example.org"],
                          b"Subject: s\r\n\r\nbody\r\n")
    envelope, content = stored_content(relay, entry_id)
    assert envelope["sender"] == "root@mail.example.com"
    assert f"Message-ID: <{entry_id}@mail.example.com>\r\n".encode() in content
