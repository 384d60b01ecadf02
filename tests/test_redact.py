"""log.redact_addresses: j***@example.com in log lines (text and JSON) and history output."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

import relay.log
from relay.config import LogConfig
from relay.history import Record
from relay.log import log_event, setup_logging
from relay.redact import redact_address, redact_text
from relay.report import history_table, record_json


@pytest.mark.parametrize("address, shown", [
    ("john@example.com", "j***@example.com"),
    ("j@example.com", "j***@example.com"),
    ('"odd@local"@example.com', '"***@example.com'),
    ("", ""),
    ("postmaster", "p***"),
])
def test_an_address_keeps_its_first_character_and_its_domain(address: str, shown: str) -> None:
    """j***@example.com; the null sender stays empty."""
    assert redact_address(address) == shown


def test_addresses_inside_text_are_redacted_and_the_rest_kept() -> None:
    """Each address in a reply is redacted; text without one is untouched."""
    text = "550 5.1.1 <bob@example.com>: Recipient address rejected (see ann@help.example)"
    assert redact_text(text) == ("550 5.1.1 <b***@example.com>: Recipient address rejected "
                                 "(see a***@help.example)")
    assert redact_text("451 4.2.0 Mailbox busy") == "451 4.2.0 Mailbox busy"


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """A stream for setup_logging; the root logger and the redaction switch restored after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(relay.log, "_redacting", False)
    yield io.StringIO()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_log_lines_show_redacted_addresses_when_configured(captured: io.StringIO) -> None:
    """Sender, recipient and any address in the reply; the Message-ID is left alone."""
    setup_logging(LogConfig(redact_addresses=True), captured)
    log_event(logging.INFO, "ABC", **{"from": "app@example.com", "message-id": "<m1@app.example>"},
              status="queued")
    log_event(logging.WARNING, "ABC", to="bob@example.net", status="failed",
              reply="550 5.1.1 <bob@example.net>: no such user")
    out = captured.getvalue()
    assert "from=<a***@example.com>" in out and "message-id=<m1@app.example>" in out
    assert "to=<b***@example.net>" in out and "(550 5.1.1 <b***@example.net>: no such user)" in out
    assert "app@example.com" not in out and "bob@example.net" not in out


def test_json_log_lines_are_redacted_too(captured: io.StringIO) -> None:
    """log.format json: the recipient field is redacted as in text."""
    setup_logging(LogConfig(format="json", redact_addresses=True), captured)
    log_event(logging.INFO, "ABC", to="bob@example.net", status="sent")
    assert json.loads(captured.getvalue())["to"] == "b***@example.net"


def test_log_lines_keep_addresses_by_default(captured: io.StringIO) -> None:
    """Without log.redact_addresses, addresses are logged in full."""
    setup_logging(LogConfig(), captured)
    log_event(logging.INFO, "ABC", to="bob@example.net", status="sent")
    assert "to=<bob@example.net>" in captured.getvalue()


@pytest.mark.parametrize(("level", "shown"), [("info", False), ("debug", True)])
def test_httpx_request_lines_show_only_at_debug(captured: io.StringIO, level: str,
                                                shown: bool) -> None:
    """httpx logs each Mailgun API request at INFO, which the relay's own delivery line
    already says: below log.level debug it is not shown."""
    httpx_logger = logging.getLogger("httpx")
    try:
        setup_logging(LogConfig(level=level), captured)
        httpx_logger.info('HTTP Request: POST https://api.mailgun.net/v3/d/messages.mime "200"')
        assert ("HTTP Request" in captured.getvalue()) is shown
    finally:
        httpx_logger.setLevel(logging.NOTSET)


def test_history_output_is_redacted_when_asked() -> None:
    """History JSON and table show sender, recipient and reply redacted."""
    record = Record(at=0.0, status="failed", id="0" * 21, message_id="<m@app.example>",
                    sender="app@example.com", recipient="bob@example.net", size=1, arrived=0.0,
                    send_at=None, delay=0.0, attempts=1, relay="up:587",
                    reply="550 <bob@example.net> unknown")
    shown = record_json(record, redact=True)
    assert (shown["from"], shown["to"], shown["reply"]) == (
        "a***@example.com", "b***@example.net", "550 <b***@example.net> unknown")
    assert "bob@" not in history_table([record], redact=True)
    assert "bob@example.net" in history_table([record], redact=False)
