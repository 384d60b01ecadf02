"""The long soak: `python tools/soak.py [--quick] [--record PATH]`.

At least 10,000 messages from 8 concurrent clients, at least 100 random SIGKILLs of the
relay, 10% of upstream transactions meeting a fault (resets, 4xx, replies that are not
UTF-8, replies out of step), and a spool on a small tmpfs of its own that a ballast file
fills now and then (new mail is answered 452 4.3.1 meanwhile). Then every message
answered 250 is reconciled by Message-ID: none lost, and duplicates no more than the
deliveries and submissions in doubt at the kills (tests/crash_soak.py, the engine, says
how each is counted). --quick is the same at a smaller scale, well under two minutes:
CI runs it after the reliability report. --record writes the figures as JSON (the full
run's go to docs/soak.json, which tools/reliability_report.py puts in
docs/RELIABILITY.md).

The tmpfs needs no privileges: the soak runs itself again under `unshare -rm` (a user and
mount namespace of its own) and mounts it there; where the kernel refuses that, it says
so and runs on an ordinary directory. Needs the test extra (pip install -e '.[test]').
Exits 0 if the run passed, 1 if not.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the soak engine and the test upstream live there

import crash_soak as soak  # noqa: E402 - after the path they are found on
import trustme  # noqa: E402 - after the path they are found on
from upstream import FAULT_KINDS, Upstream  # noqa: E402 - after the path they are found on

FULL = soak.Plan(messages=10_000, clients=8, min_kills=100, max_kills=400, seconds=1800,
                 fault_rate=0.1, fault_kinds=FAULT_KINDS)
QUICK = soak.Plan(messages=3000, clients=8, min_kills=30, max_kills=100, seconds=100,
                  fault_rate=0.1, fault_kinds=FAULT_KINDS)
TMPFS_BYTES = 16 * 1024 * 1024
MIN_FREE = 4 * 1024 * 1024  # spool.min_free on the tmpfs: below it, new mail gets 452
LEAVE_FREE = 2 * 1024 * 1024  # what the ballast leaves: room for state records only


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/soak.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short run CI makes")
    parser.add_argument("--record", metavar="PATH", help="write the figures as JSON to PATH")
    parser.add_argument("--no-tmpfs", action="store_true",
                        help="keep the spool on an ordinary directory (no disk-full phases)")
    parser.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.no_tmpfs or args.in_namespace):
        if namespaces_work():
            command = ["unshare", "-rm", sys.executable, __file__, *argv, "--in-namespace"]
            return subprocess.run(command, check=False).returncode
        print("soak: this kernel refuses an unprivileged mount namespace; the spool stays "
              "on an ordinary directory, with no disk-full phases", file=sys.stderr)
        args.no_tmpfs = True
    plan = QUICK if args.quick else FULL
    # The test upstream (aiosmtpd) warns of its own deprecations at every login.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    figures = run(plan, tmpfs=not args.no_tmpfs)
    report(figures)
    if args.record:
        Path(args.record).write_text(json.dumps(figures.as_dict(), indent=2) + "\n")
    return 1 if figures.problems else 0


def namespaces_work() -> bool:
    """Whether `unshare -rm` may mount a tmpfs here (some kernels refuse it)."""
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as probe:
        result = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", probe],
                                capture_output=True, timeout=30, check=False)
    return result.returncode == 0


def run(plan: soak.Plan, tmpfs: bool) -> soak.Figures:
    with tempfile.TemporaryDirectory(prefix="relay-soak-") as work:
        workdir = Path(work)
        disk = workdir / "disk"
        disk.mkdir()
        filler = None
        if tmpfs:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0700",
                            "tmpfs", str(disk)], check=True)
            filler = soak.DiskFiller(disk, LEAVE_FREE, random.Random(plan.seed))
        ca = trustme.CA()
        ca_file = workdir / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        upstream = Upstream(context).start()
        try:
            return soak.run(plan, workdir, upstream, ca_file, disk / "spool",
                            min_free=MIN_FREE if tmpfs else 0, filler=filler,
                            say=lambda line: print(f"soak: {line}", flush=True))
        finally:
            upstream.close()
            if tmpfs:
                subprocess.run(["umount", "-l", str(disk)], check=False)


def report(figures: soak.Figures) -> None:
    for name, value in figures.as_dict().items():
        if name != "problems":
            print(f"{name:>24}  {value}")
    for problem in figures.problems:
        print(f"soak FAILED: {problem}")
    if not figures.problems:
        print("soak passed: nothing answered 250 was lost, and every duplicate was in doubt "
              "at a kill")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
