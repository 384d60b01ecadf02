"""How the delivery history and the stats look to people (text) and to machines (JSON).

Pure formatting, as relay.views is for the queue: every string from the outside is
escaped, and with `redact` (log.redact_addresses) addresses are shown as j***@example.com.
"""

from __future__ import annotations

from typing import Any

from .history import Record
from .redact import redact_address, redact_text
from .stats import Delay, Stats
from .text import escape
from .views import iso

_COLUMNS = (("TIME", 20), ("STATUS", 7), ("ID", 21), ("FROM", 26), ("TO", 26), ("DELAY", 8),
            ("ATT", 3), ("RELAY", 22), ("REPLY", 0))


def record_json(record: Record, redact: bool) -> dict[str, Any]:
    """One history record: times as ISO 8601 UTC, as in `relay queue --json`."""
    return {
        "at": iso(record.at), "status": record.status, "id": record.id,
        "message_id": record.message_id,
        "from": redact_address(record.sender) if redact else record.sender,
        "to": redact_address(record.recipient) if redact else record.recipient,
        "size": record.size, "arrived": iso(record.arrived), "send_at": iso(record.send_at),
        "delay": record.delay, "attempts": record.attempts, "relay": record.relay,
        "reply": _reply(record.reply, redact),
    }


def history_table(records: list[Record], redact: bool) -> str:
    """One line per record, oldest first, and a count."""
    if not records:
        return "No matching records in the delivery history"
    lines = [_row([name for name, _ in _COLUMNS])]
    for r in records:
        sender = redact_address(r.sender) if redact else r.sender
        recipient = redact_address(r.recipient) if redact else r.recipient
        lines.append(_row([iso(r.at) or "", r.status, r.id, f"<{sender}>", recipient,
                           f"{r.delay:.2f}s", str(r.attempts), r.relay or "",
                           _reply(r.reply, redact) or ""]))
    noun = "record" if len(records) == 1 else "records"
    lines.append(f"-- {len(records)} {noun}")
    return "\n".join(lines)


def stats_json(stats: Stats, redact: bool) -> dict[str, Any]:
    return {
        "since": iso(stats.since), "until": iso(stats.now), "received": stats.received,
        "sent": stats.sent, "deferred_attempts": stats.deferred_attempts,
        "failed": stats.failed, "expired": stats.expired, "deleted": stats.deleted,
        "delay": _delay_json(stats.delay),
        "top_failures": [{"reply": _reply(reply, redact), "count": count}
                         for reply, count in stats.top_failures],
        "upstreams": {name: {"sent": u.sent, "failed": u.failed, "expired": u.expired,
                             "delay": _delay_json(u.delay)}
                      for name, u in sorted(stats.upstreams.items())},
        "queue": stats.queue,
        "oldest": None if stats.oldest is None else
        {"id": stats.oldest[0], "arrived": iso(stats.oldest[1])},
    }


def stats_text(stats: Stats, redact: bool) -> str:
    lines = [
        f"since {iso(stats.since)} ({_age(stats.now - stats.since)})",
        f"received        {stats.received}",
        f"sent            {stats.sent}",
        f"deferred        {stats.deferred_attempts} attempts",
        f"failed          {stats.failed}",
        f"expired         {stats.expired}",
    ]
    if stats.deleted:
        lines.append(f"deleted         {stats.deleted}")
    lines.append(f"delay           {_delay_text(stats.delay)}")
    if stats.top_failures:
        lines.append("top failure replies:")
        lines += [f"  {count:>6}  {escape(_reply(reply, redact) or '')}"
                  for reply, count in stats.top_failures]
    if stats.upstreams:
        lines.append("per upstream:")
        for name, u in sorted(stats.upstreams.items()):
            lines.append(f"  {escape(name)}  sent {u.sent}, failed {u.failed}, expired "
                         f"{u.expired}, delay {_delay_text(u.delay)}")
    queue = ", ".join(f"{count} {state}" for state, count in stats.queue.items())
    lines.append(f"queue           {queue}")
    if stats.oldest is not None:
        entry_id, arrived = stats.oldest
        lines.append(f"oldest          {entry_id}, arrived {iso(arrived)} "
                     f"({_age(stats.now - arrived)} ago)")
    return "\n".join(lines)


def _delay_json(delay: Delay | None) -> dict[str, float] | None:
    if delay is None:
        return None
    return {"p50": delay.p50, "p95": delay.p95, "p99": delay.p99, "max": delay.max}


def _delay_text(delay: Delay | None) -> str:
    if delay is None:
        return "-"
    return f"p50 {delay.p50:.2f}s, p95 {delay.p95:.2f}s, p99 {delay.p99:.2f}s, max {delay.max:.2f}s"


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _reply(reply: str | None, redact: bool) -> str | None:
    return redact_text(reply) if redact and reply is not None else reply


def _row(cells: list[str]) -> str:
    parts = []
    for (name, width), cell in zip(_COLUMNS, cells, strict=True):
        text = escape(cell)
        if name in ("DELAY", "ATT"):
            parts.append(text.rjust(width))
        elif width:
            parts.append((text if len(text) <= width else text[:width - 1] + "…").ljust(width))
        else:
            parts.append(text)
    return "  ".join(parts).rstrip()
