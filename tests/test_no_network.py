"""Without DNS: the listener never needs it (plan row 28) and delivery survives its
failure (row 48). The relay runs in its own network namespace (`unshare -rn`, no
privileges needed), where only loopback exists and no resolver answers."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import relay_config, wait_for

from relay.addresses import address_problem
from relay.spool import Spool, new_id


@pytest.mark.plan(28)
def test_address_checks_never_resolve_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sender and recipient checks pass with every resolver function made to fail the
    test: no DNS at SMTP time."""
    def no_dns(*args: object, **kwargs: object) -> None:
        raise AssertionError("DNS was consulted")
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
        monkeypatch.setattr(socket, name, no_dns)
    address_problem.cache_clear()  # answers kept from earlier tests would prove nothing
    assert address_problem("user@unresolvable-zq9x7.net", False) is None
    assert address_problem("user@example.com", False) is None


def netns_works() -> bool:
    result = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"],
                            capture_output=True, timeout=30)
    return result.returncode == 0


@pytest.mark.plan(48)
def test_unresolvable_upstream_defers_and_keeps_the_mail(tmp_path: Path, make_relay) -> None:
    """No resolver reachable: the entry is deferred with 'Temporary failure in name
    resolution' and the relay keeps running."""
    if not netns_works():
        pytest.skip("this kernel refuses network namespaces to unprivileged users")
    config = relay_config(tmp_path, None, None)
    config["upstream"] = {"host": "smtp.mailgun.invalid", "port": 587, "tls": "starttls"}
    spool = Spool(Path(config["spool"]["path"]))
    spool.open()
    entry_id = new_id(time.time())
    spool.store(entry_id, "app@example.com", ["user@example.com"],
                [b"Subject: x\r\n\r\nx\r\n"], time.time(), False)
    prefix = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
    relay = make_relay(config, prefix=prefix)
    wait_for(lambda: entry_id in relay.files("deferred"), what="the deferral")
    assert "name resolution" in relay.state(entry_id)["last_error"]
    assert relay.process is not None and relay.process.poll() is None
