"""The relay's one exception tree.

::

    RelayError                    base of everything the relay raises on purpose
    ├── ConfigError               the configuration is invalid; carries the dotted key
    ├── SpoolError                the spool cannot be used or written
    │   ├── SpoolFull             free space is below spool.min_free: nothing was written
    │   ├── SpoolLocked           another `relay serve` already owns this spool
    │   ├── CorruptEntry          a spool entry cannot be parsed; carries the path
    │   ├── ForeignFile           a file in the spool that is not the relay's; skipped
    │   └── WriterStopped         the spool writer thread is gone: nothing more is stored
    ├── EntryNotFound             no entry with this queue ID
    ├── EntryBusy                 the entry is being delivered right now (in active/)
    ├── WrongState                the entry is not in a state the action applies to
    ├── UsageError                a command line that cannot be honoured
    ├── SubmissionFailed          `relay sendmail` could not hand the message over;
    │                             `permanent` tells refused (bad data) from try-again
    ├── CheckFailed               `relay check`: an upstream failed a step; `refused`
                                  tells refused credentials or domain from unreachable
    ├── Unhealthy                 `relay check --local`: the running relay's /healthz
                                  answered other than 200, or not at all
    ├── ScheduleRefused           a send time a client asked for cannot be honoured;
                                  `reply` is the SMTP reply that says why
    ├── SessionError              a step of an upstream session failed; carries the
    │   │                         reply and the outcome.Stage it failed at
    │   ├── CredentialsRejected   AUTH refused for good (5xx): delivery pauses
    │   └── ReplyTimeout          no complete reply in time: the session is out of step
    └── TaskFailed                an internal task kept dying: the daemon exits 70 so
                                  that its supervisor (systemd) starts it afresh

Expected delivery outcomes (a 4xx, a refused recipient, a lost connection) are values
returned by `relay.smtp_client`, never exceptions; SessionError is how its steps report to
it (and to `relay check`). The command line maps these classes to exit statuses in
exactly one place (`relay.cli.exit_status`). This module imports nothing from relay at
run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .outcome import Reply, Stage


class RelayError(Exception):
    """Base class for every error the relay raises on purpose."""


class ConfigError(RelayError):
    """Raised while loading the configuration; `key` is the dotted key at fault ('' for
    the file)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class SpoolError(RelayError):
    """Raised when the spool cannot be created, read or written."""


class SpoolFull(SpoolError):
    """Raised by Spool.store when free space is below spool.min_free; nothing was written."""


class SpoolLocked(SpoolError):
    """Raised when another process holds the spool's single-instance lock."""


class CorruptEntry(SpoolError):
    """Raised when an entry in the spool cannot be parsed; `path` is the file at fault."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ForeignFile(SpoolError):
    """A file in a spool directory that the relay did not write there (a name that is not a
    queue ID, or an ID present in two queues); `path` is the file, left untouched."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class WriterStopped(SpoolError):
    """Raised by SpoolWriter.store (and for every store waiting on it) once the writer
    thread has died or stopped: the message was not stored. For the listener to answer
    `451 4.3.0`: a fault of ours, not a full disk (452)."""


class EntryNotFound(RelayError):
    """Raised when no spool entry has the given queue ID."""

    def __init__(self, entry_id: str) -> None:
        self.entry_id = entry_id
        super().__init__(f"{entry_id}: no such message in the queue")


class UsageError(RelayError):
    """Raised for a command line that cannot be honoured (unknown option, no recipients)."""


class SubmissionFailed(RelayError):
    """Raised by `relay sendmail` when the listener did not take the message."""

    def __init__(self, message: str, permanent: bool) -> None:
        self.permanent = permanent
        super().__init__(message)


class EntryBusy(RelayError):
    """Raised when an operator action finds the entry in active/: a delivery owns it."""

    def __init__(self, entry_id: str) -> None:
        self.entry_id = entry_id
        super().__init__(f"{entry_id}: being delivered right now; try again in a moment")


class CheckFailed(RelayError):
    """An upstream failed `relay check`: `refused` when the provider refused our
    credentials or sending domain, else it could not be reached or set up (TLS, 5xx)."""

    def __init__(self, message: str, refused: bool) -> None:
        self.refused = refused
        super().__init__(message)


class Unhealthy(RelayError):
    """Raised by `relay check --local` when the running relay is not healthy."""


class ScheduleRefused(RelayError):
    """Raised by relay.schedule for a send time it refuses; `reply` is the SMTP reply
    (with its enhanced status code) the listener gives the client."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        super().__init__(reply)


class WrongState(RelayError):
    """Raised when an operator action does not apply to the entry where it is now (release
    of a deferred entry, requeue of a held one); `state` is where it is."""

    def __init__(self, entry_id: str, state: str) -> None:
        self.entry_id = entry_id
        self.state = state
        super().__init__(f"{entry_id}: message is {state}")


class SessionError(RelayError):
    """A step of an upstream session failed: `reply` is the server's reply, or a
    description with code None (refused, timed out, TLS, out of step); `stage` is the
    outcome.Stage it failed at, the one vocabulary of delivery and `relay check`."""

    def __init__(self, reply: Reply, stage: Stage) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.stage = stage


class CredentialsRejected(SessionError):
    """The upstream refused our AUTH for good (5xx, 535 most often): every message would
    meet the same refusal, so delivery pauses and `relay check` exits 77."""


class ReplyTimeout(SessionError):
    """No complete reply within the timeout: the session is out of step and closed."""


class TaskFailed(RelayError):
    """An internal task of the daemon (the spool writer, a delivery worker, the incoming
    watcher) died and could not be restarted; the daemon exits non-zero so that systemd
    starts it afresh. `task` names it; the cause is chained."""

    def __init__(self, task: str, cause: BaseException) -> None:
        self.task = task
        super().__init__(f"internal task {task} failed: {type(cause).__name__}: {cause}")
