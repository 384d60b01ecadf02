"""The command line: argument parsing, output, and the one map from errors to exit statuses.

Exit statuses (sysexits.h): 0 success, 64 usage, 65 bad input data, 69 unavailable,
75 temporary failure, 77 permission denied, 78 configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from . import daemon
from .config import Config, load_config
from .errors import ConfigError, EntryNotFound, RelayError, SpoolError
from .log import setup_logging

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


def exit_status(error: BaseException) -> int:
    """The exit status for an error that ends a command: the only such mapping."""
    if isinstance(error, ConfigError):
        return EX_CONFIG
    if isinstance(error, EntryNotFound):
        return EX_DATAERR
    if isinstance(error, (SpoolError, OSError)):
        return EX_UNAVAILABLE
    return EX_TEMPFAIL


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE",
                        help="config file (default: $RELAY_CONFIG, ./relay.yaml, "
                             "/etc/relay/relay.yaml, else built-in defaults)")
    parser = _Parser(prog="relay", parents=[common],
                     description="A local SMTP smarthost: accepts mail, keeps it on disk, "
                                 "relays it upstream.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    serve = commands.add_parser("serve", parents=[common],
                                help="run the listener and delivery in the foreground")
    serve.set_defaults(run=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[Config], int] | None = getattr(args, "run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return EX_USAGE
    try:
        config = load_config(args.config)
        return run(config)
    except (RelayError, OSError) as exc:
        print(f"relay: {_describe(exc)}", file=sys.stderr)
        return exit_status(exc)


def _serve(config: Config) -> int:
    setup_logging(config.log)
    try:
        asyncio.run(daemon.serve(config))
    except KeyboardInterrupt:
        pass
    return EX_OK


def _describe(error: BaseException) -> str:
    if isinstance(error, ConfigError):
        return f"configuration error: {error}"
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error)
