"""The spool writer's part of the spool: new entries published in batches, and delivered
entries removed, their files kept to be written over by the next new ones.

relay.writer's one thread makes these calls for the daemon (store_many, remove,
empty_spares); the listener starts drafts and writes to them on the event loop.

A store is crash-safe by its order: each complete file is written and fsynced under tmp/,
then renamed into incoming/ (or, with a send_at, into scheduled/ with that time as its
mtime, set before the fsync), then the directory itself is fsynced so that the new names
survive a power cut. A crash before a rename leaves only tmp/ debris, which recover()
sweeps; after the directory fsync the entry exists for good. Each step is taken for the
whole batch (write all, fsync all, rename all, one directory fsync per queue) so that the
renames do not join the journal commits of the fsyncs.

A delivered entry's file is renamed into tmp/ as a spare and the next new entry is
written over it: its inode and blocks are allocated already, which spares ext4 its search
for a free inode among those freed moments ago (docs/BENCHMARKS.md, "Notes on the spool's
design"). Until then it holds the delivered message, so the writer empties the spares
once idle (empty_spares).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from ..entry import Entry, NewEntry, Queue, Recipient
from ..errors import SpoolError, SpoolFull
from ..faults import fault_point
from .files import (
    create,
    empty,
    failed_write_removes,
    fsync_once,
    overwrite,
    set_mtime,
    unlink_quietly,
    write_all,
)
from .formats import envelope_head, size_field, size_field_at
from .layout import Layout
from .marks import blocking, loop_safe

# How many delivered entries' files are kept in tmp/ for new entries; more are unlinked.
SPARES = 64


class Draft:
    """A new entry's file in tmp/, written as its content arrives; Spool.store_many
    finishes and publishes it like any other. A failed write raises SpoolFull or
    SpoolError, and the draft is then discarded."""

    def __init__(self, path: str, fd: int, head_size: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self._head_size = head_size
        self.size = 0  # content written so far

    @loop_safe
    def write(self, parts: list[bytes]) -> None:
        """Append `parts` to the content (to the page cache: no fsync)."""
        assert self._fd is not None
        fd, self._fd = self._fd, None  # write_all closes it if it fails
        with failed_write_removes(self.path):
            write_all(fd, parts)
        self._fd = fd
        self.size += sum(len(part) for part in parts)

    @blocking
    def finish(self) -> int:
        """Write the size into the envelope and cut the file to its length (it may be a
        reused one); return the descriptor for the fsync. The writer thread's."""
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

    @loop_safe
    def discard(self) -> None:
        """Give the draft up: nothing of it stays."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        unlink_quietly(self.path)


class Ingest(Layout):
    """New entries in, delivered entries out: the spool writer's calls."""

    def __init__(self, path: Path, min_free: int = 0) -> None:
        super().__init__(path, min_free)
        # Delivered entries' files in tmp/, each to become a new entry's file. Whichever
        # thread stores and removes uses them; list.pop and append are atomic.
        self._spares: list[str] = []
        self.spares_hold_mail = False  # whether any may still hold a delivered message

    @blocking
    def store(self, entry_id: str, sender: str, recipients: list[str], parts: list[bytes],
              arrived: float, smtputf8: bool) -> Entry:
        """Publish one new entry durably and return it; only then may the client hear 250."""
        new = NewEntry(entry_id, sender, tuple(recipients), tuple(parts), arrived, smtputf8)
        result = self.store_many([new])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @blocking
    def store_many(self, batch: list[NewEntry],
                   syncing: Callable[[], None] = lambda: None) -> list[Entry | Exception]:
        """Publish new entries durably (see the module's docstring for the order); for
        each, its Entry, or the exception that kept it out of the queue (SpoolFull,
        SpoolError, or a bug's). Only an Entry may hear 250. `syncing` is called as the
        fsyncs begin, once every file is written. One fsync per message and one directory
        fsync per queue for the batch, and nothing proportional to the size of the queue.
        """
        results: dict[int, Entry | Exception] = {}
        written = self._write_each(batch, results)
        if written:
            syncing()
        synced = self._fsync_each(batch, written, results)
        published = self._publish_each(batch, synced, results)
        for queue, indexes in published.items():
            self._sync_published(batch, queue, indexes, results)
        return [results[index] for index in range(len(batch))]

    def _write_each(self, batch: list[NewEntry],
                    results: dict[int, Entry | Exception]) -> list[tuple[int, int]]:
        """Write each entry's file in tmp/ as the free space allows; (index in batch, open
        descriptor) of each written, the exception of each other in `results`."""
        try:
            free = self.free_bytes()
        except SpoolError as exc:
            results.update((index, exc) for index in range(len(batch)))
            return []
        written: list[tuple[int, int]] = []
        for index, new in enumerate(batch):
            if new.draft is None and free - new.size < self.min_free:
                results[index] = SpoolFull("insufficient free space in the spool")
                continue
            free -= new.size
            try:
                written.append((index, self._write_tmp(new)))
            except Exception as exc:  # noqa: BLE001
                results[index] = exc
        return written

    def _fsync_each(self, batch: list[NewEntry], written: list[tuple[int, int]],
                    results: dict[int, Entry | Exception]) -> list[int]:
        """fsync and close each written file; the indexes of those that are durable."""
        synced: list[int] = []
        for index, fd in written:
            try:
                with failed_write_removes(self._tmp_file(batch[index].id)):
                    try:
                        fsync_once(fd)
                    finally:
                        os.close(fd)
            except Exception as exc:  # noqa: BLE001
                results[index] = exc
            else:
                synced.append(index)
        return synced

    def _publish_each(self, batch: list[NewEntry], synced: list[int],
                      results: dict[int, Entry | Exception]) -> dict[Queue, list[int]]:
        """Rename each durable file into its queue; the indexes renamed, by queue."""
        published: dict[Queue, list[int]] = {}
        for index in synced:
            new = batch[index]
            queue = Queue.INCOMING if new.send_at is None else Queue.SCHEDULED
            tmp = self._tmp_file(new.id)
            try:
                with failed_write_removes(tmp):
                    fault_point("after-fsync-before-rename")
                    os.rename(tmp, self._file(queue, new.id))
            except Exception as exc:  # noqa: BLE001
                results[index] = exc
            else:
                published.setdefault(queue, []).append(index)
        return published

    def _sync_published(self, batch: list[NewEntry], queue: Queue, indexes: list[int],
                        results: dict[int, Entry | Exception]) -> None:
        """fsync the queue's directory: the renamed entries exist for good, or, should it
        fail, they are taken back and their clients hear an error and send them again."""
        try:
            self._sync_dir(queue.value)
        except OSError as exc:
            for index in indexes:
                unlink_quietly(self._file(queue, batch[index].id))
                results[index] = SpoolError(f"spool write failed: {exc.strerror}")
            return
        for index in indexes:
            new = batch[index]
            results[index] = Entry(
                id=new.id, queue=queue, sender=new.sender,
                recipients=tuple(Recipient(a) for a in new.recipients),
                arrived=new.arrived, size=new.size, smtputf8=new.smtputf8,
                send_at=new.send_at, message_id=new.message_id,
                original_sender=new.original_sender,
                original_recipients=new.original_recipients)

    def _write_tmp(self, new: NewEntry) -> int:
        """Create the entry's file in tmp/ and write it, or finish the draft it was written
        to; return the open descriptor."""
        tmp = self._tmp_file(new.id)
        if new.draft is not None:
            fd = new.draft.finish()
        else:
            fd = self._start(tmp, [envelope_head(new, new.size), *new.parts])
        if new.send_at is not None:
            with failed_write_removes(tmp):
                # The due time, as deferred/ keeps its next attempt; set before the fsync,
                # which makes it durable with the content.
                set_mtime(fd, new.send_at)
        return fd

    @loop_safe
    def draft(self, new: NewEntry) -> Draft:
        """Start the file of a new entry whose content is still arriving (a large message:
        it goes to disk as it comes rather than into memory). `new` carries the envelope;
        its parts are not used. Raises SpoolFull or SpoolError."""
        tmp = self._tmp_file(new.id)
        head = envelope_head(new, 0)
        return Draft(tmp, self._start(tmp, [head]), len(head))

    def _start(self, tmp: str, parts: list[bytes]) -> int:
        """Write `parts` as a new file at `tmp`, over a spare if there is one; return the
        open descriptor."""
        with failed_write_removes(tmp):
            fault_point("before-spool-write")
            if self._take_spare(tmp):
                return overwrite(tmp, parts)
            return create(tmp, parts)

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

    @blocking
    def remove(self, entry: Entry) -> None:
        """Delete a delivered entry and its state record: the file leaves the queue by a
        rename into tmp/, kept as a spare (up to SPARES; more are unlinked).

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

    @blocking
    def empty_spares(self) -> None:
        """Empty the kept files of delivered entries, so that no delivered message lingers
        in tmp/ while the relay is idle; one that fails to empty goes, and one that cannot
        go either (a read-only or failing disk) waits for recover()."""
        self.spares_hold_mail = False
        for spare in list(self._spares):
            try:
                empty(spare)
            except FileNotFoundError:
                pass  # taken for a new entry meanwhile, or swept
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(spare)
