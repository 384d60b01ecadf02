"""Log events, one line each, queue ID first, in Postfix's words; as text or JSON.

    3F2A...: to=<bob@example.com>, relay=smtp.mailgun.org:587, delay=0.41, attempt=1,
        status=sent (250 2.0.0 Ok)

Values are escaped (relay.text) so an envelope address or an upstream reply can never
start a new log line. Secrets never reach this module: nothing logs the config's password. With
`log.redact_addresses`, addresses are shown as j***@example.com (relay.redact): the
sender and recipient fields, and any address inside another text field.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from .config import LogConfig
from .redact import redact_address, redact_text
from .text import escape

logger = logging.getLogger("relay")
_ADDRESS_FIELDS = ("from", "to")
_NOT_ADDRESSES = ("message-id",)  # an identifier, not a person: left as it is
_redacting = False  # log.redact_addresses, set by setup_logging


def log_event(level: int, queue_id: str | None, **fields: Any) -> None:
    """Log one event. `reply` is shown after `status` in parentheses, as Postfix does."""
    if _redacting:
        fields = redacted(fields)
    logger.log(level, "%s", _render_text(queue_id, fields),
               extra={"queue_id": queue_id, "fields": fields})


def redacted(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields with every address in them shown as j***@example.com."""
    return {key: redact_address(value) if key in _ADDRESS_FIELDS and isinstance(value, str)
            else redact_text(value) if isinstance(value, str) and key not in _NOT_ADDRESSES
            else value for key, value in fields.items()}


def log_failure(level: int, queue_id: str | None, exc: BaseException, **fields: Any) -> None:
    """log_event with the traceback of `exc` (escaped onto the same line in text)."""
    logger.log(level, "%s", _render_text(queue_id, fields), exc_info=exc,
               extra={"queue_id": queue_id, "fields": fields})


def setup_logging(config: LogConfig, stream: Any = None) -> None:
    """Route the relay's (and its libraries') logs to stderr in the configured format."""
    global _redacting  # noqa: PLW0603 - one process-wide setting, read by every event line
    _redacting = config.redact_addresses
    handler = logging.StreamHandler(stream or sys.stderr)
    # journald stamps every line itself; a second timestamp is noise (systemd.exec(5)).
    with_time = not os.environ.get("JOURNAL_STREAM")
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter(with_time))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    # aiosmtpd narrates every command at INFO and every unknown one at WARNING; the
    # listener logs what matters in the relay's own words, so its lines are for debugging.
    logging.getLogger("mail.log").setLevel(
        logging.DEBUG if config.level == "debug" else logging.ERROR)
    # httpx logs each Mailgun API request at INFO, beside the relay's own delivery line.
    logging.getLogger("httpx").setLevel(
        logging.DEBUG if config.level == "debug" else logging.WARNING)
    # Neither format shows the caller, thread or process, so logging need not look them up
    # for each record (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


class TextFormatter(logging.Formatter):
    def __init__(self, with_time: bool) -> None:
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += " | " + escape(self.formatException(record.exc_info))
        prefix = f"{record.levelname.lower()}: "
        if self.with_time:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            prefix = f"{stamp}.{int(record.msecs):03d}Z {prefix}"
        return prefix + escape(text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if hasattr(record, "fields"):
            queue_id = getattr(record, "queue_id", None)
            if queue_id:
                data["queue_id"] = queue_id
            data.update(record.fields)
        else:
            data["message"] = record.getMessage()
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def _render_text(queue_id: str | None, fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        if key == "reply":
            continue
        if key in _ADDRESS_FIELDS:
            parts.append(f"{key}=<{value}>")
        elif key == "status" and fields.get("reply"):
            parts.append(f"status={value} ({fields['reply']})")
        else:
            parts.append(f"{key}={value}")
    body = ", ".join(parts)
    return f"{queue_id}: {body}" if queue_id else body
