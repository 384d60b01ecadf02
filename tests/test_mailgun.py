"""The Mailgun HTTP API transport against a real local HTTPS stand-in (tests/mailgun.py)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from mailgun import API_KEY, DOMAIN, MailgunStandIn
from ports import reusable_port

from relay.breaker import trips
from relay.config import MailgunApiConfig
from relay.mailgun import DomainCheck, MailgunApi, result_of
from relay.outcome import AttemptResult, Stage, Verdict
from relay.policy import classify, credentials_rejected
from relay.ratelimit import rate_limited

MESSAGE = b"From: app@example.com\r\nTo: u@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"
T = TypeVar("T")


def api_config(stand_in: MailgunStandIn, ca_file: Path | None,
               **overrides: Any) -> MailgunApiConfig:
    settings: dict[str, Any] = {"domain": DOMAIN, "api_key": API_KEY, "api_url": stand_in.url,
                                "ca_file": ca_file, "timeout": 5, "name": "mailgun-api"}
    return MailgunApiConfig(**{**settings, **overrides})


def with_api(config: MailgunApiConfig, use: Callable[[MailgunApi], Awaitable[T]]) -> T:
    async def run() -> T:
        api = MailgunApi(config)
        try:
            return await use(api)
        finally:
            await api.close()
    return asyncio.run(run())


def deliver(config: MailgunApiConfig, recipients: list[str],
            content: bytes = MESSAGE) -> AttemptResult:
    return with_api(config, lambda api: api.deliver("app@example.com", recipients, content,
                                                    False))


def texts(result: AttemptResult) -> str:
    return " ".join(str(r) for r in (result.error, *result.recipients.values()) if r)


def test_a_message_goes_as_one_post_with_a_to_per_recipient(mailgun: MailgunStandIn,
                                                           ca_file: Path) -> None:
    """messages.mime gets one `to` field per envelope recipient and the message as a file."""
    result = deliver(api_config(mailgun, ca_file), ["a@example.net", "b@example.org"])
    assert mailgun.requests == [("POST", f"/v3/{DOMAIN}/messages.mime")]
    [received] = mailgun.received
    assert received.to == ("a@example.net", "b@example.org")
    [message] = [p for p in received.parts if p.name == "message"]
    assert message.filename and message.content == MESSAGE
    assert result.error is None and set(result.recipients) == {"a@example.net", "b@example.org"}


def test_sent_keeps_mailguns_id_in_the_reply(mailgun: MailgunStandIn, ca_file: Path) -> None:
    """200: every recipient sent, with Mailgun's words and message id in the reply."""
    result = deliver(api_config(mailgun, ca_file), ["a@example.net"])
    reply = result.recipients["a@example.net"]
    assert reply.code == 250 and classify(reply, Stage.DATA) is Verdict.SENT
    assert reply.text == f"2.0.0 Queued. Thank you. <20261205120000.1@{DOMAIN}>"


@pytest.mark.parametrize("content", [
    b"Subject: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe \xff\xfe\r\n",
    b"Subject: dots\r\n\r\n.\r\n..leading\r\n.\r\n",
    b"Subject: bare\n\nno CR\nand no final newline",
    b"Subject: boundary-like\r\n\r\n--\r\n--boundary--\r\n\r\n\r\n",
])
def test_the_message_arrives_byte_for_byte(mailgun: MailgunStandIn, ca_file: Path,
                                           content: bytes) -> None:
    """8-bit bytes, dot lines and bare line ends reach the API unchanged: no SMTP stuffing."""
    deliver(api_config(mailgun, ca_file), ["a@example.net"], content)
    assert mailgun.received[0].message == content


def test_basic_auth_is_api_and_the_key(mailgun: MailgunStandIn, ca_file: Path) -> None:
    deliver(api_config(mailgun, ca_file), ["a@example.net"])
    assert mailgun.authorizations == ["Basic " + base64.b64encode(f"api:{API_KEY}".encode())
                                      .decode()]


def test_a_refused_key_is_rejected_credentials_and_never_shown(mailgun: MailgunStandIn,
                                                              ca_file: Path) -> None:
    """401: classified as a 535 at AUTH (delivery pauses, the breaker trips); no key shown."""
    config = replace(api_config(mailgun, ca_file), api_key="key-wrong-Secret-99")
    result = deliver(config, ["a@example.net"])
    assert result.stage is Stage.AUTH and result.error is not None
    assert result.error.code == 535 and "HTTP 401: Forbidden" in result.error.text
    assert credentials_rejected(result) and trips(result)
    assert mailgun.received == []
    assert "key-wrong-Secret-99" not in texts(result) + repr(config)


@pytest.mark.parametrize("status, body, code, stage, verdict, tripped", [
    (400, {"message": "to parameter is not a valid address"}, 554, Stage.DATA,
     Verdict.PERMANENT, False),
    (413, {"message": "request entity too large"}, 552, Stage.DATA, Verdict.PERMANENT, False),
    (403, "Forbidden", 535, Stage.AUTH, Verdict.TEMPORARY, True),
    (404, {"message": "Domain not found: mg.example.com"}, 550, Stage.AUTH, Verdict.TEMPORARY,
     True),
    (429, {"message": "Too many requests"}, 451, Stage.SESSION, Verdict.TEMPORARY, False),
    (500, {"message": "Internal Server Error"}, 451, Stage.SESSION, Verdict.TEMPORARY, True),
    (503, "<html>Service Unavailable</html>", 451, Stage.SESSION, Verdict.TEMPORARY, True),
])
def test_scripted_answers(mailgun: MailgunStandIn, ca_file: Path, status: int, body: Any,
                          code: int, stage: Stage, verdict: Verdict, tripped: bool) -> None:
    """Each answer becomes the SMTP reply of like meaning, with Mailgun's own words."""
    mailgun.script((status, body))
    result = deliver(api_config(mailgun, ca_file), ["a@example.net"])
    assert result.error is not None and (result.error.code, result.stage) == (code, stage)
    assert f"HTTP {status}: " in result.error.text
    assert (body["message"] if isinstance(body, dict) else body) in result.error.text
    assert classify(result.error, stage) is verdict and trips(result) is tripped


def test_429_is_a_rate_limit(mailgun: MailgunStandIn, ca_file: Path) -> None:
    """429 pauses the upstream and requeues, as a provider's 421 4.7.x does."""
    mailgun.script((429, {"message": "Too many requests"}))
    result = deliver(api_config(mailgun, ca_file), ["a@example.net"])
    assert rate_limited(result) == result.error


def test_a_slow_api_is_deferred_without_tripping(mailgun: MailgunStandIn, ca_file: Path) -> None:
    """No reply within the timeout: deferred, and it may have been sent, so no failover."""
    mailgun.delay = 30
    result = deliver(api_config(mailgun, ca_file, timeout=0.5), ["a@example.net"])
    assert result.error is not None and result.error.code is None
    assert result.error.text.startswith("timed out: no reply")
    assert result.stage is Stage.DATA and not trips(result)


def test_an_unreachable_api_trips_the_breaker(mailgun: MailgunStandIn, ca_file: Path) -> None:
    config = replace(api_config(mailgun, ca_file), api_url=f"https://127.0.0.1:{reusable_port()}")
    result = deliver(config, ["a@example.net"])
    assert result.error is not None and result.error.text.startswith("connection failed")
    assert result.stage is Stage.SESSION and trips(result)


def test_an_untrusted_certificate_is_a_tls_failure(mailgun: MailgunStandIn) -> None:
    """Verification is on: without the test CA the handshake fails and nothing is sent."""
    result = deliver(api_config(mailgun, None), ["a@example.net"])
    assert result.error is not None and result.error.text.startswith("TLS failure")
    assert "certificate verify failed" in result.error.text
    assert trips(result) and mailgun.requests == []


def test_consecutive_messages_share_one_connection(mailgun: MailgunStandIn,
                                                   ca_file: Path) -> None:
    """Kept alive: a second message costs no new TLS handshake."""
    async def twice(api: MailgunApi) -> None:
        for _ in range(2):
            await api.deliver("app@example.com", ["a@example.net"], MESSAGE, False)
    with_api(api_config(mailgun, ca_file), twice)
    assert len(mailgun.received) == 2 and mailgun.connections == 1


@pytest.mark.parametrize("status, body, text", [
    (200, b'{"id": "<1@x>", "message": "Queued. Thank you."}', "2.0.0 Queued. Thank you. <1@x>"),
    (200, b"not json", "2.0.0 not json (no id given)"),
    (400, b'{"message": "' + b"x" * 1000 + b'"}', None),
    (502, b"", "4.3.0 Mailgun API HTTP 502: (no text)"),
    (500, b'{"message": "line\\nbreak\\u001b[31m"}',
     "4.3.0 Mailgun API HTTP 500: line break\x1b[31m"),
])
def test_reply_texts_are_one_bounded_line(status: int, body: bytes, text: str | None) -> None:
    """Mailgun's words are kept on one line and at most 300 characters."""
    result = result_of("mailgun-api", status, body, ["a@example.net"])
    reply = result.error or result.recipients["a@example.net"]
    assert len(reply.text) <= 300 and "\n" not in reply.text
    assert text is None or reply.text == text


@pytest.mark.parametrize("setup, ok, refused, cause", [
    ("good", True, False, ""),
    ("bad key", False, True, "the API key was refused"),
    ("unknown domain", False, True, "does not know the domain"),
    ("unreachable", False, False, "cannot reach"),
    ("500", False, False, "did not answer as it should"),
])
def test_domain_check(mailgun: MailgunStandIn, ca_file: Path, setup: str, ok: bool,
                      refused: bool, cause: str) -> None:
    """`relay check`'s GET of the domain: 200 ok, 401 a bad key, 404 an unknown domain."""
    config = api_config(mailgun, ca_file)
    if setup == "bad key":
        config = replace(config, api_key="key-wrong-Secret-99")
    elif setup == "unknown domain":
        config = replace(config, domain="other.example.com")
    elif setup == "unreachable":
        config = replace(config, api_url=f"https://127.0.0.1:{reusable_port()}")
    elif setup == "500":
        mailgun.script((500, {"message": "Internal Server Error"}))
    check: DomainCheck = with_api(config, lambda api: api.check_domain())
    assert (check.ok, check.refused) == (ok, refused)
    assert cause in check.cause
    if ok:
        assert check.detail == f"200 {DOMAIN}, state active"
    assert "key-wrong-Secret-99" not in check.detail + check.cause
    assert mailgun.received == []
