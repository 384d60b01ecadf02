"""Queue transitions: the renames that move an entry between queues, and the state
records written with them, for delivery, for operators, and at start-up.

Whoever renames a file into active/ owns the entry until it renames it out; every other
mover finds the file gone and backs off. A state record is replaced (write, fsync,
rename, directory fsync) before the rename that depends on it, so that a crash between
the two leaves the entry where it was with its newer record, never the reverse. Operator
actions that rewrite a record take the entry into hold/ first, where delivery never
claims it, so that no attempt writes under their feet.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from dataclasses import replace

from ..entry import Entry, Queue, Status
from ..errors import CorruptEntry, EntryBusy, EntryNotFound, SpoolError
from .files import touch, unlink_quietly, write_durably
from .formats import encode_state, is_valid_id
from .layout import QUEUE_DIRS, RETRY, TMP_PATTERN
from .marks import blocking, loop_safe
from .reading import Reading


class Transitions(Reading):
    """The moves between queues, by delivery, by operators and at start-up."""

    # --- delivery -----------------------------------------------------------------------

    @loop_safe
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

    @loop_safe
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

    @blocking
    def defer(self, entry: Entry) -> Entry:
        """Record the attempt, then move active/ -> deferred/ due at entry.next_attempt."""
        self._save_state(entry)
        path = self._file(Queue.ACTIVE, entry.id)
        due = entry.next_attempt if entry.next_attempt is not None else time.time()
        os.utime(path, (due, due))
        return self._move(entry, Queue.DEFERRED)

    @blocking
    def fail(self, entry: Entry) -> Entry:
        """Record the final state, then move active/ -> failed/."""
        self._save_state(entry)
        return self._move(entry, Queue.FAILED)

    @loop_safe
    def unclaim(self, entry: Entry, due: float) -> None:
        """Give an active entry back, deferred until `due`, if it is still in active/ (an
        attempt cancelled at shutdown)."""
        self.return_to_queue(entry.id, due)

    @loop_safe
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

    @blocking
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

    # --- start-up -----------------------------------------------------------------------

    @blocking
    def recover(self) -> list[tuple[str, float]]:
        """Clean up after a crash and return every deliverable entry as (id, due time).

        tmp/ holds only unpublished writes and the files of delivered entries kept for
        reuse: nobody was told 250 for any of them, so they go. active/ entries were being
        delivered when the process died: back to incoming/. State records without a
        message are left over from a removal and go too. Deferred entries are due at their
        file's mtime; nothing is read but directories.
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

    @blocking
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

    # --- operator actions ---------------------------------------------------------------

    @loop_safe
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

    @blocking
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

    @blocking
    def reschedule(self, entry_id: str, sources: tuple[Queue, ...], send_at: float,
                   now: float) -> Entry | None:
        """Move the entry from the first of `sources` holding it into scheduled/, due at
        `send_at`, or, if that is not after `now`, into incoming/, due now. Its state
        record keeps the new send time, from which max_age counts.

        The entry passes through hold/ (see the module's docstring), so an interruption
        leaves it held, never lost; an attempt that took it first makes this EntryBusy. A
        running daemon hears of the new time through wake/. None if it is in none of
        `sources`.
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

    @blocking
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
            unlink_quietly(self._state_file(entry_id))
            for name in {queue.value, Queue.HOLD.value}:  # gone from both for good
                self._sync_dir(name)
            return None if entry is None else entry.with_queue(queue)
        try:
            os.unlink(self.path / "corrupt" / entry_id)
        except FileNotFoundError:
            self._locate(entry_id)
            raise EntryNotFound(entry_id) from None
        unlink_quietly(self._state_file(entry_id))
        return None

    # --- wake/: what operators tell a running daemon ------------------------------------

    @loop_safe
    def wake(self, entry_id: str) -> None:
        """Tell a running daemon that this entry's due time changed (wake/)."""
        touch(self.path / "wake" / entry_id)

    @loop_safe
    def ask_retry(self) -> None:
        """Tell a running daemon that an operator put mail back in the queue (flush,
        release, requeue): it probes upstreams it has marked down at once (wake/RETRY)."""
        touch(self.path / "wake" / RETRY)

    @loop_safe
    def take_retry(self) -> bool:
        """Whether ask_retry() was called since the last look; the request is taken."""
        try:
            os.unlink(self.path / "wake" / RETRY)
        except FileNotFoundError:
            return False
        return True

    @blocking
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

    def _locate(self, entry_id: str) -> Queue:
        """Where the entry is; EntryBusy if in active/, EntryNotFound if nowhere."""
        for queue in Queue:
            if os.path.exists(self._file(queue, entry_id)):
                if queue is Queue.ACTIVE:
                    raise EntryBusy(entry_id)
                return queue
        raise EntryNotFound(entry_id)

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
