"""Reading the Prometheus text format back in tests: every sample by name and labels."""

from __future__ import annotations

import shutil
import subprocess

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float | None:
    """The sample `name{labels}`, None when it is not served."""
    return found.get((name, frozenset(labels.items())))


def number(found: Samples, name: str, **labels: str) -> float:
    """The sample `name{labels}`, which must be served."""
    found_value = value(found, name, **labels)
    assert found_value is not None, f"{name}{labels} is not served"
    return found_value


def promtool() -> str | None:
    """promtool (Debian's prometheus package), if this machine has it."""
    return shutil.which("promtool")


def promtool_lint(text: str) -> subprocess.CompletedProcess[str]:
    """`promtool check metrics` over an exposition: its naming and format rules."""
    tool = promtool()
    assert tool is not None
    return subprocess.run([tool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60, check=False)
