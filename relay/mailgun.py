"""Mailgun's HTTP API as a transport: each message one POST to messages.mime.

`POST {api_url}/v3/{domain}/messages.mime` with Basic auth `api:<key>`, as
multipart/form-data: one `to` field per envelope recipient and `message`, the whole MIME
message, as a file. Mailgun's answers come back as the same outcome.AttemptResult an SMTP
attempt gives, with an SMTP reply of like meaning, so that delivery, policy and the
breaker treat both transports alike:

| Mailgun's answer               | reply    | stage   | so                                  |
|--------------------------------|----------|---------|-------------------------------------|
| 2xx                            | 250      | -       | sent; Mailgun's id in the text      |
| 400                            | 554 5.6.0| DATA    | failed for good, with its message   |
| 413 (too large for the API)    | 552 5.3.4| DATA    | failed for good                     |
| 401, 403                       | 535 5.7.8| AUTH    | credentials rejected: paused, trips |
| 404 (domain unknown here)      | 550 5.7.1| AUTH    | as 401: no message can go           |
| 429                            | 451 4.7.0| SESSION | rate limited (relay.ratelimit)      |
| 5xx, any other                 | 451 4.3.0| SESSION | deferred; trips the breaker         |
| connect error, TLS, connect timeout | none| SESSION | deferred; trips the breaker         |
| no reply in time, connection lost   | none| DATA    | deferred; may have been sent        |

The API takes no envelope sender: Mailgun uses its own bounce address. The key is only
ever in the Authorization header, never in a reply, log line or repr. Needs httpx (the
`mailgun-api` extra); relay.config refuses the transport without it.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from typing import Any

import httpx

from .config import MailgunApiConfig
from .outcome import AttemptResult, Reply, Stage

MAX_TEXT = 300  # of Mailgun's message kept in a reply: it ends up in logs and the queue


def make_tls_context(config: MailgunApiConfig) -> ssl.SSLContext:
    """System CAs plus ca_file, verified; verification off only if the config says so."""
    context = ssl.create_default_context()
    if config.ca_file is not None:
        context.load_verify_locations(cafile=str(config.ca_file))
    if not config.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True)
class DomainCheck:
    """What `relay check` learnt of the sending domain: `refused` tells a key or domain
    that Mailgun refused (exit 77) from an API that could not be asked (exit 69)."""

    ok: bool
    detail: str
    cause: str = ""
    refused: bool = False


class MailgunApi:
    """One upstream's HTTP client, shared by every delivery to it: up to `connections`
    requests at once over kept-alive HTTPS connections."""

    def __init__(self, config: MailgunApiConfig) -> None:
        self.config = config
        self._client = httpx.AsyncClient(
            base_url=config.api_url,
            auth=httpx.BasicAuth("api", config.api_key or ""),
            verify=make_tls_context(config),
            timeout=httpx.Timeout(config.timeout),
            limits=httpx.Limits(max_connections=config.connections,
                                max_keepalive_connections=config.connections),
        )

    async def deliver(self, sender: str, recipients: list[str], content: bytes,
                      smtputf8: bool) -> AttemptResult:
        """Send `content` to `recipients`: the SMTP session's signature, so delivery calls
        either alike. `sender` and `smtputf8` mean nothing to the API, which sends from
        Mailgun's bounce address and takes any address it can parse."""
        try:
            response = await self._client.post(
                f"/v3/{self.config.domain}/messages.mime", data={"to": recipients},
                files={"message": ("message.eml", content, "message/rfc822")})
        except httpx.HTTPError as exc:
            return AttemptResult(self.config.name, error=_failure(exc), stage=_stage(exc))
        return result_of(self.config.name, response.status_code, response.content, recipients)

    async def check_domain(self) -> DomainCheck:
        """`relay check`: an authenticated GET of the domain; nothing is sent."""
        domain = self.config.domain
        try:
            response = await self._client.get(f"/v3/domains/{domain}")
        except httpx.HTTPError as exc:
            return DomainCheck(False, str(_failure(exc)), cause=_unreachable(self.config, exc))
        status, said = response.status_code, _said(response.content)
        if status == 200:
            state = _field(response.content, "domain", "state")
            return DomainCheck(True, f"200 {domain}" + (f", state {state}" if state else ""))
        detail = f"{status} {said}"
        if status in (401, 403):
            return DomainCheck(False, detail, refused=True, cause=(
                f"the API key was refused: check api_key_env or api_key_file of upstream "
                f"{self.config.name} (Mailgun: Sending > Domain settings > Sending API keys)"))
        if status == 404:
            return DomainCheck(False, detail, refused=True, cause=(
                f"Mailgun does not know the domain {domain} for this key: check domain, "
                "and api_url (https://api.eu.mailgun.net for domains in the EU region)"))
        return DomainCheck(False, detail, cause="the API did not answer as it should; try "
                           "again later, or see Mailgun's status page")

    async def close(self) -> None:
        await self._client.aclose()


def result_of(relay: str, status: int, body: bytes, recipients: list[str]) -> AttemptResult:
    """The attempt's result from Mailgun's status and body (see the module's table)."""
    said = _said(body)
    if 200 <= status < 300:
        message_id = _field(body, "id")
        sent = Reply(250, _clip(f"2.0.0 {said} {message_id or '(no id given)'}"))
        return AttemptResult(relay, recipients=dict.fromkeys(recipients, sent))
    http = f"Mailgun API HTTP {status}: {said}"
    if status == 400:
        return AttemptResult(relay, error=Reply(554, _clip(f"5.6.0 {http}")), stage=Stage.DATA)
    if status == 413:
        return AttemptResult(relay, error=Reply(552, _clip(f"5.3.4 {http}")), stage=Stage.DATA)
    if status in (401, 403):
        return AttemptResult(relay, error=Reply(535, _clip(f"5.7.8 {http}")), stage=Stage.AUTH)
    if status == 404:
        return AttemptResult(relay, error=Reply(550, _clip(f"5.7.1 {http}")), stage=Stage.AUTH)
    if status == 429:
        return AttemptResult(relay, error=Reply(451, _clip(f"4.7.0 {http}")),
                             stage=Stage.SESSION)
    return AttemptResult(relay, error=Reply(451, _clip(f"4.3.0 {http}")), stage=Stage.SESSION)


def _failure(exc: httpx.HTTPError) -> Reply:
    """The error without an HTTP answer, in the words relay.smtp_client uses for SMTP."""
    text = _one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, httpx.ConnectTimeout):
        return Reply(None, f"timed out: connecting to the Mailgun API: {text}")
    if isinstance(exc, httpx.ReadTimeout):
        return Reply(None, "timed out: no reply from the Mailgun API; it may have sent the "
                           "message")
    if isinstance(exc, httpx.TimeoutException):
        return Reply(None, f"timed out: the request did not go out: {text}")
    if _is_tls(exc):
        return Reply(None, f"TLS failure: {text}")
    return Reply(None, f"connection failed: {text}")


def _stage(exc: httpx.HTTPError) -> Stage:
    """SESSION (trips the breaker) when the API could not be reached; DATA when the
    request may have reached it, or failed on a connection already in use."""
    return Stage.SESSION if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)) \
        else Stage.DATA


def _unreachable(config: MailgunApiConfig, exc: httpx.HTTPError) -> str:
    if _is_tls(exc):
        return (f"certificate not trusted or not for {config.address}; set ca_file for a "
                "private CA, and check api_url")
    return (f"cannot reach {config.api_url}: check api_url, and that outbound HTTPS to it "
            "is allowed (or HTTPS_PROXY set)")


def _is_tls(exc: BaseException) -> bool:
    """An ssl.SSLError anywhere in the chain: httpx wraps httpcore's error, which wraps it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _said(body: bytes) -> str:
    """Mailgun's `message`, or the body itself (its 401 is plain text: Forbidden)."""
    return _field(body, "message") or _clip(body.decode("utf-8", "replace")) or "(no text)"


def _field(body: bytes, *path: str) -> str:
    """A string at `path` in a JSON body, one line; "" if the body or the field is not."""
    try:
        value: Any = json.loads(body)
    except ValueError:
        return ""
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return _clip(value) if isinstance(value, str) else ""


def _clip(text: str) -> str:
    """Mailgun's text (decoded JSON, so no bytes to show as \\xNN, unlike link.printable),
    on one line and bounded; logs and `relay queue` escape it as any reply (relay.text)."""
    text = _one_line(text)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())
