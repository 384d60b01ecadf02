"""The spool: the only code that touches queue files.

Layout (Postfix's queue names, Maildir's publishing rule)::

    spool/
      lock        flock()ed by the one `relay serve` that owns the spool
      tmp/        entries and state records being written, and the emptied files of
                  delivered entries kept for new ones; debris after a crash
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

A message file is immutable once published: a magic line, one line of JSON envelope, then
the content. Whoever renames a file into active/ owns the entry until it renames it out;
every other writer finds the file gone and backs off. This module knows nothing of SMTP,
asyncio or policy; its methods block and are called from worker threads.

A file whose name is not a queue ID (or one whose ID is in two queues) is not ours: every
listing skips it and tells `on_foreign` once, and nothing moves or deletes it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from ..entry import Entry, NewEntry, Queue, Recipient
from ..errors import (
    SpoolError,
    SpoolFull,
)
from ..faults import fault_point
from .files import (
    OPEN_NEW,
    OPEN_READ,
    OPEN_SPARE,
    create,
    failed_write_removes,
    fsync_once,
    overwrite,
    set_mtime,
    unlink_quietly,
    write_all,
)
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
    size_field,
    size_field_at,
)
from .layout import (
    ALL_DIRS,
    QUEUE_DIRS,
    RETRY,
    UPSTREAMS_FILE,
)
from .transitions import Transitions

__all__ = [
    "ALL_DIRS", "HEADER_READ", "ID_PATTERN", "MAGIC", "MAX_HEADER_BYTES", "OPEN_NEW",
    "OPEN_READ", "OPEN_SPARE", "QUEUE_DIRS", "RETRY", "SIZE_FIELD", "SPARES",
    "UPSTREAMS_FILE", "Draft", "Spool", "arrival_of", "envelope_head", "is_unsafe_address",
    "is_valid_id", "new_id",
]

# A delivered entry's file is kept in tmp/ for a new entry, up to this many, rather than
# unlinked: see Spool.remove.
SPARES = 64


class Draft:
    """A new entry's file in tmp/, written as its content arrives; Spool.store_many
    finishes and publishes it like any other. Its writes go to the page cache, so they may
    run on the event loop; a failed write raises SpoolFull or SpoolError, and the draft is
    then discarded."""

    def __init__(self, path: str, fd: int, head_size: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self._head_size = head_size
        self.size = 0  # content written so far

    def write(self, parts: list[bytes]) -> None:
        assert self._fd is not None
        fd, self._fd = self._fd, None  # _write_all closes it if it fails
        with failed_write_removes(self.path):
            write_all(fd, parts)
        self._fd = fd
        self.size += sum(len(part) for part in parts)

    def finish(self) -> int:
        """Write the size into the envelope and cut the file to its length (it may be a
        reused one); return the descriptor for the fsync. Blocks: the writer thread's."""
        assert self._fd is not None
        fd, self._fd = self._fd, None
        with failed_write_removes(self.path):
            try:
                os.pwrite(fd, size_field(self.size), size_field_at(self._head_size))
                os.ftruncate(fd, self._head_size + self.size)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def discard(self) -> None:
        """Give the draft up: nothing of it stays."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        unlink_quietly(self.path)


class Spool(Transitions):
    def __init__(self, path: Path, min_free: int = 0) -> None:
        super().__init__(path, min_free)
        # Delivered entries' files in tmp/, each to become a new entry's file (remove,
        # _write_tmp). Whichever thread stores and removes uses them; list.pop and append
        # are atomic.
        self._spares: list[str] = []
        self.spares_hold_mail = False  # whether any may still hold a delivered message

    # --- ingest -------------------------------------------------------------------------

    def store(self, entry_id: str, sender: str, recipients: list[str], parts: list[bytes],
              arrived: float, smtputf8: bool) -> Entry:
        """Publish one new entry durably and return it; only then may the client hear 250."""
        new = NewEntry(entry_id, sender, tuple(recipients), tuple(parts), arrived, smtputf8)
        result = self.store_many([new])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def store_many(self, batch: list[NewEntry],
                   syncing: Callable[[], None] = lambda: None) -> list[Entry | Exception]:
        """Publish new entries durably; for each, its Entry, or the exception that kept it
        out of the queue (SpoolFull, SpoolError, or a bug's). Only an Entry may hear 250.
        `syncing` is called as the fsyncs begin, once every file is written.

        The order is what makes it crash-safe: each complete file is written and fsynced
        under tmp/, then renamed into incoming/ (or, with a send_at, into scheduled/ with
        that time as its mtime, set before the fsync), then the directory itself is
        fsynced so the new names survive a power cut. A crash before a rename leaves only tmp/ debris,
        which recover() sweeps; after the directory fsync the entries exist for good.
        The files are written, then fsynced, then renamed, each step for the whole batch,
        so that the renames do not join the journal commits of the fsyncs. One fsync per
        message and one directory fsync for the batch, and nothing proportional to the
        size of the queue.
        """
        results: dict[int, Entry | Exception] = {}
        try:
            free = self.free_bytes()
        except SpoolError as exc:
            return [exc] * len(batch)
        written: list[tuple[int, int]] = []  # (index in batch, open descriptor in tmp/)
        for index, new in enumerate(batch):
            if new.draft is None and free - new.size < self.min_free:
                results[index] = SpoolFull("insufficient free space in the spool")
                continue
            free -= new.size
            try:
                written.append((index, self._write_tmp(new)))
            except Exception as exc:  # noqa: BLE001
                results[index] = exc
        if written:
            syncing()
        synced: list[int] = []
        for index, fd in written:
            try:
                self._fsync_tmp(batch[index], fd)
            except Exception as exc:  # noqa: BLE001
                results[index] = exc
            else:
                synced.append(index)
        published: dict[Queue, list[int]] = {}
        for index in synced:
            queue = Queue.INCOMING if batch[index].send_at is None else Queue.SCHEDULED
            try:
                self._publish(batch[index], queue)
            except Exception as exc:  # noqa: BLE001
                results[index] = exc
            else:
                published.setdefault(queue, []).append(index)
        for queue, indexes in published.items():
            try:
                self._sync_dir(queue.value)
            except OSError as exc:
                # Not durable: the clients will hear an error and send them again.
                for index in indexes:
                    unlink_quietly(self._file(queue, batch[index].id))
                    results[index] = SpoolError(f"spool write failed: {exc.strerror}")
            else:
                for index in indexes:
                    new = batch[index]
                    results[index] = Entry(
                        id=new.id, queue=queue, sender=new.sender,
                        recipients=tuple(Recipient(a) for a in new.recipients),
                        arrived=new.arrived, size=new.size, smtputf8=new.smtputf8,
                        send_at=new.send_at, message_id=new.message_id,
                        original_sender=new.original_sender,
                        original_recipients=new.original_recipients)
        return [results[index] for index in range(len(batch))]

    def _write_tmp(self, new: NewEntry) -> int:
        """Create the entry's file in tmp/ and write it, or finish the draft it was written
        to; return the open descriptor."""
        tmp = self._tmp_file(new.id)
        if new.draft is not None:
            fd = new.draft.finish()
        else:
            head = envelope_head(new, new.size)
            with failed_write_removes(tmp):
                fault_point("before-spool-write")
                if self._take_spare(tmp):
                    fd = overwrite(tmp, [head, *new.parts])
                else:
                    fd = create(tmp, [head, *new.parts])
        if new.send_at is not None:
            with failed_write_removes(tmp):
                # The due time, as deferred/ keeps its next attempt; set before the fsync,
                # which makes it durable with the content. _set_mtime closes fd on failure.
                set_mtime(fd, new.send_at)
        return fd

    def draft(self, new: NewEntry) -> Draft:
        """Start the file of a new entry whose content is still arriving (a large message:
        it goes to disk as it comes rather than into memory). `new` carries the envelope;
        its parts are not used. Raises SpoolFull or SpoolError."""
        tmp = self._tmp_file(new.id)
        head = envelope_head(new, 0)
        with failed_write_removes(tmp):
            fault_point("before-spool-write")
            if self._take_spare(tmp):
                fd = overwrite(tmp, [head])
            else:
                fd = create(tmp, [head])
        return Draft(tmp, fd, len(head))

    def _take_spare(self, tmp: str) -> bool:
        """Rename a spare file, if there is one, to `tmp`; whether one was taken."""
        while self._spares:
            try:
                spare = self._spares.pop()
                os.rename(spare, tmp)
            except (IndexError, FileNotFoundError):
                continue  # taken meanwhile, or swept by recover()
            return True
        return False

    def _fsync_tmp(self, new: NewEntry, fd: int) -> None:
        with failed_write_removes(self._tmp_file(new.id)):
            try:
                fsync_once(fd)
            finally:
                os.close(fd)

    def _publish(self, new: NewEntry, queue: Queue) -> None:
        tmp = self._tmp_file(new.id)
        with failed_write_removes(tmp):
            fault_point("after-fsync-before-rename")
            os.rename(tmp, self._file(queue, new.id))

    def remove(self, entry: Entry) -> None:
        """Delete a delivered entry and its state record.

        The file leaves the queue by a rename into tmp/, and the next new entry is written
        over it (up to SPARES are kept; more are unlinked). On ext4 a new file's inode is
        looked for among the free ones, and without a journal the ones freed in the last
        half minute are passed over one by one: with a relay deleting as fast as it
        creates, and 100,000 deferred entries filling the nearby inodes, that search took
        about a fifth of the relay's CPU. A reused file has its inode already, and its
        blocks: written over, it needs no allocation, and its old blocks are not freed
        (on a disk mounted with `discard`, emptying a file waited about 70 us for the
        disk). Until then it holds the delivered message, so whoever removes empties the
        spares once idle (empty_spares).

        No directory fsync, as in Postfix: a power cut could bring the entry back, and it
        would be delivered once more, the same duplicate as a crash in the instant after
        the upstream's 250. Every later crash finds it gone.
        """
        path = self._file(entry.queue, entry.id)
        if len(self._spares) < SPARES:
            spare = f"{self._root}/tmp/{entry.id}.spare"
            os.rename(path, spare)
            self._spares.append(spare)
            self.spares_hold_mail = True
        else:
            os.unlink(path)
        unlink_quietly(self._state_file(entry.id))

    def empty_spares(self) -> None:
        """Empty the kept files of delivered entries (Spool.remove), so that no delivered
        message lingers in tmp/ while the relay is idle; one that fails to empty goes, and
        one that cannot go either (a read-only or failing disk) waits for recover()."""
        self.spares_hold_mail = False
        for spare in list(self._spares):
            try:
                os.truncate(spare, 0)
            except FileNotFoundError:
                pass  # taken for a new entry meanwhile, or swept
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(spare)

