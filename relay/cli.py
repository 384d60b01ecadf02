"""The command line: argument parsing, output, and the one map from errors to exit statuses.

Exit statuses (sysexits.h): 0 success, 64 usage, 65 bad input data, 69 unavailable,
70 internal software error, 75 temporary failure, 77 permission denied, 78 configuration
error.

The daemon, the upstream client and sendmail's submission are imported by the commands
that use them: asyncio, aiosmtplib, smtplib and the listener would weigh on the start-up
of every command, and `relay history` must answer within a second.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, addresses, admin, history, report, stats, views
from .admin import Action
from .config import (
    SEARCH_PATH,
    Config,
    MailgunApiConfig,
    UpstreamConfig,
    find_config_file,
    load_config,
)
from .entry import Entry, Queue
from .errors import (
    CheckFailed,
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
    Unhealthy,
    UsageError,
    WrongState,
)
from .history_query import Query, search
from .hostname import system_name
from .log import setup_logging
from .outcome import Stage
from .schedule import parse_since, parse_when
from .spool import Spool, is_valid_id
from .text import escape

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78
HEALTH_SECONDS = 5.0  # a probe of a healthy relay answers in milliseconds
HEALTH_BYTES = 4096  # of /healthz's answer: a line per problem


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
    if isinstance(error, CheckFailed):
        return EX_NOPERM if error.refused else EX_UNAVAILABLE
    if isinstance(error, TaskFailed):
        return EX_SOFTWARE
    if isinstance(error, (SpoolError, SessionError, OSError, Unhealthy)):
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
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.add_parser("serve", parents=[common],
                        help="run the listener and delivery in the foreground")
    check = commands.add_parser("check", parents=[common],
                                help="validate the config, then connect, TLS and AUTH to the "
                                     "upstream")
    check.add_argument("--local", action="store_true",
                       help="instead, ask the running relay's /healthz (metrics.port)")
    commands.add_parser("sendmail", parents=[common], add_help=False,
                        help="sendmail-compatible submission of a message on stdin "
                             "(relay sendmail --help)")

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
                         (Action.RELEASE, "resume held messages, send scheduled ones now"),
                         (Action.DELETE, "remove messages from the spool"),
                         (Action.REQUEUE, "move failed messages back to the queue")):
        sub = actions.add_parser(action.value, parents=[common], help=f"{text} (ID ... or ALL)")
        sub.add_argument("ids", metavar="ID", nargs="+")
    reschedule = actions.add_parser("reschedule", parents=[common],
                                    help="send messages at a time, or after a duration "
                                         "(ID ... or ALL, then TIME or DURATION)")
    reschedule.add_argument("ids", metavar="ID", nargs="+")
    reschedule.add_argument("when", metavar="TIME|DURATION")

    journal = commands.add_parser("history", parents=[common],
                                  help="the delivery history: each recipient's final outcome")
    journal.add_argument("--to", metavar="ADDR", help="recipient (or @domain)")
    journal.add_argument("--from", dest="sender", metavar="ADDR", help="sender (or @domain)")
    journal.add_argument("--message-id", metavar="ID")
    journal.add_argument("--id", dest="queue_id", metavar="QID", help="queue ID")
    journal.add_argument("--since", metavar="1h|TIME")
    journal.add_argument("--until", metavar="TIME|1h")
    journal.add_argument("--status", choices=history.STATUSES)
    journal.add_argument("--json", action="store_true", help="one JSON array")
    figures = commands.add_parser("stats", parents=[common],
                                  help="what was received, sent, deferred and failed")
    figures.add_argument("--since", metavar="24h|TIME", default="24h")
    figures.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Installed as /usr/sbin/sendmail, mailq or newaliases (symlinks), or `relay sendmail`:
    # sendmail's own option syntax (-oi, -fSENDER) is not argparse's, so it has its own
    # parser; mailq is `relay queue` and newaliases is `sendmail -bi`.
    name = Path(sys.argv[0]).name if argv is None else "relay"
    if name == "mailq":
        args_list = ["queue", *args_list]
    elif name == "newaliases":
        return _guard(lambda: _sendmail(["-bi", *args_list]))
    elif name == "sendmail":
        return _guard(lambda: _sendmail(args_list))
    if args_list[:1] == ["sendmail"]:
        return _guard(lambda: _sendmail(args_list[1:]))
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EX_USAGE
    # Only serve and check talk to the upstream; the rest must work without its password.
    secrets = args.command == "serve" or (args.command == "check" and not args.local)
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
        if args.local:
            return _check_local(config)
        import asyncio
        return asyncio.run(_check(config))
    spool = Spool(config.spool.path)
    spool.on_foreign = _warn_foreign
    _become_spool_owner(spool.path)
    if args.command == "history":
        return _history(spool, args, config.log.redact_addresses)
    if args.command == "stats":
        return _stats(spool, args, config.log.redact_addresses)
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
    now = time.time()
    send_at = _time_argument(lambda text: parse_when(text, now), args.when,
                             "TIME|DURATION") if action is Action.RESCHEDULE else 0.0
    journal = history.Journal(history.journal_dir(spool.path)) \
        if action is Action.DELETE and config.history.enabled else None
    try:
        return _act(spool, action, ids, send_at, journal)
    finally:
        if journal is not None:
            journal.close()


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
    from . import daemon
    setup_logging(config.log)
    with contextlib.suppress(KeyboardInterrupt):
        _event_loop_runner()(daemon.serve(config))
    return EX_OK


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    """uvloop's event loop where it is installed (a dependency on Linux and macOS: its
    loop runs the listener's per-command steps in C, docs/BENCHMARKS.md), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        import asyncio
        return asyncio.run
    return uvloop.run


def _list(spool: Spool, args: argparse.Namespace) -> int:
    # A listing allocates several objects per entry and frees none before it prints, so
    # the cyclic collector would walk the growing heap again and again and find nothing.
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
                                  (item.sender, *(r.address for r in item.recipients),
                                   item.original_sender or "",
                                   *(item.original_recipients or ()))):
            continue
        entries.append(item)
    if args.json:
        # One entry per line: still one JSON array, and each line goes through the C
        # encoder (indent= falls back to the pure-Python one); one encoder for them all,
        # since json.dumps builds a new one per call when given ensure_ascii.
        encode = json.JSONEncoder(ensure_ascii=False).encode
        lines = [encode(views.entry_json(e)) for e in entries]
        print("[\n" + ",\n".join(lines) + "\n]" if lines else "[]")
    else:
        print(views.table(entries, corrupt=len(spool.corrupt_ids())))
        states = spool.upstream_states()
        if states:
            print("\n".join(views.upstream_lines(states, time.time())))
    return EX_OK


def _show(spool: Spool, entry_id: str, as_json: bool, with_body: bool) -> int:
    if not is_valid_id(entry_id):
        raise EntryNotFound(entry_id)
    try:
        entry = spool.find(entry_id)
    except EntryNotFound:
        query = Query(queue_id=entry_id, since=stats.arrival_of(entry_id))
        outcomes = [r.status for r in search(history.journal_dir(spool.path), query)]
        if not outcomes:
            raise
        told = ", ".join(f"{outcomes.count(s)} {s}" for s in history.STATUSES if s in outcomes)
        print(f"relay: {entry_id}: no longer in the queue; the delivery history has its "
              f"outcomes ({told}): relay history --id {entry_id}", file=sys.stderr)
        return EX_DATAERR
    content = spool.content(entry)
    if as_json:
        print(json.dumps(views.detail_json(entry, content, with_body), indent=2,
                         ensure_ascii=False))
    else:
        print(views.show(entry, content, with_body))
    return EX_OK


def _act(spool: Spool, action: Action, ids: list[str], send_at: float,
         journal: history.Journal | None) -> int:
    def deleted(entry: Entry) -> None:
        if journal is not None:
            journal.append(history.deletions(entry, time.time()))
    worst = EX_OK
    done = 0
    for entry_id in ids:
        result = admin.apply(spool, action, entry_id, send_at=send_at, deleted=deleted)
        line = f"{escape(entry_id)}: {result.message}"
        if result.error is None:
            print(line)
            done += 1
        else:
            print(line, file=sys.stderr)
            worst = max(worst, exit_status(result.error))
    # What was done, not what was asked: an ID that was refused is not a message held.
    summary = f"-- {action.value}: {done} message{'s' if done != 1 else ''} {action.past}"
    if done < len(ids):
        summary += f", {len(ids) - done} not (see above)"
    print(summary, file=sys.stderr)
    return worst


def _history(spool: Spool, args: argparse.Namespace, redact: bool) -> int:
    now = time.time()
    query = Query(
        to=args.to, sender=None if args.sender is None else args.sender.strip("<>"),
        message_id=args.message_id, queue_id=args.queue_id, status=args.status,
        since=None if args.since is None else _time_argument(
            lambda text: parse_since(text, now), args.since, "--since"),
        until=None if args.until is None else _time_argument(
            lambda text: parse_since(text, now), args.until, "--until"))
    records = list(search(history.journal_dir(spool.path), query))
    if args.json:
        encode = json.JSONEncoder(ensure_ascii=False).encode
        lines = [encode(report.record_json(r, redact)) for r in records]
        print("[\n" + ",\n".join(lines) + "\n]" if lines else "[]")
    else:
        print(report.history_table(records, redact))
    return EX_OK


def _stats(spool: Spool, args: argparse.Namespace, redact: bool) -> int:
    now = time.time()
    since = _time_argument(lambda text: parse_since(text, now), args.since, "--since")
    records = search(history.journal_dir(spool.path), Query(since=since))
    queued = {queue: spool.queue_ids(queue) for queue in Queue}
    with_state = set(os.listdir(spool.path / "state"))
    attempted = []
    for queue, ids in queued.items():
        for entry_id in ids:
            if entry_id in with_state:
                try:
                    attempted.append(spool.load(queue, entry_id))
                except (FileNotFoundError, CorruptEntry):
                    continue  # moved on meanwhile, or unreadable: `relay queue` says which
    figures = stats.compute(records, queued, attempted, since, now)
    if args.json:
        print(json.dumps(report.stats_json(figures, redact), indent=2, ensure_ascii=False))
    else:
        print(report.stats_text(figures, redact))
    return EX_OK


def _time_argument(parse: Callable[[str], float], text: str, flag: str) -> float:
    try:
        return parse(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


async def _check(config: Config) -> int:
    """Each upstream in turn, one block of lines each; the exit status of the worst. A
    single SMTP upstream prints its steps alone, as before there could be several."""
    print(f"{'config':<9} ok      {config.source or 'built-in defaults'}")
    if not config.upstreams:
        missing = ConfigError("upstream", "no upstream section in the config; nothing to check")
        print(f"{'upstream':<9} FAILED  {missing.message}")
        return exit_status(missing)
    headed = config.upstreams != (config.upstream,)
    hostname = addresses.rules_for(config.addresses, system_name()).hostname
    # What a running relay makes of each upstream now (down after failures, paused).
    states = Spool(config.spool.path).upstream_states() or {}
    worst = EX_OK
    for upstream in config.upstreams:
        if headed:
            where = (f"{upstream.host}:{upstream.port}, {upstream.tls}"
                     if isinstance(upstream, UpstreamConfig)
                     else f"{upstream.api_url}, domain {upstream.domain}")
            print(f"\n{'upstream':<9} {escape(upstream.name)} "
                  f"({upstream.transport} {where})")
        if upstream.name in states:
            print(f"{'relay':<9} {'sees':<7} "
                  f"{views.upstream_state(states[upstream.name], time.time())}")
        failure = await (_check_smtp(upstream, hostname) if isinstance(upstream, UpstreamConfig)
                         else _check_api(upstream))
        if failure is not None:
            worst = max(worst, exit_status(failure))
    return worst


async def _check_smtp(upstream: UpstreamConfig, hostname: str) -> SessionError | None:
    from .smtp_client import UpstreamSession, likely_cause, make_tls_context
    session = UpstreamSession(upstream, make_tls_context(upstream), hostname)

    def report(stage: Stage, detail: str) -> None:
        print(f"{stage.value:<9} ok      {escape(detail)}")
    try:
        smtp = await session.open(report)
    except SessionError as failure:
        print(f"{failure.stage.value:<9} FAILED  {escape(str(failure.reply))}")
        print(f"{'':<9} likely cause: {likely_cause(failure, upstream)}")
        return failure
    response = await smtp.quit()
    print(f"{Stage.QUIT.value:<9} ok      {response.code} {escape(response.message)}")
    return None


async def _check_api(upstream: MailgunApiConfig) -> CheckFailed | None:
    # Imported here: httpx is an optional extra, which config validation has found
    # installed once an upstream names this transport.
    from .mailgun import MailgunApi
    api = MailgunApi(upstream)
    try:
        check = await api.check_domain()
    finally:
        await api.close()
    if check.ok:
        print(f"{'domain':<9} ok      {escape(check.detail)}")
        return None
    print(f"{'domain':<9} FAILED  {escape(check.detail)}")
    print(f"{'':<9} likely cause: {escape(check.cause)}")
    return CheckFailed(check.detail, refused=check.refused)


def _check_local(config: Config) -> int:
    """Ask the running relay's /healthz: exit 0 on 200, else Unhealthy (69)."""
    port = config.metrics.port
    if port is None:
        raise ConfigError("metrics.port", "not set, so the relay serves no /healthz to ask")
    host = _loopback_for(config.metrics.address)
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    connection = http.client.HTTPConnection(host, port, timeout=HEALTH_SECONDS)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        text = response.read(HEALTH_BYTES).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as exc:
        raise Unhealthy(f"no relay answers at {where}: {_describe(exc)}") from None
    finally:
        connection.close()
    detail = "; ".join(line for line in text.splitlines() if line.strip())
    if response.status != 200:
        print(f"{'healthz':<9} FAILED  {response.status} {escape(detail)}")
        raise Unhealthy(f"the relay at {where} is not healthy")
    print(f"{'healthz':<9} ok      {where} {response.status} {escape(detail)}")
    return EX_OK


def _loopback_for(address: str) -> str:
    """Where a local client reaches a server bound to `address` (any address: loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)


def _sendmail(argv: list[str]) -> int:
    from . import sendmail
    options = sendmail.parse_args(argv)
    if options.mode == "help":
        print(sendmail.USAGE, end="")
        return EX_OK
    if options.mode == "newaliases":
        # Package scripts run newaliases after they add a system user: it must succeed.
        path = find_config_file(options.config, os.environ) or SEARCH_PATH[-1]
        print(f"relay: aliases live in relay.yaml ({path}), under addresses.aliases; "
              "there is nothing to rebuild: `systemctl reload relay` applies changes")
        return EX_OK
    send_at = sendmail.send_time(options, time.time())
    config = load_config(options.config, secrets=False)
    if options.mode in ("queue", "flush"):
        spool = Spool(config.spool.path)
        _become_spool_owner(spool.path)
        if options.mode == "flush":
            return _act(spool, Action.FLUSH, admin.select_all(spool, Action.FLUSH), 0.0, None)
        return _list(spool, argparse.Namespace(json=False, state=None, match=None))
    if options.mode == "verify":
        return _verify(config, options.recipients)
    message = sendmail.read_message(sys.stdin.buffer.read(), options.dot_ends_input)
    default_sender = config.sendmail.sender or sendmail.default_sender()
    sender, recipients, prepared = sendmail.prepare(message, options, default_sender)
    host = _loopback_for(config.listen.address)
    entry_id = sendmail.submit(host, config.listen.port, sender, recipients, prepared,
                               send_at=send_at)
    if options.verbose:
        print(f"queued as {entry_id}")
    return EX_OK


def _verify(config: Config, recipients: list[str]) -> int:
    """`sendmail -bv`: what the config's address rules make of each recipient. Nothing is
    sent; the running relay answers the same as long as it runs this config."""
    if not recipients:
        raise UsageError("-bv needs the recipients to check")
    rules = addresses.rules_for(config.addresses, system_name())
    worst = EX_OK
    for recipient in recipients:
        accepted, verdict = addresses.describe(rules, recipient)
        print(f"{escape(recipient)}: {escape(verdict)}")
        worst = worst if accepted else EX_DATAERR
    return worst


def _warn_foreign(problem: ForeignFile) -> None:
    print(f"relay: {escape(problem.path)}: {problem.reason}", file=sys.stderr)


def _describe(error: BaseException) -> str:
    if isinstance(error, ConfigError):
        return f"configuration error: {error}"
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error)
