"""The crash soak (docs/RELIABILITY-PLAN.md row 84): 8 clients send 2,000 messages while the
upstream meets faults at random and the relay is SIGKILLed at random moments, then the
run is reconciled by Message-ID (tests/crash_soak.py says how). tools/soak.py runs the long
version, with a spool that fills up now and then.

Bounded: at most 100 kills and 5 minutes. Run by the second step of .ci/run (marker soak).
"""

from __future__ import annotations

from pathlib import Path

import crash_soak as soak
import pytest
from upstream import FAULT_KINDS, Upstream

PLAN = soak.Plan(messages=2000, clients=8, min_kills=1, max_kills=100, seconds=300,
                 fault_rate=0.1, fault_kinds=FAULT_KINDS)

pytestmark = pytest.mark.soak


@pytest.mark.plan(84)
def test_crash_soak_reconciles_by_message_id(tmp_path: Path, upstream: Upstream,
                                             ca_file: Path, record_property,
                                             capsys: pytest.CaptureFixture) -> None:
    """Every Message-ID answered 250 was delivered; resends never exceeded the
    deliveries in doubt at the kills, nor resubmissions the submissions cut off after
    their final dot; the queue ended empty."""
    figures = soak.run(PLAN, tmp_path, upstream, ca_file, tmp_path / "spool")
    record_property("soak", figures.as_dict())
    with capsys.disabled():
        print(f"\nsoak: {figures.as_dict()}")
    assert figures.kills >= 1
    assert figures.problems == []
