"""The spool: the only code that touches queue files.

Layout (Postfix's queue names, Maildir's publishing rule)::

    spool/
      lock        flock()ed by the one `relay serve` that owns the spool
      tmp/        entries and state records being written, and the files of delivered
                  entries kept to be written over by new ones; debris after a crash
      incoming/   complete, never attempted: due now
      active/     claimed by a delivery worker (returned to incoming/ by recover())
      deferred/   waiting; the file's mtime is the next attempt time (as in Postfix)
      scheduled/  not to be sent before a time a client or an operator asked for; the
                  file's mtime is that time, as deferred/'s is the next attempt's
      hold/       never attempted until released
      failed/     permanent failure or expired; kept until deleted
      corrupt/    entries that could not be parsed, moved aside for the operator
      state/      one JSON record per entry that has been attempted or rescheduled
                  (recipient status, attempt history, last error, send time), replaced
                  atomically; it stays put while the message file moves between queues,
                  like Postfix's defer/ logs
      wake/       an empty file per entry an operator moved into scheduled/, so that a
                  running daemon learns its new time; read and removed by the daemon
      history/    the delivery journal (relay.history), one file per day

A message file is immutable once published. Whoever renames a file into active/ owns the
entry until it renames it out; every other writer finds the file gone and backs off. A
file whose name is not a queue ID is not ours: listings skip it and report it once. The
spool knows nothing of SMTP, asyncio or policy.

Which calls may run on the event loop: each public method is marked `@loop_safe` (no
fsync, a handful of system calls: the loop makes them, as delivery does its claims and
small reads) or `@blocking` (an fsync, or work that grows with the queue: from a thread,
or from a command that has no loop). relay.spool.marks defines the two, and
tests/test_spool_marks.py keeps every public method marked.

The parts, one module each:

- formats: the message file and the state record as pure functions; queue IDs.
- files: the low-level file operations (no symlinks followed, fsync once, directory
  fsyncs shared by their callers, reads without access times).
- layout: the directories, the lock, free space, paths (the base of Spool).
- reading: loading entries and their contents, listings, counts, due times.
- transitions: the renames between queues, with their state records, for delivery,
  for operators and at start-up.
- ingest: the spool writer's part (relay.writer): storing in batches, drafts, and the
  reuse of delivered entries' files.
"""

from __future__ import annotations

from .files import OPEN_NEW, OPEN_READ, OPEN_SPARE
from .formats import (
    HEADER_READ,
    ID_PATTERN,
    MAGIC,
    MAX_HEADER_BYTES,
    SIZE_FIELD,
    arrival_of,
    envelope_head,
    is_unsafe_address,
    is_valid_id,
    new_id,
)
from .ingest import SPARES, Draft, Ingest
from .layout import ALL_DIRS, QUEUE_DIRS, RETRY, UPSTREAMS_FILE
from .marks import blocking, loop_safe
from .transitions import Transitions

__all__ = [
    "ALL_DIRS", "HEADER_READ", "ID_PATTERN", "MAGIC", "MAX_HEADER_BYTES", "OPEN_NEW",
    "OPEN_READ", "OPEN_SPARE", "QUEUE_DIRS", "RETRY", "SIZE_FIELD", "SPARES",
    "UPSTREAMS_FILE", "Draft", "Spool", "arrival_of", "blocking", "envelope_head",
    "is_unsafe_address", "is_valid_id", "loop_safe", "new_id",
]


class Spool(Transitions, Ingest):
    """One spool directory: Spool(path, min_free).open(), then lock() for the daemon.
    Its methods come from the parts the module's docstring lists."""
