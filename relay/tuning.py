"""Where the relay trades latency against throughput and memory: every such heuristic of
the listener and delivery, in one place.

The listener and delivery share one event loop, and a client waits for each of its
replies while the loop runs whatever else is ready; the slowest step of a message is
the disk's fsync. So the loop's time goes to the sessions first. A message the listener
has just stored is delivered from memory, not read back (`keep_fresh`, FRESH_BYTES);
small contents are read on the loop itself, since a hop to a thread costs more and
contends for the GIL with the sessions (`read_inline`), while large ones and the state
records' fsyncs go to a pool of threads (SPOOL_THREADS) where they cannot stall every
session; and with a few sessions open, delivery starts when their stores begin waiting
for the disk, or after LISTENER_QUIET_WAIT (`yield_to_listener`, through relay.writer's
SpoolWriter.disk_wait, which stays with the writer). The price: memory bounded by
FRESH_BYTES, plus SPILL_BYTES per session before a message goes to its file as it
arrives; and a delivery a few milliseconds later when clients are idle. The spool's own
batching (one directory fsync for the stores of a pass, delivered files reused) is
relay.writer's and relay.spool's. The measurements behind these figures are in
docs/BENCHMARKS.md.
"""

from __future__ import annotations

# A message larger than this goes to its spool file as it arrives rather than into memory
# (relay.listener), so that memory does not grow with message size times sessions.
SPILL_BYTES = 1024 * 1024
# Contents up to this size are read on the event loop (a few small reads, no fsync);
# larger ones in a thread.
INLINE_READ_BYTES = 256 * 1024
# Messages just stored, each no larger than INLINE_READ_BYTES, are kept in memory for
# their first attempt up to this much in all: during an outage or a backlog the rest are
# read back from the spool.
FRESH_BYTES = 16 * 1024 * 1024
# With 1 to QUIET_SESSIONS client sessions open, a delivery waits for their stores' fsyncs
# to begin, at most LISTENER_QUIET_WAIT seconds. With more, the loop is seldom idle and
# the wait only adds to its work.
QUIET_SESSIONS = 4
LISTENER_QUIET_WAIT = 0.005
# Threads for the spool's blocking calls (state records, large reads): enough for many
# delivery workers at once, so that the disk sees their fsyncs together; with the loop's
# and the writer's, well under the unit's TasksMax=64 (config/relay.service).
SPOOL_THREADS = 32


def keep_fresh(size: int, kept: int) -> bool:
    """Whether a message of `size` bytes just stored is kept in memory for its first
    attempt, with `kept` bytes of others kept already."""
    return size <= INLINE_READ_BYTES and kept + size <= FRESH_BYTES


def read_inline(size: int) -> bool:
    """Whether a message's content is read on the event loop rather than in a thread."""
    return size <= INLINE_READ_BYTES


def yield_to_listener(client_sessions: int) -> bool:
    """Whether a delivery first waits for the listener's stores to reach the disk
    (SpoolWriter.disk_wait(LISTENER_QUIET_WAIT)): while a few sessions are open."""
    return 0 < client_sessions <= QUIET_SESSIONS
