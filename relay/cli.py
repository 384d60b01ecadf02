"""The command line: argument parsing, output, and the one map from errors to exit statuses.

Exit statuses (sysexits.h): 0 success, 64 usage, 65 bad input data, 69 unavailable,
70 internal software error, 75 temporary failure, 77 permission denied, 78 configuration
error.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from . import admin, daemon, sendmail, views
from .admin import Action
from .config import Config, load_config
from .entry import Entry
from .errors import (
    ConfigError,
    CorruptEntry,
    CredentialsRejected,
    EntryBusy,
    EntryNotFound,
    ForeignFile,
    RelayError,
    SessionError,
    SpoolError,
    SubmissionFailed,
    TaskFailed,
    UsageError,
    WrongState,
)
from .log import setup_logging
from .policy import Stage
from .spool import Spool, is_valid_id
from .upstream import UpstreamSession, likely_cause, make_tls_context

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


def exit_status(error: BaseException) -> int:
    """The exit status for an error that ends a command: the only such mapping."""
    if isinstance(error, ConfigError):
        return EX_CONFIG
    if isinstance(error, UsageError):
        return EX_USAGE
    if isinstance(error, (EntryNotFound, WrongState)):
        return EX_DATAERR
    if isinstance(error, SubmissionFailed):
        return EX_DATAERR if error.permanent else EX_TEMPFAIL
    if isinstance(error, EntryBusy):
        return EX_TEMPFAIL
    if isinstance(error, CredentialsRejected):
        return EX_NOPERM
    if isinstance(error, TaskFailed):
        return EX_SOFTWARE
    if isinstance(error, (SpoolError, SessionError, OSError)):
        return EX_UNAVAILABLE
    return EX_TEMPFAIL


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="FILE",
                        help="config file (default: $RELAY_CONFIG, ./relay.yaml, "
                             "/etc/relay/relay.yaml, else built-in defaults)")
    parser = _Parser(prog="relay", parents=[common],
                     description="A local SMTP smarthost: accepts mail, keeps it on disk, "
                                 "relays it upstream.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.add_parser("serve", parents=[common],
                        help="run the listener and delivery in the foreground")
    commands.add_parser("check", parents=[common],
                        help="validate the config, then connect, TLS and AUTH to the upstream")
    commands.add_parser("sendmail", parents=[common], add_help=False,
                        help="sendmail-compatible submission of a message on stdin")

    queue = commands.add_parser("queue", parents=[common], help="list and manage the queue")
    queue.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    queue.add_argument("--state", choices=views.STATES, help="only entries in this state")
    queue.add_argument("--match", metavar="TEXT",
                       help="only entries whose sender or a recipient contains TEXT")
    actions = queue.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    show = actions.add_parser("show", parents=[common], help="one message in detail")
    show.add_argument("id", metavar="ID")
    show.add_argument("--json", action="store_true")
    show.add_argument("--body", action="store_true", help="print the body too")
    flush = actions.add_parser("flush", parents=[common],
                               help="make deferred messages (all, or the named ones) due now")
    flush.add_argument("ids", metavar="ID", nargs="*")
    for action, text in ((Action.HOLD, "stop attempts for messages"),
                         (Action.RELEASE, "resume attempts for held messages"),
                         (Action.DELETE, "remove messages from the spool"),
                         (Action.REQUEUE, "move failed messages back to the queue")):
        sub = actions.add_parser(action.value, parents=[common], help=f"{text} (ID ... or ALL)")
        sub.add_argument("ids", metavar="ID", nargs="+")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Installed as /usr/sbin/sendmail (a symlink), or `relay sendmail`: sendmail's own
    # option syntax (-oi, -fSENDER) is not argparse's, so it has its own parser.
    if argv is None and Path(sys.argv[0]).name == "sendmail":
        return _guard(lambda: _sendmail(args_list))
    if args_list[:1] == ["sendmail"]:
        return _guard(lambda: _sendmail(args_list[1:]))
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EX_USAGE
    # Only serve and check talk to the upstream; the rest must work without its password.
    secrets = args.command in ("serve", "check")
    return _guard(lambda: _dispatch(args, load_config(args.config, secrets=secrets)))


def _guard(run: Callable[[], int]) -> int:
    try:
        return run()
    except (RelayError, OSError) as exc:
        print(f"relay: {_describe(exc)}", file=sys.stderr)
        return exit_status(exc)


def _dispatch(args: argparse.Namespace, config: Config) -> int:
    if args.command == "serve":
        return _serve(config)
    if args.command == "check":
        return asyncio.run(_check(config))
    spool = Spool(config.spool.path)
    spool.on_foreign = _warn_foreign
    _become_spool_owner(spool.path)
    if args.action is None:
        return _list(spool, args)
    if args.action == "show":
        return _show(spool, args.id, args.json, args.body)
    action = Action(args.action)
    if action is not Action.FLUSH and not args.ids:
        raise UsageError(f"queue {action.value} needs IDs, or ALL")
    ids = args.ids
    if ids == ["ALL"] or (action is Action.FLUSH and not ids):
        ids = admin.select_all(spool, action)
    elif "ALL" in ids:
        raise UsageError("ALL stands alone: give either IDs or ALL")
    return _act(spool, action, ids)


def _become_spool_owner(path: Path) -> None:
    """Run by root, act as the user owning the spool (like Postfix's postsuper), so
    files the command writes stay readable by the service's own unprivileged user."""
    if os.geteuid() != 0:
        return
    owner = os.stat(path)
    if owner.st_uid != 0:
        os.setgid(owner.st_gid)
        os.setuid(owner.st_uid)


def _serve(config: Config) -> int:
    setup_logging(config.log)
    try:
        asyncio.run(daemon.serve(config))
    except KeyboardInterrupt:
        pass
    return EX_OK


def _list(spool: Spool, args: argparse.Namespace) -> int:
    # A listing allocates several objects per entry and frees none before it prints, so
    # the cyclic collector would walk the growing heap again and again and find nothing:
    # a tenth of the time at 100,000 entries.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _print_listing(spool, args)
    finally:
        if collecting:
            gc.enable()


def _print_listing(spool: Spool, args: argparse.Namespace) -> int:
    entries: list[Entry] = []
    for item in spool.entries():
        if isinstance(item, CorruptEntry):
            print(f"relay: unreadable entry {item}", file=sys.stderr)
            continue
        if args.state and item.state != args.state:
            continue
        if args.match and not any(args.match in a for a in
                                  (item.sender, *(r.address for r in item.recipients))):
            continue
        entries.append(item)
    if args.json:
        # One entry per line: still one JSON array, and each line goes through the C
        # encoder (indent= would fall back to the pure-Python one, 5 s at 100,000 entries).
        # One encoder for them all: json.dumps builds a new one per call when given
        # ensure_ascii.
        encode = json.JSONEncoder(ensure_ascii=False).encode
        lines = [encode(views.entry_json(e)) for e in entries]
        print("[\n" + ",\n".join(lines) + "\n]" if lines else "[]")
    else:
        print(views.table(entries, corrupt=len(spool.corrupt_ids())))
    return EX_OK


def _show(spool: Spool, entry_id: str, as_json: bool, with_body: bool) -> int:
    if not is_valid_id(entry_id):
        raise EntryNotFound(entry_id)
    entry = spool.find(entry_id)
    content = spool.content(entry)
    if as_json:
        print(json.dumps(views.detail_json(entry, content, with_body), indent=2,
                         ensure_ascii=False))
    else:
        print(views.show(entry, content, with_body))
    return EX_OK


def _act(spool: Spool, action: Action, ids: list[str]) -> int:
    worst = EX_OK
    done = 0
    for entry_id in ids:
        outcome = admin.apply(spool, action, entry_id)
        line = f"{views.escape(entry_id)}: {outcome.message}"
        if outcome.error is None:
            print(line)
            done += 1
        else:
            print(line, file=sys.stderr)
            worst = max(worst, exit_status(outcome.error))
    # What was done, not what was asked: an ID that was refused is not a message held.
    summary = f"-- {action.value}: {done} message{'s' if done != 1 else ''} {action.past}"
    if done < len(ids):
        summary += f", {len(ids) - done} not (see above)"
    print(summary, file=sys.stderr)
    return worst


async def _check(config: Config) -> int:
    print(f"{'config':<9} ok      {config.source or 'built-in defaults'}")
    upstream = config.upstream
    if upstream is None:
        print(f"{'upstream':<9} FAILED  no upstream section in the config; nothing to check")
        return EX_CONFIG
    session = UpstreamSession(upstream, make_tls_context(upstream))

    def report(stage: Stage, detail: str) -> None:
        print(f"{stage.value:<9} ok      {views.escape(detail)}")
    try:
        smtp = await session.open(report)
    except SessionError as failure:
        print(f"{failure.stage.value:<9} FAILED  {views.escape(str(failure.reply))}")
        print(f"{'':<9} likely cause: {likely_cause(failure, upstream)}")
        return exit_status(failure)
    response = await smtp.quit()
    print(f"{Stage.QUIT.value:<9} ok      {response.code} {views.escape(response.message)}")
    return EX_OK


def _sendmail(argv: list[str]) -> int:
    options = sendmail.parse_args(argv)
    config = load_config(options.config, secrets=False)
    message = sendmail.read_message(sys.stdin.buffer.read(), options.dot_ends_input)
    default_sender = config.sendmail.sender or sendmail.default_sender()
    sender, recipients, prepared = sendmail.prepare(
        message, options, default_sender, socket.gethostname())
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(config.listen.address,
                                                     config.listen.address)
    entry_id = sendmail.submit(host, config.listen.port, sender, recipients, prepared)
    if options.verbose:
        print(f"queued as {entry_id}")
    return EX_OK


def _warn_foreign(problem: ForeignFile) -> None:
    print(f"relay: {views.escape(problem.path)}: {problem.reason}", file=sys.stderr)


def _describe(error: BaseException) -> str:
    if isinstance(error, ConfigError):
        return f"configuration error: {error}"
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error)
