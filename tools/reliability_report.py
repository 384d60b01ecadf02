"""Run every test that proves a case of docs/RELIABILITY-PLAN.md, and the crash soak, and
write the report: `python tools/reliability_report.py [PATH]` (default docs/RELIABILITY.md).

Exits with pytest's status, so CI fails when any case fails. The report is written
either way, failures included.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    report = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "RELIABILITY.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "reliability_plugin",
               "-m", "plan or soak", f"--reliability-report={report.resolve()}"]
    status = subprocess.run(command, cwd=ROOT, env=env).returncode
    print(f"reliability report written to {report}")
    return status


if __name__ == "__main__":
    sys.exit(main())
