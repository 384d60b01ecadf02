"""relay.smtp_client's upstream session on its own, against the real test upstream."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import example, given
from hypothesis import strategies as st
from upstream import PASSWORD, USERNAME, Upstream

from relay.config import UpstreamConfig
from relay.outcome import AttemptResult
from relay.smtp_client import UpstreamSession, make_tls_context, wire_form


def deliver(upstream: Upstream, ca_file: Path, recipients: list[str]) -> AttemptResult:
    config = UpstreamConfig(host="127.0.0.1", port=upstream.port, ca_file=ca_file,
                            username=USERNAME, password=PASSWORD, timeout=5)

    async def run() -> AttemptResult:
        session = UpstreamSession(config, make_tls_context(config))
        try:
            return await session.deliver("app@example.com", recipients,
                                         b"Subject: x\r\n\r\nx\r\n", False)
        finally:
            await session.close()
    return asyncio.run(run())


@pytest.mark.plan(67)
def test_address_the_client_refuses_to_send_fails_alone(upstream: Upstream,
                                                        ca_file: Path) -> None:
    """Plan #67: an address aiosmtplib will not put on the wire is a permanent 553 for that
    recipient (kept in failed/ with the reason), not an exception retried forever."""
    result = deliver(upstream, ca_file, ["a b@example.com", "ok@example.com"])
    assert result.recipients["a b@example.com"].code == 553
    assert "cannot be sent safely" in result.recipients["a b@example.com"].text
    assert result.recipients["ok@example.com"].code == 250
    assert [t.recipients for t in upstream.messages()] == [("ok@example.com",)]


@given(st.binary() | st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a"]))
       .map(b"".join))
@example(b"")
@example(b".\r\n")
@example(b"a\r\n.b\r\n..\r\n")
def test_wire_form_is_what_aiosmtplib_data_sends(content: bytes) -> None:
    """The DATA bytes the relay sends are exactly those aiosmtplib's data() would send:
    CRLF line ends, leading dots doubled, the final dot."""
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(content)) + b".\r\n"
    assert wire_form(content) == expected
