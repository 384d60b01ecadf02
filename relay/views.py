"""How queue entries look to people (mailq-style table, `show`) and to machines (JSON).

Pure formatting of `Entry` values; every string from the outside (addresses, headers,
replies) is escaped (relay.text) so a control character can never act on the operator's
terminal.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from typing import Any

from .entry import Entry, Queue
from .headers import fields, split_header
from .text import escape

STATES = tuple(q.state for q in Queue)
_COLUMNS = (("ID", 21), ("SIZE", 6), ("ARRIVED", 20), ("STATE", 9), ("ATT", 3),
            ("NEXT ATTEMPT", 20), ("SENDER", 24), ("RECIPIENTS", 28), ("LAST ERROR", 0))
LAST_ERROR_WIDTH = 60


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return _iso_second(int(timestamp))


@functools.lru_cache(maxsize=4096)
def _iso_second(second: int) -> str:
    # Cached by the second: a listing formats two times per entry, and entries that
    # arrived in one burst share them. time.gmtime, which is cheaper than datetime.
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


def entry_json(entry: Entry) -> dict[str, Any]:
    """The JSON fields of a queued message (docs/CONTRACT.md)."""
    return {
        "id": entry.id,
        "size": entry.size,
        "arrived": iso(entry.arrived),
        "state": entry.state,
        "attempts": len(entry.attempts),
        "next_attempt": iso(entry.next_attempt) if entry.queue is Queue.DEFERRED else None,
        "send_at": iso(entry.send_at),
        "sender": entry.sender,
        "recipients": [{"address": r.address, "status": r.status.value, "reply": r.reply}
                       for r in entry.recipients],
        "last_error": entry.last_error,
    }


def detail_json(entry: Entry, content: bytes, with_body: bool) -> dict[str, Any]:
    """`relay queue show --json`: the listing fields plus the envelope as received (when
    address rules rewrote it), headers and every attempt."""
    head, body = split_header(content)
    headers = fields(head)
    data = entry_json(entry)
    data["original_sender"] = entry.original_sender
    data["original_recipients"] = (None if entry.original_recipients is None
                                   else list(entry.original_recipients))
    data["headers"] = [{"name": name, "value": value} for name, value in headers]
    data["attempt_history"] = [{"at": iso(a.at), "relay": a.relay, "reply": a.reply,
                                "duration": a.duration} for a in entry.attempts]
    if with_body:
        data["body"] = body.decode("utf-8", errors="replace")
    return data


def table(entries: list[Entry], corrupt: int) -> str:
    """The mailq-style listing with a summary line last."""
    if not entries:
        tail = f" ({corrupt} corrupt entries in spool/corrupt/)" if corrupt else ""
        return f"Mail queue is empty{tail}"
    lines = [_row([name for name, _ in _COLUMNS])]
    for entry in entries:
        recipients = entry.recipients[0].address + (
            f" +{len(entry.recipients) - 1}" if len(entry.recipients) > 1 else "")
        lines.append(_row([
            entry.id, human_size(entry.size), iso(entry.arrived) or "", entry.state,
            str(len(entry.attempts)), _next_attempt(entry),
            f"<{entry.sender}>", recipients,
            _shorten(entry.last_error or "", LAST_ERROR_WIDTH),
        ]))
    lines.append(summary(entries, corrupt))
    return "\n".join(lines)


def _next_attempt(entry: Entry) -> str:
    """A deferred entry's retry time; a scheduled one's send time."""
    if entry.queue is Queue.DEFERRED:
        return iso(entry.next_attempt) or ""
    if entry.queue is Queue.SCHEDULED:
        return iso(entry.send_at) or ""
    return ""


def upstream_lines(states: dict[str, Any], now: float) -> list[str]:
    """The running daemon's view of its upstreams (Spool.upstream_states), a line each:
    `-- upstream mailgun-us: down for 42s (connection failed: ...)`."""
    return [f"-- upstream {escape(name)}: {upstream_state(state, now)}"
            for name, state in states.items()]


def upstream_state(state: Any, now: float) -> str:
    """One upstream's state as the daemon published it: up, probing, or down or paused
    for so long, and why."""
    if not isinstance(state, dict):
        return "unknown"
    what = str(state.get("state", "up"))
    until = state.get("until")
    if what in ("down", "paused") and isinstance(until, (int, float)):
        what += f" for {max(until - now, 0.0):.0f}s ({state.get('reason', '')})"
    return escape(what)


def summary(entries: list[Entry], corrupt: int) -> str:
    counts = Counter(e.state for e in entries)
    total = sum(e.size for e in entries)
    per_state = ", ".join(f"{counts[s]} {s}" for s in STATES)
    noun = "message" if len(entries) == 1 else "messages"
    line = f"-- {len(entries)} {noun}, {human_size(total)}: {per_state}"
    return line + (f"; {corrupt} corrupt" if corrupt else "")


def show(entry: Entry, content: bytes, with_body: bool) -> str:
    """`relay queue show`: envelope, per-recipient status, attempts, headers (and body)."""
    head, body = split_header(content)
    headers = fields(head)
    lines = [
        f"ID:           {entry.id}",
        f"State:        {entry.state}",
        f"Arrived:      {iso(entry.arrived)}",
        f"Size:         {entry.size} bytes",
        f"Sender:       <{escape(entry.sender)}>" + (
            "" if entry.original_sender is None
            else f" (rewritten from <{escape(entry.original_sender)}>)"),
    ]
    if entry.send_at is not None:
        lines.append(f"Send at:      {iso(entry.send_at)}")
    if entry.queue is Queue.DEFERRED and entry.next_attempt is not None:
        lines.append(f"Next attempt: {iso(entry.next_attempt)}")
    if entry.last_error:
        lines.append(f"Last error:   {escape(entry.last_error)}")
    width = max(len(escape(r.address)) for r in entry.recipients)
    lines.append("Recipients:" + (
        "" if entry.original_recipients is None else "   (rewritten from "
        + ", ".join(escape(a) for a in entry.original_recipients) + ")"))
    lines += [f"  {escape(r.address):<{width}}  {r.status.value:<7}  {escape(r.reply or '')}"
              .rstrip() for r in entry.recipients]
    lines.append(f"Attempts:     {len(entry.attempts)}")
    lines += [f"  {iso(a.at)}  {escape(a.relay)}  {a.duration:.2f}s  {escape(a.reply)}"
              for a in entry.attempts]
    lines.append("Headers:")
    lines += [f"  {escape(name)}: {escape(value)}" for name, value in headers]
    if with_body:
        lines += ["", escape(body.decode("utf-8", errors="replace"), keep_newlines=True)]
    return "\n".join(lines)


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size}B"
    for unit, scale in (("K", 1 << 10), ("M", 1 << 20)):
        if size < scale << 10:
            return f"{size / scale:.1f}{unit}"
    return f"{size / (1 << 30):.1f}G"


def _row(cells: list[str]) -> str:
    parts = []
    for (name, width), cell in zip(_COLUMNS, cells, strict=True):
        if name in ("SIZE", "ATT"):
            parts.append(cell.rjust(width))
        elif width:
            parts.append(_shorten(cell, width).ljust(width))
        else:
            parts.append(escape(cell))
    return "  ".join(parts).rstrip()


def _shorten(text: str, width: int) -> str:
    text = escape(text)
    return text if len(text) <= width else text[:width - 1] + "…"
