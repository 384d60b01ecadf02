"""A stand-in for Mailgun's HTTP API: a real HTTPS server on 127.0.0.1, a free port.

It serves `POST /v3/{domain}/messages.mime` and `GET /v3/domains/{domain}` over HTTP/1.1
with a certificate from the tests' trustme CA. It checks Basic auth (`api:<key>`), parses
the multipart/form-data body itself (strictly: a client's encoding mistake fails the
test), and records every request and every message it accepted. It can be scripted:
`replies` (status and body for the next requests, e.g. 401, 429, 500) and `delay`
(seconds before answering: a slow API).
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

API_KEY = "key-Mailgun-Stand-In-7f3a9c"
API_KEY_ENV = "RELAY_TEST_MAILGUN_API_KEY"
DOMAIN = "mg.example.com"
_MIME_PATH = re.compile(r"^/v3/([^/]+)/messages\.mime$")
_DOMAIN_PATH = re.compile(r"^/v3/domains/([^/]+)$")
_DISPOSITION = re.compile(r'^form-data; name="([^"]+)"(?:; filename="([^"]*)")?$')


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    content_type: str | None
    content: bytes


@dataclass(frozen=True)
class Received:
    """A message the stand-in accepted: its domain, `to` fields and `message` file."""

    domain: str
    to: tuple[str, ...]
    message: bytes
    parts: tuple[Part, ...]


class MailgunStandIn:
    def __init__(self, context: ssl.SSLContext, *, key: str = API_KEY,
                 domains: tuple[str, ...] = (DOMAIN,)) -> None:
        self.context = context
        self.key = key
        self.domains = domains
        self.replies: list[tuple[int, Any]] = []  # (status, JSON value or text) to answer next
        self.delay = 0.0
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.authorizations: list[str] = []  # every Authorization header, as sent
        self.received: list[Received] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = _Server(self)
        self.port = self._server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        # A short poll interval: shutdown() waits for the loop to notice it.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,),
                                        daemon=True)

    def start(self) -> MailgunStandIn:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()  # ends any scripted delay at once
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def upstream_entry(self, ca_file: Path | None, **keys: Any) -> dict[str, Any]:
        """An `upstreams:` entry of a relay config for this stand-in, the key from the
        environment (conftest's run_cli and RelayProcess set API_KEY_ENV)."""
        entry = {"name": "mailgun-api", "transport": "mailgun-api", "api_url": self.url,
                 "domain": DOMAIN, "api_key_env": API_KEY_ENV, "timeout": "5s"}
        if ca_file is not None:
            entry["ca_file"] = str(ca_file)
        return {**entry, **keys}

    def script(self, *replies: tuple[int, Any]) -> None:
        with self._lock:
            self.replies.extend(replies)

    # --- called from the server's threads --------------------------------------------

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        with self._lock:
            self.requests.append((method, path))
            self.authorizations.append(headers.get("Authorization", ""))
            scripted = self.replies.pop(0) if self.replies else None
        if self.delay:
            self._closing.wait(self.delay)
        if scripted is not None:
            return scripted
        expected = "Basic " + base64.b64encode(f"api:{self.key}".encode()).decode()
        if headers.get("Authorization") != expected:
            return 401, "Forbidden"  # what Mailgun answers: plain text
        mime, domain_get = _MIME_PATH.match(path), _DOMAIN_PATH.match(path)
        domain = (mime or domain_get).group(1) if mime or domain_get else ""
        if method == "POST" and mime:
            try:
                return self._accept(domain, headers, body)
            except AssertionError as flaw:  # the client's encoding: fails the test's request
                return 400, {"message": f"stand-in: malformed request: {flaw}"}
        if method == "GET" and domain_get:
            if domain not in self.domains:
                return 404, {"message": "Domain not found"}
            return 200, {"domain": {"name": domain, "state": "active"},
                         "receiving_dns_records": [], "sending_dns_records": []}
        return 404, {"message": "Not Found"}

    def _accept(self, domain: str, headers: Any, body: bytes) -> tuple[int, Any]:
        if domain not in self.domains:
            return 404, {"message": f"Domain not found: {domain}"}
        parts = parse_form(headers.get("Content-Type", ""), body)
        to = tuple(p.content.decode() for p in parts if p.name == "to")
        messages = [p for p in parts if p.name == "message"]
        if not to or len(messages) != 1 or messages[0].filename is None:
            return 400, {"message": "'to' and a 'message' file are required"}
        with self._lock:
            self.received.append(Received(domain, to, messages[0].content, tuple(parts)))
            number = len(self.received)
        return 200, {"id": f"<20261205120000.{number}@{domain}>",
                     "message": "Queued. Thank you."}


def parse_form(content_type: str, body: bytes) -> list[Part]:
    """multipart/form-data (RFC 7578) as sent, part by part; AssertionError on any flaw."""
    match = re.fullmatch(r'multipart/form-data; boundary="?([^";]+)"?', content_type)
    assert match, f"not multipart/form-data: {content_type!r}"
    delimiter = b"--" + match.group(1).encode()
    assert body.startswith(delimiter + b"\r\n"), "the body does not open with the boundary"
    assert body.endswith(delimiter + b"--\r\n"), "the body does not end with the close"
    chunks = body[:-len(delimiter) - 4].split(b"\r\n" + delimiter + b"\r\n")
    chunks[0] = chunks[0][len(delimiter) + 2:]
    chunks[-1] = chunks[-1].removesuffix(b"\r\n")
    parts = []
    for chunk in chunks:
        head, separator, content = chunk.partition(b"\r\n\r\n")
        assert separator, "a part without a blank line after its headers"
        fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        disposition = _DISPOSITION.match(fields.get("Content-Disposition", ""))
        assert disposition, f"a part without a form-data name: {fields}"
        parts.append(Part(disposition.group(1), disposition.group(2),
                          fields.get("Content-Type"), content))
    return parts


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, stand_in: MailgunStandIn) -> None:
        self.stand_in = stand_in
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs in the connection's own thread, not the accepting one.
        self.stand_in.connections += 1
        with self.stand_in.context.wrap_socket(request, server_side=True) as tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (a timeout, an untrusted certificate) is no error here."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Mailgun's API
    server: _Server

    def do_POST(self) -> None:
        self._serve("POST")

    def do_GET(self) -> None:
        self._serve("GET")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length) if length else b""
        status, value = self.server.stand_in.answer(method, self.path, self.headers, body)
        payload = value.encode() if isinstance(value, str) else json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(value, str)
                         else "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read what was recorded, not a log."""
