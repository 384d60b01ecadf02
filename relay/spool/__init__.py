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
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..entry import Entry, NewEntry, Queue, Recipient, Status
from ..errors import (
    CorruptEntry,
    EntryBusy,
    EntryNotFound,
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
    touch,
    unlink_quietly,
    write_all,
    write_durably,
)
from .formats import (
    HEADER_READ,
    ID_PATTERN,
    MAGIC,
    MAX_HEADER_BYTES,
    SIZE_FIELD,
    arrival_of,
    encode_state,
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
    TMP_PATTERN,
    UPSTREAMS_FILE,
)
from .reading import Reading

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


class Spool(Reading):
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

    # --- start-up -----------------------------------------------------------------------

    def recover(self) -> list[tuple[str, float]]:
        """Clean up after a crash and return every deliverable entry as (id, due time).

        tmp/ holds only unpublished writes: nobody was told 250 for them, so they go.
        active/ entries were being delivered when the process died: back to incoming/.
        State records without a message are left over from a removal and go too.
        Deferred entries are due at their file's mtime; nothing is read but directories.
        """
        for name in os.listdir(self.path / "tmp"):
            if TMP_PATTERN.match(name):
                unlink_quietly(self.path / "tmp" / name)
            else:
                self._foreign(f"{self._root}/tmp/{name}", "not a file the relay writes; kept")
        for name in self._ids(Queue.ACTIVE.value):
            os.rename(self._file(Queue.ACTIVE, name), self._file(Queue.INCOMING, name))
        for name in os.listdir(self.path / "wake"):  # due_times() below covers them all
            unlink_quietly(self.path / "wake" / name)
        due = self.due_times()
        existing = {name for d in (*QUEUE_DIRS, "corrupt") for name in os.listdir(self.path / d)}
        for name in self._ids("state"):
            if name not in existing:
                unlink_quietly(self.path / "state" / name)
        return due

    def pull_forward(self, latest: float) -> int:
        """Make every deferred entry due by `latest` at the latest; return how many were
        later. A retry time that far ahead was set by a clock that has since gone back."""
        moved = 0
        with os.scandir(self.path / Queue.DEFERRED.value) as it:
            for e in it:
                if is_valid_id(e.name) and e.stat().st_mtime > latest:
                    os.utime(e.path, (latest, latest))
                    moved += 1
        return moved

    # --- delivery -----------------------------------------------------------------------

    def claim(self, entry_id: str, now: float) -> Entry | None:
        """Move a due entry into active/ and return it; None if it is not due or not there
        (held, deleted, or taken by someone else). A deferred or scheduled entry is due
        once its mtime has passed, as in Postfix's qmgr, so a stale schedule never retries
        or sends early (waiting_until tells when it is due).

        Raises CorruptEntry after moving an unparsable entry to corrupt/.
        """
        for queue in (Queue.INCOMING, Queue.DEFERRED, Queue.SCHEDULED):
            try:
                if queue is not Queue.INCOMING and \
                        os.stat(self._file(queue, entry_id)).st_mtime > now:
                    return None
                os.rename(self._file(queue, entry_id), self._file(Queue.ACTIVE, entry_id))
            except FileNotFoundError:
                continue
            try:
                return self._load_or_quarantine(Queue.ACTIVE, entry_id)
            except OSError as exc:
                # Unreadable for now (EMFILE, EIO): back where it was, so that it is not
                # left in active/ without an owner (if this fails too, the sweep returns it).
                with contextlib.suppress(OSError):
                    os.rename(self._file(Queue.ACTIVE, entry_id), self._file(queue, entry_id))
                raise SpoolError(f"cannot read {entry_id}: {exc.strerror}") from None
        return None

    def claim_new(self, entry: Entry) -> Entry | None:
        """claim() for an entry this process has stored and not yet attempted, whose
        envelope it still holds: a published file never changes, and its state record is
        written only by an attempt (a requeue writes one for failed entries only), so the
        rename into active/ is all there is to do. None if it has left incoming/."""
        try:
            os.rename(self._file(Queue.INCOMING, entry.id), self._file(Queue.ACTIVE, entry.id))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SpoolError(f"cannot claim {entry.id}: {exc.strerror}") from None
        return entry.with_queue(Queue.ACTIVE)

    def defer(self, entry: Entry) -> Entry:
        """Record the attempt, then move active/ -> deferred/ due at entry.next_attempt."""
        self._save_state(entry)
        path = self._file(Queue.ACTIVE, entry.id)
        due = entry.next_attempt if entry.next_attempt is not None else time.time()
        os.utime(path, (due, due))
        return self._move(entry, Queue.DEFERRED)

    def fail(self, entry: Entry) -> Entry:
        """Record the final state, then move active/ -> failed/."""
        self._save_state(entry)
        return self._move(entry, Queue.FAILED)

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

    def unclaim(self, entry: Entry, due: float) -> None:
        """Give an active entry back, deferred until `due`, if it is still in active/ (an
        attempt cancelled at shutdown)."""
        self.return_to_queue(entry.id, due)

    def return_to_queue(self, entry_id: str, due: float) -> bool:
        """active/ -> deferred/, due at `due`: for an entry no delivery owns (the daemon's
        sweep) or one handed back. False if it is no longer in active/."""
        path = self._file(Queue.ACTIVE, entry_id)
        try:
            os.utime(path, (due, due))
            os.rename(path, self._file(Queue.DEFERRED, entry_id))
        except FileNotFoundError:
            return False
        return True

    def set_aside(self, entry: Entry, reason: str) -> Entry:
        """active/ -> failed/, for an attempt whose outcome could not be recorded: a retry
        could send it again to recipients that already have it. The reason goes in its
        state record if that can be written at all (`relay queue show`); the caller logs it.
        Raises SpoolError only if the entry cannot even be moved."""
        aside = replace(entry, last_error=reason, next_attempt=None)
        with contextlib.suppress(SpoolError):
            self._save_state(aside)
        try:
            return self._move(aside, Queue.FAILED)
        except OSError as exc:
            raise SpoolError(f"cannot move {entry.id} to failed/: {exc.strerror}") from None

    # --- operator actions ---------------------------------------------------------------

    def move(self, entry_id: str, sources: tuple[Queue, ...], target: Queue) -> Entry | None:
        """Rename the entry from the first of `sources` holding it into `target`.

        Returns the moved entry, or None if it exists but in none of `sources`.
        Raises EntryBusy if a delivery owns it, EntryNotFound if it is nowhere.
        """
        for source in sources:
            try:
                os.rename(self._file(source, entry_id), self._file(target, entry_id))
            except FileNotFoundError:
                continue
            return self._load_or_quarantine(target, entry_id)
        self._locate(entry_id)
        return None

    def requeue(self, entry_id: str, now: float) -> Entry | None:
        """failed/ -> incoming/ with failed recipients pending again and attempts reset;
        recipients already sent stay sent. None if the entry is not failed."""
        try:
            entry = self.load(Queue.FAILED, entry_id)
        except FileNotFoundError:
            self._locate(entry_id)
            return None
        fresh = replace(entry, recipients=tuple(
            r if r.status is Status.SENT else replace(r, status=Status.PENDING)
            for r in entry.recipients), attempts=(), next_attempt=None, last_error=None,
            requeued=now)
        self._save_state(fresh)
        return self._move(fresh, Queue.INCOMING)

    def reschedule(self, entry_id: str, sources: tuple[Queue, ...], send_at: float,
                   now: float) -> Entry | None:
        """Move the entry from the first of `sources` holding it into scheduled/, due at
        `send_at`, or, if that is not after `now`, into incoming/, due now. Its state
        record keeps the new send time, from which max_age counts.

        The entry passes through hold/, where delivery never claims it, so that its state
        record is not written under an attempt's feet (an attempt that took it first
        makes this EntryBusy); an interruption leaves it held, never lost. A running
        daemon hears of the new time through wake/. None if it is in none of `sources`.
        """
        if not self._take_into_hold(entry_id, sources):
            self._locate(entry_id)
            return None
        entry = self._load_or_quarantine(Queue.HOLD, entry_id)
        due = send_at > now
        entry = replace(entry, send_at=send_at if due else now, next_attempt=None)
        self._save_state(entry)
        target = Queue.SCHEDULED if due else Queue.INCOMING
        if due:
            os.utime(self._file(Queue.HOLD, entry_id), (send_at, send_at))
        moved = self._move(entry, target)
        self._sync_dir(target.value)
        if due:
            self.wake(entry_id)
        return moved

    def _take_into_hold(self, entry_id: str, sources: tuple[Queue, ...]) -> bool:
        for source in sources:
            if source is Queue.HOLD:
                if os.path.exists(self._file(Queue.HOLD, entry_id)):
                    return True
                continue
            try:
                os.rename(self._file(source, entry_id), self._file(Queue.HOLD, entry_id))
            except FileNotFoundError:
                continue
            return True
        return False

    def wake(self, entry_id: str) -> None:
        """Tell a running daemon that this entry's due time changed (wake/)."""
        touch(self.path / "wake" / entry_id)

    def ask_retry(self) -> None:
        """Tell a running daemon that an operator put mail back in the queue (flush,
        release, requeue): it probes upstreams it has marked down at once (wake/RETRY)."""
        touch(self.path / "wake" / RETRY)

    def take_retry(self) -> bool:
        """Whether ask_retry() was called since the last look; the request is taken."""
        try:
            os.unlink(self.path / "wake" / RETRY)
        except FileNotFoundError:
            return False
        return True

    def take_wakes(self) -> list[tuple[str, float]]:
        """(id, due time) of each entry named in wake/, each name removed before its entry
        is looked at (so a later change is never missed); names no longer scheduled are
        dropped. Cheap when wake/ is empty, as it nearly always is."""
        woken = []
        for name in os.listdir(self.path / "wake"):
            if name == RETRY:
                continue  # take_retry's
            unlink_quietly(self.path / "wake" / name)
            if not is_valid_id(name):
                continue
            try:
                woken.append((name, os.stat(self._file(Queue.SCHEDULED, name)).st_mtime))
            except FileNotFoundError:
                continue
        return woken

    def delete(self, entry_id: str) -> Entry | None:
        """Remove an entry from any queue but active/ and return it as it was (its queue
        and its recipients' status), or None for one in corrupt/. It is taken into hold/
        first, where delivery never claims it, so what is returned is what was deleted."""
        sources = (Queue.INCOMING, Queue.DEFERRED, Queue.SCHEDULED, Queue.HOLD, Queue.FAILED)
        for queue in sources:
            if queue is not Queue.HOLD:
                try:
                    os.rename(self._file(queue, entry_id), self._file(Queue.HOLD, entry_id))
                except FileNotFoundError:
                    continue
            try:
                entry = self.load(Queue.HOLD, entry_id)
            except FileNotFoundError:
                continue
            except CorruptEntry:
                entry = None
            os.unlink(self._file(Queue.HOLD, entry_id))
            unlink_quietly(self.path / "state" / entry_id)
            for name in {queue.value, Queue.HOLD.value}:  # gone from both for good
                self._sync_dir(name)
            return None if entry is None else entry.with_queue(queue)
        try:
            os.unlink(self.path / "corrupt" / entry_id)
        except FileNotFoundError:
            self._locate(entry_id)
            raise EntryNotFound(entry_id) from None
        unlink_quietly(self.path / "state" / entry_id)
        return None

    def _locate(self, entry_id: str) -> Queue:
        """Where the entry is; EntryBusy if in active/, EntryNotFound if nowhere."""
        for queue in Queue:
            if os.path.exists(self._file(queue, entry_id)):
                if queue is Queue.ACTIVE:
                    raise EntryBusy(entry_id)
                return queue
        raise EntryNotFound(entry_id)

    # --- internals ----------------------------------------------------------------------

    def _move(self, entry: Entry, queue: Queue) -> Entry:
        os.rename(self._file(entry.queue, entry.id), self._file(queue, entry.id))
        return entry.with_queue(queue)

    def _load_or_quarantine(self, queue: Queue, entry_id: str) -> Entry:
        try:
            return self.load(queue, entry_id)
        except CorruptEntry:
            os.rename(self._file(queue, entry_id), self.path / "corrupt" / entry_id)
            raise

    def _save_state(self, entry: Entry) -> None:
        """Replace the entry's state record: write-temp, fsync, rename, fsync directory."""
        tmp = self.path / "tmp" / f"{entry.id}.state.{secrets.token_hex(4)}"
        try:
            write_durably(tmp, [encode_state(entry)])
            os.replace(tmp, self.path / "state" / entry.id)
            self._sync_dir("state")
        except OSError as exc:
            unlink_quietly(tmp)
            raise SpoolError(f"cannot write state of {entry.id}: {exc.strerror}") from None
